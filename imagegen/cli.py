"""The `imagegen` command line. stdout is data (paths or JSON); everything else goes to stderr."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from .errors import ImagegenError

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader left

app = typer.Typer(name="imagegen", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Generate images locally with ComfyUI workers (one per GPU).")
models_app = typer.Typer(no_args_is_help=True, help="List, add, remove, pull and inspect models.")
app.add_typer(models_app, name="models")

# Shared options, declared once.
JsonOpt = Annotated[bool, typer.Option("--json", help="Write one JSON object per result on stdout; errors as JSON on stderr.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on stderr but errors.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for unexpected errors.", envvar="IMAGEGEN_DEBUG")]
RuntimeOpt = Annotated[str, typer.Option("--runtime", help="Where workers run: auto, docker or local.", envvar="IMAGEGEN_RUNTIME")]
KeepWarmOpt = Annotated[float, typer.Option("--keep-warm", help="Seconds an idle worker stays up for the next call.", envvar="IMAGEGEN_KEEP_WARM")]
ProgressOpt = Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bars on stderr (default: only when stderr is a terminal).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run even when a job looks too large for every GPU's memory.")]
FamilyOpt = Annotated[Optional[str], typer.Option("--family", help="Model family: sd15, sdxl or flux (detected when omitted).")]


class Context:
    json_mode = False
    debug = False


def fail(error: ImagegenError) -> None:
    if Context.json_mode:
        print(json.dumps(error.to_json()), file=sys.stderr, flush=True)
    else:
        print(f"error: {error.message}", file=sys.stderr)
        print(f"hint: {error.hint}", file=sys.stderr, flush=True)
    raise typer.Exit(error.exit_code)


def run_guarded(json_mode: bool, debug: bool, body) -> None:
    """Run a command body with the error contract: ImagegenError -> message + hint + exit code."""
    Context.json_mode, Context.debug = json_mode, debug
    try:
        body()
    except ImagegenError as error:
        fail(error)
    except KeyboardInterrupt:
        fail(ImagegenError("interrupted", "interrupted; what this command started was stopped"))
    except BrokenPipeError:
        # The reader of stdout went away (`imagegen ... | head -1`): stop quietly, as shell tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - the last resort: a bug, reported as one
        if debug:
            raise
        fail(ImagegenError("internal_error", f"{exc.__class__.__name__}: {exc}"))


def _read_stdin_prompt() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise ImagegenError("invalid_prompt", "no prompt given", hint='Pass a prompt: imagegen generate "a red fox", or pipe one on stdin.')
    return sys.stdin.read()


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="What to draw. Read from stdin when omitted and stdin is not a terminal.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="A registered model (see `imagegen models list`).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="A local SD1.5/SDXL .safetensors file to use instead of a registered model.")] = None,
    family: FamilyOpt = None,
    from_image: Annotated[Optional[Path], typer.Option("--from", help="Reproduce a PNG from its metadata (imagegen, A1111 or ComfyUI); other flags override.")] = None,
    output_path: Annotated[Optional[str], typer.Option("--output", "-o", help="A .png path, a directory, or - for PNG bytes on stdout.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the first image (random when omitted).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Sampling steps (model default when omitted).")] = None,
    cfg: Annotated[Optional[float], typer.Option("--cfg", help="Classifier-free guidance scale.")] = None,
    size: Annotated[Optional[str], typer.Option("--size", help="WIDTHxHEIGHT, multiples of 8 (model default when omitted).")] = None,
    negative: Annotated[Optional[str], typer.Option("--negative", help="Negative prompt (SD1.5/SDXL).")] = None,
    sampler: Annotated[Optional[str], typer.Option("--sampler", help="ComfyUI sampler name, e.g. euler, dpmpp_2m.")] = None,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="ComfyUI scheduler name, e.g. normal, karras.")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help="Flux guidance (default 3.5).")] = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Number of images (seeds seed, seed+1, ...).")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
    force: ForceOpt = False,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Overall cap in seconds for the whole call.")] = None,
    runtime: RuntimeOpt = "auto",
    keep_warm: KeepWarmOpt = 300.0,
    progress: ProgressOpt = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Generate images from a prompt; prints one path (or JSON object) per image."""

    def body() -> None:
        from . import generate as gen
        from .output import emit_result
        from .progress import Reporter
        from .runtime import make_runtime

        timeouts, explicit = gen.timeouts_from_env(timeout)
        given = {"prompt": prompt, "model": model, "negative": negative, "seed": seed, "steps": steps, "cfg": cfg,
                 "size": size, "sampler": sampler, "scheduler": scheduler, "guidance": guidance}
        if from_image is not None:
            given = gen.merge_source(from_image, given, checkpoint is not None)
        if given["prompt"] is None:
            given["prompt"] = _read_stdin_prompt()
        request = gen.Request(**given, checkpoint=checkpoint, family=family, count=count, output=output_path,
                              overwrite=overwrite, force=force, timeouts=timeouts, explicit_timeouts=explicit)
        reporter = Reporter(quiet=quiet, show_progress=progress)
        planned = gen.plan(request)
        for record in gen.execute(planned, make_runtime(runtime, keep_warm), reporter):
            if record["path"] != "-":
                emit_result(record, json_mode, quiet=False)
            elif json_mode:
                print(json.dumps(record), file=sys.stderr, flush=True)

    run_guarded(json_mode, debug, body)


@app.command()
def batch(
    prompts_file: Annotated[Optional[Path], typer.Argument(help="Prompts, one per line or JSONL objects; - or omitted: stdin.")] = None,
    out_dir: Annotated[Path, typer.Option("--output", "-o", help="Directory for the images and manifest.jsonl (rerun to resume).")] = Path("imagegen-batch"),
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Default model for items that name none.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Default local SD1.5/SDXL .safetensors file for items that name no model.")] = None,
    size: Annotated[Optional[str], typer.Option("--size", help="Default WIDTHxHEIGHT.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Default sampling steps.")] = None,
    cfg: Annotated[Optional[float], typer.Option("--cfg", help="Default guidance scale.")] = None,
    negative: Annotated[Optional[str], typer.Option("--negative", help="Default negative prompt.")] = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Default images per prompt.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Base for the seeds of items that give none (seeds are stable across reruns).")] = 0,
    gpus: Annotated[Optional[str], typer.Option("--gpus", help="all, none, N, or indices/UUIDs: 0,2 or GPU-3f2a...")] = None,
    workers_n: Annotated[int, typer.Option("--workers", help="CPU workers when no GPU is used.")] = 1,
    pack: Annotated[str, typer.Option("--pack", help="Images of one prompt per latent batch: auto (4 on GPU, 1 on CPU) or N.")] = "auto",
    depth: Annotated[int, typer.Option("--depth", help="Jobs kept queued on each worker so it never idles.")] = 2,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing files in the output directory.")] = False,
    force: ForceOpt = False,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Overall cap in seconds per job.")] = None,
    runtime: RuntimeOpt = "auto",
    keep_warm: KeepWarmOpt = 300.0,
    progress: ProgressOpt = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Render many prompts over every worker; prints each image as it finishes; rerun to resume."""

    def body() -> None:
        from . import batch as batch_mod
        from . import generate as gen
        from .progress import BatchReporter
        from .runtime import make_runtime

        if prompts_file is None or str(prompts_file) == "-":
            if sys.stdin is None or sys.stdin.isatty():
                raise ImagegenError("invalid_prompt", "no prompts: give a file or pipe prompts on stdin",
                                    hint="imagegen batch prompts.txt, or: cat prompts.txt | imagegen batch")
            text, source = sys.stdin.read(), "stdin"
        else:
            try:
                text, source = prompts_file.read_text(encoding="utf-8"), str(prompts_file)
            except OSError as exc:
                raise ImagegenError("invalid_argument", f"cannot read {prompts_file}: {exc.strerror}") from None
        if not 1 <= workers_n <= 64 or not 1 <= depth <= 16:
            raise ImagegenError("invalid_argument", "--workers must be 1..64 and --depth 1..16")
        items = batch_mod.parse_items(text, source)
        timeouts, explicit = gen.timeouts_from_env(timeout)
        defaults = {k: v for k, v in {"model": model, "size": size, "steps": steps, "cfg": cfg, "negative": negative,
                                      "count": count, "checkpoint": str(checkpoint) if checkpoint else None}.items() if v is not None}
        reporter = BatchReporter(quiet=quiet, show_progress=progress)
        batch_mod.plan(items, out_dir, defaults, seed, 1)  # every item is valid before a worker starts
        emit = (lambda line: print(json.dumps(line, sort_keys=True), flush=True)) if json_mode else \
            (lambda line: print(line["path"], flush=True) if line["status"] == "done" else None)
        summary = batch_mod.run(items, out_dir.absolute(), make_runtime(runtime, keep_warm), reporter, emit,
                                defaults=defaults, base_seed=seed, pack=pack, gpus=gpus, workers=workers_n, depth=depth,
                                overwrite=overwrite, force=force, timeouts=timeouts, explicit=explicit)
        reporter.status(f"batch: {summary.done} done, {summary.failed} failed, {summary.skipped} skipped (done earlier) "
                        f"of {summary.total}; manifest: {out_dir.absolute() / batch_mod.MANIFEST}")
        if summary.failed:
            first = summary.failures[0]
            raise ImagegenError("jobs_failed", f"{summary.failed} image(s) failed, e.g. line {first['line']}: {first['error']['message']}",
                                failed=summary.failed, done=summary.done)

    run_guarded(json_mode, debug, body)


class _FunnelGroup(TyperGroup):
    """`imagegen funnel "PROMPT" ...` means `imagegen funnel run "PROMPT" ...` (a prompt that is a command
    name, like "show", needs the explicit `run`)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


funnel_app = typer.Typer(cls=_FunnelGroup, no_args_is_help=True,
                         help='Progressive refinement: many drafts -> pick -> refine -> pick -> polish -> upscale. `imagegen funnel "PROMPT" -o DIR` starts one.')
app.add_typer(funnel_app, name="funnel")
PickOpt = Annotated[Optional[list[str]], typer.Option("--pick", metavar="3,7", help="1-based indices from the last contact sheet, e.g. 3,7; repeat for later stages.")]
AutoOpt = Annotated[bool, typer.Option("--auto", help="Pick by the documented rule (a scorer in $IMAGEGEN_FUNNEL_SCORER, else the first N).")]
GpusOpt = Annotated[Optional[str], typer.Option("--gpus", help="all, none, N, or indices/UUIDs: 0,2 or GPU-3f2a...")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="CPU workers when no GPU is used.")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help="Overall cap in seconds per job.")]


def _advance_funnel(funnel, picks, auto, gpus, workers_n, timeout, force, runtime, keep_warm, json_mode, quiet, progress) -> None:
    """Shared by `funnel run` and `funnel resume`: render and pick until done or a pick is needed."""
    from . import funnel as funnel_mod
    from . import generate as gen
    from .output import emit_result
    from .progress import BatchReporter
    from .runtime import make_runtime

    if not 1 <= workers_n <= 64:
        raise ImagegenError("invalid_argument", "--workers must be 1..64")
    timeouts, explicit = gen.timeouts_from_env(timeout)
    options = funnel_mod.Options(gpus=gpus, workers=workers_n, timeouts=timeouts, explicit=explicit, force=force,
                                 picks=tuple(picks or ()), auto=auto,
                                 interactive=not json_mode and sys.stdin is not None and sys.stdin.isatty())
    reporter = BatchReporter(quiet=quiet, show_progress=progress)
    status = funnel_mod.advance(funnel, make_runtime(runtime, keep_warm), reporter, lambda record: emit_result(record, json_mode),
                                options)
    if json_mode:
        print(json.dumps(status), flush=True)
    if status["status"] == "awaiting_pick":
        reporter.status(f"stage {status['stage']} is done; contact sheet: {status['sheet']}")
        reporter.status(f"pick {status['keep']} of its {len(status['choices'])} images to continue: {status['command']}  (or --auto)")
    elif status["status"] == "done":
        reporter.status(f"funnel done; final image(s): {', '.join(status['final'])}")


@funnel_app.command("run")
def funnel_run(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    out_dir: Annotated[Path, typer.Option("--output", "-o", help="The funnel directory: stage folders, contact sheets, funnel.json.")] = Path("imagegen-funnel"),
    stages_file: Annotated[Optional[Path], typer.Option("--stages", help="A YAML stage file (docs/funnel.md); flags below override it.")] = None,
    drafts: Annotated[Optional[int], typer.Option("--drafts", help="Images in the first stage (default 20).")] = None,
    keep: Annotated[Optional[str], typer.Option("--keep", help="Images kept after each stage but the last, e.g. 8,3,1.")] = None,
    draft_model: Annotated[Optional[str], typer.Option("--draft-model", help="Model (name or .safetensors path) of the drafts stage.")] = None,
    refine_model: Annotated[Optional[str], typer.Option("--refine-model", help="Model of the refine stage, or none to skip it.")] = None,
    polish_model: Annotated[Optional[str], typer.Option("--polish-model", help="Model of the polish stage, or none to skip it.")] = None,
    upscale_model: Annotated[Optional[str], typer.Option("--upscale-model", help="Upscale model (name or path), or none to skip upscaling.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="A local SD1.5/SDXL .safetensors file for every drawing stage.")] = None,
    size: Annotated[Optional[str], typer.Option("--size", help="WIDTHxHEIGHT for every drawing stage, or one per stage: 512x512,1024x1024,1024x1024.")] = None,
    steps: Annotated[Optional[str], typer.Option("--steps", help="Steps for every drawing stage, or one per stage: 20,25,40.")] = None,
    denoise: Annotated[Optional[str], typer.Option("--denoise", help="img2img strength for every later drawing stage, or one each: 0.55,0.3.")] = None,
    scale: Annotated[Optional[int], typer.Option("--scale", help="Upscale factor (default 2; the model's own factor is 4).")] = None,
    negative: Annotated[Optional[str], typer.Option("--negative", help="Negative prompt (SD1.5/SDXL).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Base seed (random when omitted; stage N's images use seed + (N-1)*1000 + i).")] = None,
    pick: PickOpt = None,
    auto: AutoOpt = False,
    gpus: GpusOpt = None,
    workers_n: WorkersOpt = 1,
    timeout: TimeoutOpt = None,
    force: ForceOpt = False,
    runtime: RuntimeOpt = "auto",
    keep_warm: KeepWarmOpt = 300.0,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
    progress: ProgressOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Start a funnel: drafts, then picks (--pick, --auto, or asked on a terminal), refine, polish, upscale."""

    def body() -> None:
        import secrets

        from . import funnel as funnel_mod
        from . import funnel_stages
        from . import generate as gen
        from .registry import Registry

        registry = Registry.load()
        text = gen.check_prompt(prompt)
        if seed is not None and not 0 <= seed <= 2**32:
            raise ImagegenError("invalid_argument", f"--seed {seed} is outside 0..{2**32}")
        stages = funnel_stages.load_stage_file(stages_file) if stages_file else funnel_stages.default_stages(registry)
        models = {"drafts": draft_model, "refine": refine_model, "polish": polish_model, "upscale": upscale_model}
        stages = funnel_stages.configure(stages, registry, models=models, checkpoint=checkpoint, drafts=drafts, keep=keep,
                                         size=size, steps=steps, denoise=denoise, scale=scale)
        funnel = funnel_mod.Funnel.create(out_dir, text, negative, secrets.randbelow(2**32) if seed is None else seed, stages)
        _advance_funnel(funnel, pick, auto, gpus, workers_n, timeout, force, runtime, keep_warm, json_mode, quiet, progress)

    run_guarded(json_mode, debug, body)


@funnel_app.command("resume")
def funnel_resume(
    funnel_dir: Annotated[Path, typer.Argument(help="A funnel directory (holds funnel.json).")],
    pick: PickOpt = None,
    auto: AutoOpt = False,
    gpus: GpusOpt = None,
    workers_n: WorkersOpt = 1,
    timeout: TimeoutOpt = None,
    force: ForceOpt = False,
    runtime: RuntimeOpt = "auto",
    keep_warm: KeepWarmOpt = 300.0,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
    progress: ProgressOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Continue a funnel: finish an interrupted stage (finished images are kept), then apply --pick/--auto."""

    def body() -> None:
        from . import funnel as funnel_mod

        _advance_funnel(funnel_mod.Funnel.load(funnel_dir), pick, auto, gpus, workers_n, timeout, force, runtime, keep_warm,
                        json_mode, quiet, progress)

    run_guarded(json_mode, debug, body)


@funnel_app.command("show")
def funnel_show(
    funnel_dir: Annotated[Path, typer.Argument(help="A funnel directory (holds funnel.json).")],
    json_mode: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Where a funnel stands: each stage's images, contact sheet and picks, and what comes next."""

    def body() -> None:
        from . import funnel as funnel_mod

        funnel = funnel_mod.Funnel.load(funnel_dir)
        if json_mode:
            print(json.dumps({**funnel.data, "dir": str(funnel.root), "status": funnel_mod.status_record(funnel)}))
            return
        for line in funnel_mod.describe(funnel):
            print(line)

    run_guarded(json_mode, debug, body)


@app.command()
def workers(runtime: RuntimeOpt = "auto", json_mode: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List running workers: device, model last used, idle time, address."""

    def body() -> None:
        from .runtime import make_runtime

        found = make_runtime(runtime).workers()
        if json_mode:
            for item in found:
                print(json.dumps({"schema": "imagegen.worker/1", **item}))
            return
        if not found:
            print("no workers running", file=sys.stderr)
        for item in found:
            gpu = item.get("gpu") or {}
            memory = f"{gpu['memory_free_mib'] / 1024:.1f}/{gpu['memory_total_mib'] / 1024:.1f} GiB free" if gpu.get("memory_total_mib") else "-"
            speed = f"{item['it_per_s']:.2f} it/s" if item.get("it_per_s") else "-"
            print(f"{item['name']}\t{gpu.get('name') or item['device']}\t{memory}\t{'healthy' if item.get('healthy', True) else 'UNHEALTHY'}\t"
                  f"{speed}\t{item['url']}\tmodel={item.get('last_model') or '-'}\tidle={item.get('idle_seconds')}s\tjobs={item.get('jobs_done')}")

    run_guarded(json_mode, debug, body)


@app.command()
def stop(
    all_workers: Annotated[bool, typer.Option("--all", help="Stop every worker (the default: all of this runtime's).")] = False,
    runtime: RuntimeOpt = "auto",
    json_mode: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Stop warm workers now instead of waiting for their keep-warm time to pass."""

    def body() -> None:
        from .runtime import make_runtime

        stopped = make_runtime(runtime).stop()
        if json_mode:
            print(json.dumps({"schema": "imagegen.stopped/1", "stopped": stopped}))
        else:
            print(f"stopped {len(stopped)} worker(s)" + (f": {', '.join(stopped)}" if stopped else ""), file=sys.stderr)

    run_guarded(json_mode, debug, body)


@models_app.command("list")
def models_list(json_mode: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Registered models: installed or not, size on disk, gated."""

    def body() -> None:
        from . import cache
        from .registry import Registry

        registry = Registry.load()
        for name, bundle in sorted(registry.bundles.items()):
            entry = cache.model_record(bundle)
            if json_mode:
                print(json.dumps(entry))
            else:
                state = "installed" if entry["installed"] else f"missing {entry['missing_bytes'] / 1e9:.1f} GB"
                print(f"{name:<16} {bundle.family:<6} {bundle.total_size / 1e9:6.1f} GB  {state:<18}"
                      f"{' gated' if bundle.gated else ''}  {bundle.description}")

    run_guarded(json_mode, debug, body)


@models_app.command("add")
def models_add(
    name: Annotated[str, typer.Argument(help="Name to register the model under.")],
    file: Annotated[Path, typer.Option("--file", help="The local .safetensors file.")],
    family: FamilyOpt = None,
    json_mode: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Register a local model file (used in place, never copied) in your models.yaml."""

    def body() -> None:
        from . import modelfile
        from .registry import FAMILIES, add_user_model

        detected = modelfile.detect(modelfile.read_header(file))
        chosen = family or detected.family
        if chosen not in FAMILIES:
            raise ImagegenError("invalid_model_file", f"{file}: cannot tell its family (looks like {detected.kind}); pass --family",
                                hint="--family sd15, sdxl or flux.")
        target = add_user_model(name, file, chosen)
        record = {"schema": "imagegen.model_added/1", "name": name, "family": chosen, "file": str(file.resolve()), "models_yaml": str(target)}
        print(json.dumps(record) if json_mode else f"registered {name} ({chosen}) in {target}")

    run_guarded(json_mode, debug, body)


@models_app.command("rm")
def models_rm(name: Annotated[str, typer.Argument(help="A model registered in your models.yaml.")],
              json_mode: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Remove a model from your models.yaml (your files are left where they are)."""

    def body() -> None:
        from .registry import remove_user_model

        if not remove_user_model(name):
            raise ImagegenError("unknown_model", f"{name!r} is not in your models.yaml", hint="Built-in models cannot be removed; `imagegen models list` shows the source of each.")
        print(json.dumps({"schema": "imagegen.model_removed/1", "name": name}) if json_mode else f"removed {name}")

    run_guarded(json_mode, debug, body)


@models_app.command("inspect")
def models_inspect(file: Annotated[Path, typer.Argument(help="A .safetensors file.")],
                   json_mode: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Tell a model file's family and text-encoder shapes from its header alone (no torch)."""

    def body() -> None:
        from . import modelfile

        header = modelfile.read_header(file)
        found = modelfile.detect(header)
        record = {"schema": "imagegen.inspect/1", "file": str(file), "family": found.family, "kind": found.kind, **found.details}
        if json_mode:
            print(json.dumps(record))
        else:
            for key, value in record.items():
                if key != "schema":
                    print(f"{key}: {value}")

    run_guarded(json_mode, debug, body)


@app.command()
def mcp(runtime: RuntimeOpt = "auto", keep_warm: KeepWarmOpt = 300.0, debug: DebugOpt = False) -> None:
    """Serve generate_image, batch and list_models to an agent: an MCP server on stdin/stdout."""

    def body() -> None:
        from .mcp_server import serve

        serve(runtime, keep_warm)

    run_guarded(False, debug, body)


@app.command()
def schema(
    name: Annotated[Optional[str], typer.Argument(help="One schema, e.g. imagegen.result/1 or result (all when omitted).")] = None,
    json_mode: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print the JSON Schemas of the records --json writes: result, error, model and worker."""

    def body() -> None:
        from .schema import SCHEMAS

        chosen = [s for key, s in SCHEMAS.items() if name in (None, key, key.split("/")[0].removeprefix("imagegen."))]
        if not chosen:
            raise ImagegenError("invalid_argument", f"no schema named {name!r}", hint="Known: " + ", ".join(SCHEMAS))
        for item in chosen:
            print(json.dumps(item) if json_mode else json.dumps(item, indent=2))

    run_guarded(json_mode, debug, body)


@app.command()
def doctor(runtime: RuntimeOpt = "auto", json_mode: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Check Docker, the NVIDIA runtime, GPUs, the image, the cache and free disk; say how to fix each problem."""

    def body() -> None:
        from .doctor import run_checks

        checks = run_checks()
        for check in checks:
            if json_mode:
                print(json.dumps({"schema": "imagegen.check/1", **check}))
            else:
                mark = "ok  " if check["ok"] else ("warn" if check.get("optional") else "FAIL")
                print(f"[{mark}] {check['check']}: {check['detail']}" + (f"\n       fix: {check['fix']}" if not check["ok"] and check.get("fix") else ""))
        if any(not c["ok"] and not c.get("optional") for c in checks):
            raise typer.Exit(1)

    run_guarded(json_mode, debug, body)


@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="A registered model (see `imagegen models list`).")],
                json_mode: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False) -> None:
    """Download a model's missing files (verified by sha256 and size; an interrupted pull continues)."""

    def body() -> None:
        from . import cache, paths
        from .fetch import fetch_bundle
        from .fetch_progress import TqdmRenderer
        from .registry import Registry

        bundle = Registry.load().get(name)
        models_dir = paths.models_dir()
        renderer = None if json_mode else TqdmRenderer(quiet=quiet)
        on_event = (lambda event: print(json.dumps({"schema": "imagegen.fetch_event/1", **event}), flush=True)) if json_mode else renderer
        try:
            fetch_bundle(bundle, models_dir, on_event)
        finally:
            if renderer is not None:
                renderer.close()
        files = cache.ensure_bundle(bundle, None, models_dir)
        if json_mode:
            print(json.dumps({"schema": "imagegen.model_pulled/1", "name": name, "files": {k: str(v) for k, v in files.items()}}))
        else:
            for path in files.values():
                print(path)

    run_guarded(json_mode, debug, body)


@app.command()
def version(json_mode: JsonOpt = False) -> None:
    """Print imagegen's version and the ComfyUI it runs."""
    from . import COMFYUI_COMMIT, COMFYUI_VERSION, __version__

    record = {"imagegen": __version__, "comfyui": COMFYUI_VERSION, "comfyui_commit": COMFYUI_COMMIT}
    print(json.dumps(record) if json_mode else f"imagegen {__version__} (ComfyUI {COMFYUI_VERSION})")


def _interrupt_on_sigterm() -> None:
    import signal

    def handler(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main() -> int:
    _interrupt_on_sigterm()  # `kill` cleans up like Ctrl-C does
    try:
        app(standalone_mode=True)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    return 0
