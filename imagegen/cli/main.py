"""The `imagegen` command line. stdout is data (paths or JSON); everything else goes to stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from imagegen.cli.common import (
    DebugOpt,
    FamilyOpt,
    FastOpt,
    ForceOpt,
    GpusOpt,
    JsonOpt,
    KeepWarmOpt,
    ProgressOpt,
    QuietOpt,
    RuntimeOpt,
    TimeoutOpt,
    WorkersOpt,
    read_stdin_prompt,
    run_guarded,
)
from imagegen.cli.funnel import funnel_app
from imagegen.cli.models import models_app
from imagegen.util.errors import ImagegenError

app = typer.Typer(name="imagegen", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Generate images locally with ComfyUI workers (one per GPU).")
app.add_typer(models_app, name="models")
app.add_typer(funnel_app, name="funnel")


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
    fast: FastOpt = False,
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
        from imagegen.engine import generate as gen
        from imagegen.engine.output import emit_result
        from imagegen.engine.progress import Reporter
        from imagegen.runtimes.choose import make_runtime

        timeouts, explicit = gen.timeouts_from_env(timeout)
        given = {"prompt": prompt, "model": model, "negative": negative, "seed": seed, "steps": steps, "cfg": cfg,
                 "size": size, "sampler": sampler, "scheduler": scheduler, "guidance": guidance}
        if from_image is not None:
            given = gen.merge_source(from_image, given, checkpoint is not None)
        if given["prompt"] is None:
            given["prompt"] = read_stdin_prompt()
        request = gen.Request(**given, checkpoint=checkpoint, family=family, count=count, output=output_path,
                              overwrite=overwrite, force=force, fast=fast, timeouts=timeouts, explicit_timeouts=explicit)
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
    gpus: GpusOpt = None,
    workers_n: WorkersOpt = 1,
    pack: Annotated[str, typer.Option("--pack", help="Images of one prompt per latent batch: auto (4 on GPU, 1 on CPU) or N.")] = "auto",
    depth: Annotated[int, typer.Option("--depth", help="Jobs kept queued on each worker so it never idles.")] = 2,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing files in the output directory.")] = False,
    force: ForceOpt = False,
    fast: FastOpt = False,
    timeout: TimeoutOpt = None,
    runtime: RuntimeOpt = "auto",
    keep_warm: KeepWarmOpt = 300.0,
    progress: ProgressOpt = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Render many prompts over every worker; prints each image as it finishes; rerun to resume."""

    def body() -> None:
        from imagegen.engine import batch as batch_mod
        from imagegen.engine import generate as gen
        from imagegen.engine.progress import BatchReporter
        from imagegen.runtimes.choose import make_runtime

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
                                      "count": count, "checkpoint": str(checkpoint) if checkpoint else None,
                                      "fast": fast or None}.items() if v is not None}
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


@app.command()
def workers(runtime: RuntimeOpt = "auto", json_mode: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List running workers: device, model last used, idle time, address."""

    def body() -> None:
        from imagegen.runtimes.choose import runtimes_here

        found = [item for each in runtimes_here(runtime) for item in each.workers()]  # auto: every runtime here
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
        from imagegen.runtimes.choose import runtimes_here

        stopped = [name for each in runtimes_here(runtime) for name in each.stop()]  # auto: every runtime here
        if json_mode:
            print(json.dumps({"schema": "imagegen.stopped/1", "stopped": stopped}))
        else:
            print(f"stopped {len(stopped)} worker(s)" + (f": {', '.join(stopped)}" if stopped else ""), file=sys.stderr)

    run_guarded(json_mode, debug, body)


@app.command()
def mcp(runtime: RuntimeOpt = "auto", keep_warm: KeepWarmOpt = 300.0, debug: DebugOpt = False) -> None:
    """Serve generate_image, batch and list_models to an agent: an MCP server on stdin/stdout."""

    def body() -> None:
        from imagegen.mcp.server import serve

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
        from imagegen.engine.schema import SCHEMAS

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
        from imagegen.cli.doctor import run_checks

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


@app.command()
def version(json_mode: JsonOpt = False) -> None:
    """Print imagegen's version and the ComfyUI it runs."""
    from imagegen import COMFYUI_COMMIT, COMFYUI_VERSION, __version__

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
