"""`imagegen funnel`: many drafts, then picks, refine, polish and upscale (see imagegen.funnel)."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from imagegen.cli.common import (
    AutoOpt,
    DebugOpt,
    JsonOpt,
    LoraOpt,
    Mode,
    NegativeOpt,
    PickOpt,
    Pool,
    Workers,
    grouped,
    output_option,
    run_guarded,
)
from imagegen.util.errors import ImagegenError

VaryOpt = Annotated[int | None, typer.Option(
    "--vary", metavar="N", help="More like this: before the next stage, N img2img variations of each pick "
                                "(low denoise, seeds after the pick's), to pick from again.")]
VaryDenoiseOpt = Annotated[float | None, typer.Option(
    "--vary-denoise", help="With --vary: how much a variation redraws (default 0.35).")]


class _FunnelGroup(TyperGroup):
    """`imagegen funnel "PROMPT" ...` means `imagegen funnel run "PROMPT" ...` (a prompt that is a command
    name, like "show", needs the explicit `run`)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


funnel_app = typer.Typer(cls=_FunnelGroup, no_args_is_help=True,
                         help="Progressive refinement: many drafts -> pick -> refine -> pick -> polish -> upscale. "
                              '`imagegen funnel "PROMPT" -o DIR` starts one.')


@dataclass
class Advance:
    """How `funnel run` and `funnel resume` go on: the picks, the workers, and what they print."""

    picks: list[str] | None
    auto: bool
    pool: Pool
    workers: Workers
    mode: Mode
    vary: int | None = None
    vary_denoise: float | None = None


def _advance_funnel(funnel, how: Advance) -> None:
    """Shared by `funnel run` and `funnel resume`: render and pick until done or a pick is needed."""
    from imagegen.engine import generate as gen
    from imagegen.engine.output import emit_result
    from imagegen.engine.progress import BatchReporter
    from imagegen.funnel import pipeline as funnel_mod

    if not 1 <= how.pool.workers_n <= 64:
        raise ImagegenError("invalid_argument", "--workers must be 1..64")
    funnel_mod.vary.check(how.vary, how.vary_denoise)
    if how.vary_denoise is not None and not how.vary:
        raise ImagegenError("invalid_argument", "--vary-denoise needs --vary N",
                            hint="Pass --vary 4 --vary-denoise 0.3.")
    timeouts, explicit = gen.timeouts_from_env(how.pool.timeout)
    interactive = not how.mode.json_mode and sys.stdin is not None and sys.stdin.isatty()
    options = funnel_mod.Options(gpus=how.pool.gpus, workers=how.pool.workers_n, timeouts=timeouts,
                                 explicit=frozenset(explicit), force=how.workers.force, fast=how.workers.fast,
                                 picks=tuple(how.picks or ()), auto=how.auto, interactive=interactive,
                                 vary=how.vary or 0, vary_denoise=how.vary_denoise)
    reporter = BatchReporter(quiet=how.mode.quiet, show_progress=how.mode.progress)
    with how.workers.runtime_for_command() as runtime:
        status = funnel_mod.advance(funnel, runtime, reporter,
                                    lambda record: emit_result(record, how.mode.json_mode), options)
    if how.mode.json_mode:
        print(json.dumps(status), flush=True)
    if options.vary:
        reporter.status(f"--vary {options.vary}: no pick was made, so no variations were drawn; pass --pick with it "
                        f"(or --auto): imagegen funnel resume {status['dir']} --pick N --vary {options.vary}")
    if status["status"] == "awaiting_pick":
        reporter.status(f"stage {status['stage']} is done; contact sheet: {status['sheet']}")
        reporter.status(f"pick {status['keep']} of its {len(status['choices'])} images to continue: "
                        f"{status['command']}  (or --auto)")
    elif status["status"] == "done":
        reporter.status(f"funnel done; final image(s): {', '.join(status['final'])}")


@funnel_app.command("run")
@grouped
def funnel_run(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    *,
    out_dir: Annotated[Path, output_option("The funnel directory: stage folders, contact sheets, funnel.json.")] = Path(
        "imagegen-funnel"),
    stages_file: Annotated[Path | None, typer.Option(
        "--stages", help="A YAML stage file (docs/funnel.md); flags below override it.")] = None,
    drafts: Annotated[int | None, typer.Option("--drafts", help="Images in the first stage (default 20).")] = None,
    keep: Annotated[str | None, typer.Option(
        "--keep", help="Images kept after each stage but the last, e.g. 8,3,1.")] = None,
    draft_model: Annotated[str | None, typer.Option(
        "--draft-model", help="Model (name or .safetensors path) of the drafts stage.")] = None,
    refine_model: Annotated[str | None, typer.Option(
        "--refine-model", help="Model of the refine stage, or none to skip it.")] = None,
    polish_model: Annotated[str | None, typer.Option(
        "--polish-model", help="Model of the polish stage, or none to skip it.")] = None,
    upscale_model: Annotated[str | None, typer.Option(
        "--upscale-model", help="Upscale model (name or path), or none to skip upscaling.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="A local SD1.5/SDXL .safetensors file for every drawing stage.")] = None,
    size: Annotated[str | None, typer.Option(
        "--size", help="WIDTHxHEIGHT for every drawing stage, or one per stage: 512x512,1024x1024,1024x1024.")] = None,
    steps: Annotated[str | None, typer.Option(
        "--steps", help="Steps for every drawing stage, or one per stage: 20,25,40.")] = None,
    denoise: Annotated[str | None, typer.Option(
        "--denoise", help="img2img strength for every later drawing stage, or one each: 0.55,0.3.")] = None,
    scale: Annotated[int | None, typer.Option(
        "--scale", help="Upscale factor (default 2; the model's own factor is 4).")] = None,
    negative: NegativeOpt = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Base seed (random when omitted; stage N's images use seed + (N-1)*1000 + i).")] = None,
    lora: LoraOpt = None,
    pool: Pool,
    workers: Workers,
    mode: Mode,
    pick: PickOpt = None,
    auto: AutoOpt = False,
    vary: VaryOpt = None,
    vary_denoise: VaryDenoiseOpt = None,
) -> None:
    """Start a funnel: drafts, then picks (--pick, --auto, or asked on a terminal), refine, polish, upscale."""

    def body() -> None:
        import secrets

        from imagegen.engine import generate as gen
        from imagegen.funnel import loras as funnel_loras
        from imagegen.funnel import pipeline as funnel_mod
        from imagegen.funnel import stages as funnel_stages
        from imagegen.models.registry import Registry

        registry = Registry.load()
        text = gen.check_prompt(prompt)
        funnel_mod.vary.check(vary, vary_denoise)  # before the funnel folder is made
        if seed is not None and not 0 <= seed <= 2**32:
            raise ImagegenError("invalid_argument", f"--seed {seed} is outside 0..{2**32}")
        stages = funnel_stages.load_stage_file(stages_file) if stages_file else funnel_stages.default_stages(registry)
        models = {"drafts": draft_model, "refine": refine_model, "polish": polish_model, "upscale": upscale_model}
        stages = funnel_stages.configure(stages, registry, models=models, checkpoint=checkpoint, drafts=drafts,
                                         keep=keep, size=size, steps=steps, denoise=denoise, scale=scale)
        text, per_stage = funnel_loras.plan(text, lora, stages, registry)  # each LoRA on its family's stages
        text = gen.check_prompt(text)  # without its <lora:...> tags
        base_seed = secrets.randbelow(2**32) if seed is None else seed
        funnel = funnel_mod.Funnel.create(out_dir, text, negative, base_seed, stages, per_stage)
        _advance_funnel(funnel, Advance(pick, auto, pool, workers, mode, vary, vary_denoise))

    run_guarded(mode.json_mode, mode.debug, body)


@funnel_app.command("resume")
@grouped
def funnel_resume(
    funnel_dir: Annotated[Path, typer.Argument(help="A funnel directory (holds funnel.json).")],
    *,
    pool: Pool,
    workers: Workers,
    mode: Mode,
    pick: PickOpt = None,
    auto: AutoOpt = False,
    vary: VaryOpt = None,
    vary_denoise: VaryDenoiseOpt = None,
) -> None:
    """Continue a funnel: finish an interrupted stage (finished images are kept), then apply --pick/--auto
    (and --vary: variations of the picks first)."""

    def body() -> None:
        from imagegen.funnel import pipeline as funnel_mod

        _advance_funnel(funnel_mod.Funnel.load(funnel_dir), Advance(pick, auto, pool, workers, mode, vary,
                                                                    vary_denoise))

    run_guarded(mode.json_mode, mode.debug, body)


@funnel_app.command("show")
def funnel_show(
    funnel_dir: Annotated[Path, typer.Argument(help="A funnel directory (holds funnel.json).")],
    json_mode: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Where a funnel stands: each stage's images, contact sheet and picks, and what comes next."""

    def body() -> None:
        from imagegen.funnel import pipeline as funnel_mod

        funnel = funnel_mod.Funnel.load(funnel_dir)
        if json_mode:
            print(json.dumps({**funnel.data, "dir": str(funnel.root), "status": funnel_mod.status_record(funnel)}))
            return
        for line in funnel_mod.summary_lines(funnel):
            print(line)

    run_guarded(json_mode, debug, body)
