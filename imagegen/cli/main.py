"""The `imagegen` command line. stdout is data (paths or JSON); everything else goes to stderr."""

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from imagegen.cli.common import (
    EXIT_BROKEN_PIPE,
    CallTimeoutOpt,
    Controls,
    DebugOpt,
    Draw,
    FamilyOpt,
    GroupedHelp,
    GuidanceOpt,
    HiresFix,
    HostsOpt,
    ImageOutputOpt,
    JsonOpt,
    KeepWarmOpt,
    Mode,
    OverwriteOpt,
    Pool,
    RuntimeOpt,
    Workers,
    grouped,
    output_option,
    read_stdin_prompt,
    run_guarded,
    usage_failure,
)
from imagegen.cli.funnel import funnel_app
from imagegen.cli.image import image_app
from imagegen.cli.models import models_app
from imagegen.cli.run import run as run_command
from imagegen.cli.upscale import upscale as upscale_command
from imagegen.util.errors import ImagegenError

app = typer.Typer(name="imagegen", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Generate images locally with ComfyUI workers (one per GPU).")
app.add_typer(models_app, name="models")
app.add_typer(funnel_app, name="funnel")
app.add_typer(image_app, name="image")


@app.command()
@grouped
def generate(
    prompt: Annotated[str | None, typer.Argument(
        help="What to draw. Read from stdin when omitted and stdin is not a terminal.")] = None,
    *,
    draw: Draw,
    controls: Controls,
    hires_fix: HiresFix,
    family: FamilyOpt = None,
    from_image: Annotated[Path | None, typer.Option(
        "--from", help="Reproduce a PNG from its metadata (imagegen, A1111 or ComfyUI); other flags override.")] = None,
    output_path: ImageOutputOpt = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Seed of the first image (random when omitted).")] = None,
    sampler: Annotated[str | None, typer.Option(
        "--sampler", help="ComfyUI sampler name, e.g. euler, dpmpp_2m.")] = None,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", help="ComfyUI scheduler name, e.g. normal, karras.")] = None,
    guidance: GuidanceOpt = None,
    overwrite: OverwriteOpt = False,
    timeout: CallTimeoutOpt = None,
    workers: Workers,
    mode: Mode,
) -> None:
    """Generate images from a prompt; prints one path (or JSON object) per image."""

    def body() -> None:
        from imagegen.engine import generate as gen
        from imagegen.engine.output import emit_results
        from imagegen.engine.progress import Reporter

        timeouts, explicit = gen.timeouts_from_env(timeout)
        given: dict[str, Any] = {"prompt": prompt, "model": draw.model, "negative": draw.negative, "seed": seed,
                                 "steps": draw.steps, "cfg": draw.cfg, "size": draw.size, "sampler": sampler,
                                 "scheduler": scheduler, "guidance": guidance, "image": controls.image,
                                 "mask": controls.mask, "denoise": controls.denoise, "mask_grow": controls.mask_grow,
                                 "extend": controls.extend,
                                 "loras": controls.lora, "controls": controls.control,
                                 "control_preprocess": controls.control_preprocess}
        given["hires"] = hires_fix.fix()
        if from_image is not None:
            given = gen.merge_source(from_image, given, draw.checkpoint is not None)
        if given["prompt"] is None:
            given["prompt"] = read_stdin_prompt(gen.MAX_PROMPT_CHARS)
        request = gen.Request(**given, checkpoint=draw.checkpoint, family=family, count=draw.count, output=output_path,
                              overwrite=overwrite, force=workers.force, fast=workers.fast, timeouts=timeouts,
                              explicit_timeouts=explicit)
        reporter = Reporter(quiet=mode.quiet, show_progress=mode.progress)
        planned = gen.plan(request)
        with workers.runtime_for_command() as runtime:
            emit_results(gen.execute(planned, runtime, reporter), mode.json_mode)

    run_guarded(mode.json_mode, mode.debug, body)


@app.command()
@grouped
def batch(
    prompts_file: Annotated[Path | None, typer.Argument(
        help="Prompts, one per line or JSONL objects; - or omitted: stdin.")] = None,
    *,
    out_dir: Annotated[Path, output_option("Directory for the images and manifest.jsonl (rerun to resume).")] = Path(
        "imagegen-batch"),
    draw: Draw,
    seed: Annotated[int, typer.Option(
        "--seed", help="Base for the seeds of items that give none (seeds are stable across reruns).")] = 0,
    pool: Pool,
    pack: Annotated[str, typer.Option(
        "--pack", help="Images of one prompt per latent batch: auto (4 on GPU, 1 on CPU) or N.")] = "auto",
    depth: Annotated[int, typer.Option("--depth", help="Jobs kept queued on each worker so it never idles.")] = 2,
    overwrite: OverwriteOpt = False,
    workers: Workers,
    mode: Mode,
) -> None:
    """Render many prompts over every worker; prints each image as it finishes; rerun to resume."""

    def body() -> None:
        from imagegen.engine import batch as batch_mod
        from imagegen.engine import generate as gen
        from imagegen.engine.progress import BatchReporter

        if not 1 <= pool.workers_n <= 64 or not 1 <= depth <= 16:
            raise ImagegenError("invalid_argument", "--workers must be 1..64 and --depth 1..16")
        if prompts_file is None or str(prompts_file) == "-":
            if sys.stdin is None or sys.stdin.isatty():
                raise ImagegenError("invalid_prompt", "no prompts: give a file or pipe prompts on stdin",
                                    hint="imagegen batch prompts.txt, or: cat prompts.txt | imagegen batch")
            items = batch_mod.read_items(sys.stdin, "stdin")  # line by line: a line over the limit stops the read
        else:
            try:
                with open(prompts_file, encoding="utf-8") as handle:
                    items = batch_mod.read_items(handle, str(prompts_file), prompts_file.absolute().parent)
            except OSError as exc:
                raise ImagegenError("invalid_argument", f"cannot read {prompts_file}: {exc.strerror}") from None
        timeouts, explicit = gen.timeouts_from_env(pool.timeout)
        given = {"model": draw.model, "size": draw.size, "steps": draw.steps, "cfg": draw.cfg,
                 "negative": draw.negative, "count": draw.count,
                 "checkpoint": str(draw.checkpoint) if draw.checkpoint else None, "fast": workers.fast or None}
        defaults = {k: v for k, v in given.items() if v is not None}
        reporter = BatchReporter(quiet=mode.quiet, show_progress=mode.progress)
        batch_mod.plan(items, out_dir, defaults, seed, 1)  # every item is valid before a worker starts
        emit = (lambda line: print(json.dumps(line, sort_keys=True), flush=True)) if mode.json_mode else \
            (lambda line: print(line["path"], flush=True) if line["status"] == "done" else None)
        with workers.runtime_for_command() as runtime:
            summary = batch_mod.run(items, out_dir.absolute(), runtime, reporter,
                                    emit, defaults=defaults, base_seed=seed, pack=pack, gpus=pool.gpus,
                                    workers=pool.workers_n, depth=depth,
                                    overwrite=overwrite, force=workers.force, timeouts=timeouts, explicit=explicit)
        reporter.status(f"batch: {summary.done} done, {summary.failed} failed, "
                        f"{summary.skipped} skipped (done earlier) "
                        f"of {summary.total}; manifest: {out_dir.absolute() / batch_mod.MANIFEST}")
        full = [f for f in summary.failures if f["error"].get("code") == "disk_full"]
        if full:
            raise ImagegenError("disk_full", f"{len(full)} image(s) could not be written: {out_dir.absolute()} "
                                f"is full ({full[0]['error']['message']})",
                                hint=f"Free space in {out_dir.absolute()} (or choose another -o), then run the same "
                                     "command again: finished images are kept and the rest resume.",
                                failed=summary.failed, done=summary.done)
        if summary.failed:
            first = summary.failures[0]
            raise ImagegenError("jobs_failed", f"{summary.failed} image(s) failed, "
                                f"e.g. line {first['line']}: {first['error']['message']}",
                                failed=summary.failed, done=summary.done)

    run_guarded(mode.json_mode, mode.debug, body)


app.command("upscale")(upscale_command)
app.command("run")(run_command)
for _info in [*app.registered_commands, *(c for g in app.registered_groups if g.typer_instance
                                          for c in g.typer_instance.registered_commands)]:
    if _info.cls in (None, typer.core.TyperCommand):  # --help lists each command's options by section
        _info.cls = GroupedHelp


@app.command()
def workers(runtime: RuntimeOpt = "auto", hosts: HostsOpt = None, json_mode: JsonOpt = False,
            debug: DebugOpt = False) -> None:
    """List running workers: device, model last used, idle time, address."""

    def body() -> None:
        from imagegen.runtimes.choose import runtimes_here

        here = runtimes_here(runtime, hosts=hosts)  # auto: every runtime here; --hosts: every host
        found = [item for each in here for item in each.workers()]
        nodes = [node for each in here if hasattr(each, "cluster") for node in each.cluster()]  # a Ray cluster
        if json_mode:
            for node in nodes:
                print(json.dumps({"schema": "imagegen.cluster_node/1", **node}))
            for item in found:
                print(json.dumps({"schema": "imagegen.worker/1", **item}))
            return
        for node in nodes:
            memory = f"{node['gpu_memory_mib'] / 1024:.1f} GiB each" if node.get("gpu_memory_mib") else "memory: -"
            print(f"node {node['address']} ({node['node_id'][:8]})\t{node['gpus']} GPU(s), {memory}\t"
                  f"auth={'token' if node.get('auth') else 'NONE'}\tmodels={','.join(node['models']) or '-'}\t"
                  f"workers={len(node['workers'])}\tworkers_as={(node.get('worker_mode') or {}).get('mode', '-')}"
                  + (f"\terror={node['error']}" if node.get("error") else ""))
        if not found:
            print("no workers running", file=sys.stderr)
        for item in found:
            gpu = item.get("gpu") or {}
            memory = (f"{gpu['memory_free_mib'] / 1024:.1f}/{gpu['memory_total_mib'] / 1024:.1f} GiB free"
                      if gpu.get("memory_total_mib") else "-")
            speed = f"{item['it_per_s']:.2f} it/s" if item.get("it_per_s") else "-"
            health = "healthy" if item.get("healthy", True) else "UNHEALTHY"
            print(f"{item['name']}\t{gpu.get('name') or item['device']}\t{memory}\t{health}\t{speed}\t{item['url']}\t"
                  f"model={item.get('last_model') or '-'}\tidle={item.get('idle_seconds')}s\t"
                  f"jobs={item.get('jobs_done')}")

    run_guarded(json_mode, debug, body)


@app.command()
def stop(
    names: Annotated[list[str] | None, typer.Argument(
        help="Workers to stop, by the name `imagegen workers` shows (all when omitted).")] = None,
    all_workers: Annotated[bool, typer.Option(
        "--all", help="Stop every worker of the runtime(s), as when no NAME is given.")] = False,
    runtime: RuntimeOpt = "auto",
    hosts: HostsOpt = None,
    json_mode: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Stop warm workers now instead of waiting for their keep-warm time to pass."""

    def body() -> None:
        from imagegen.runtimes.choose import runtimes_here

        if names and all_workers:
            raise ImagegenError("usage_error", "give worker names or --all, not both",
                                hint="imagegen stop --all, or: imagegen stop NAME (names from `imagegen workers`)")
        here = runtimes_here(runtime, hosts=hosts)  # auto: every runtime here; --hosts: every host
        if not names:
            stopped = [name for each in here for name in each.stop()]
        else:
            found = {item["name"]: (each, item["slot"]) for each in here for item in each.workers()}
            unknown = [name for name in names if name not in found]
            if unknown:
                raise ImagegenError("invalid_argument", f"no worker named {', '.join(map(repr, unknown))}",
                                    hint="Known: " + (", ".join(sorted(found)) or "none (no workers running)"))
            stopped = [name for wanted in dict.fromkeys(names) for name in found[wanted][0].stop(found[wanted][1])]
        if json_mode:
            print(json.dumps({"schema": "imagegen.stopped/1", "stopped": stopped}))
        else:
            print(f"stopped {len(stopped)} worker(s)" + (f": {', '.join(stopped)}" if stopped else ""), file=sys.stderr)

    run_guarded(json_mode, debug, body)


@app.command()
def mcp(runtime: RuntimeOpt = "auto", keep_warm: KeepWarmOpt = 300.0, debug: DebugOpt = False) -> None:
    """Serve generate_image, batch, list_models, the funnel tools and upscale_image: an MCP server on stdio."""

    def body() -> None:
        from imagegen.mcp.server import serve

        serve(runtime, keep_warm)

    run_guarded(False, debug, body)


@app.command()
def schema(
    name: Annotated[str | None, typer.Argument(
        help="One schema, e.g. imagegen.result/1 or result (all when omitted).")] = None,
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
def doctor(runtime: RuntimeOpt = "auto", hosts: HostsOpt = None, json_mode: JsonOpt = False,
           debug: DebugOpt = False) -> None:
    """Check Docker, the NVIDIA runtime, GPUs, the image, the cache and free disk; say how to fix each problem.
    With --hosts: each host too (SSH, its engine, NVIDIA runtime, GPUs, the image, free disk)."""

    def body() -> None:
        from imagegen.cli.doctor import run_checks
        from imagegen.runtimes.docker_hosts import LOCAL, host_names
        from imagegen.runtimes.host_checks import host_checks

        names = host_names(hosts)
        checks = run_checks() if not names or LOCAL in names else []
        for name in names:
            checks += host_checks(name)
        if runtime == "ray":
            from imagegen.runtimes.ray_doctor import doctor_checks

            checks += doctor_checks()
        for check in checks:
            if json_mode:
                print(json.dumps({"schema": "imagegen.check/1", **check}))
            else:
                mark = "ok  " if check["ok"] else ("warn" if check.get("optional") else "FAIL")
                fix = f"\n       fix: {check['fix']}" if not check["ok"] and check.get("fix") else ""
                where = f"{check['host']}: " if check.get("host") else ""
                print(f"[{mark}] {where}{check['check']}: {check['detail']}{fix}")
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


def _just_the_command(args: list[str]) -> tuple[typer.Typer, str, list[str]]:
    """The light path of a one-shot call: `imagegen generate ...` builds the click command of
    `generate` alone (building all of them parses every command's signature), with the same
    options, help and errors. Anything else goes through the whole tree."""
    settings: dict[str, Any] = {"add_completion": False, "pretty_exceptions_enable": False, "rich_markup_mode": None}
    name = args[0] if args else ""
    for info in app.registered_commands:
        callback_name = info.callback.__name__ if info.callback else ""
        if (info.name or callback_name.lower().replace("_", "-")) == name:
            single = typer.Typer(**settings)
            single.registered_commands.append(info)
            return single, f"imagegen {name}", args[1:]
    for group in app.registered_groups:
        if group.name == name:
            holder = typer.Typer(**settings)
            holder.registered_groups.append(group)
            return holder, "imagegen", args
    return app, "imagegen", args


def _quietly_closed() -> int:
    """Exit 141 without "Exception ignored" at interpreter exit: the closed streams point at /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    """The `imagegen` command. Usage errors (a bad value, an unknown option, a missing argument) keep
    the error contract too: `error:`/`hint:` lines, or with --json anywhere the JSON error object; exit 2."""
    _interrupt_on_sigterm()  # `kill` cleans up like Ctrl-C does
    args = sys.argv[1:] if argv is None else list(argv)
    target, prog_name, rest = _just_the_command(args)
    try:
        code = target(args=rest, prog_name=prog_name, standalone_mode=False)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        return 1
    except typer.TyperException as exc:  # Click's usage errors (UsageError, BadParameter, ...)
        if getattr(exc, "exit_code", 1) != 2:
            raise
        try:
            return usage_failure(exc, "--json" in args)
        except BrokenPipeError:  # `imagegen models 2>&1 | head -1`: the help's reader left
            return _quietly_closed()
    except BrokenPipeError:  # help or usage text to a reader that left
        return _quietly_closed()
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    return code if isinstance(code, int) else 0
