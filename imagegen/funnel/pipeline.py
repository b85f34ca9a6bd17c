"""`imagegen funnel`: progressive refinement, from many fast drafts to one final image.

Stages, by default: 20 SD1.5 drafts at 512x512 -> keep 8 -> SDXL img2img refine at 1024x1024
(denoise 0.55) -> keep 3 -> polish (img2img at denoise 0.3 with more steps: flux-dev when all its
files are in the cache, else SDXL) -> keep 1 -> upscale x2 with realesrgan-x4. Each stage fans out
over every worker (the batch Scheduler), writes its images and a numbered contact sheet into
FUNNEL_DIR/stage-N-NAME/, and records everything in FUNNEL_DIR/funnel.json, rewritten atomically
after every change: a funnel interrupted at any point resumes with `imagegen funnel resume DIR`.
docs/funnel.md describes the stage file, the picking rules and the state file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from imagegen.comfy import workflows
from imagegen.engine import addons, batch, generate, render
from imagegen.funnel import contact_sheet, vary
from imagegen.funnel import loras as lora_plan
from imagegen.funnel import state as state_file
from imagegen.funnel.stages import resolve, stage_request
from imagegen.funnel.state import SCHEMA, STATE_FILE, Funnel  # noqa: F401  (re-exported)
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError

STATUS_SCHEMA = "imagegen.funnel_status/1"   # the line --json prints when a funnel stops or ends
SHEET = "sheet.png"
SCORER_ENV = "IMAGEGEN_FUNNEL_SCORER"
DEFAULT_DENOISE = 0.5


def status_record(funnel: Funnel) -> dict:
    """Where the funnel stands, and the command that continues it."""
    step, root = funnel.next_step(), funnel.root
    status = {"pick": "awaiting_pick", "render": "incomplete"}.get(step["action"], "done")
    record: dict[str, Any] = {"schema": STATUS_SCHEMA, "dir": str(root), "status": status, "next": step,
                              "command": None}
    if step["action"] == "pick":
        stage = funnel.record(step["stage"])
        record.update(stage=step["stage"], sheet=str(root / stage["sheet"]) if stage["sheet"] else None,
                      keep=step["keep"],
                      choices=[image["index"] for image in stage["images"] if funnel.done(image)])
        example = ",".join(str(i) for i in record["choices"][: step["keep"]])
        record["command"] = f"imagegen funnel resume {shlex.quote(str(root))} --pick {example}"
    elif step["action"] == "render":
        record.update(stage=step["stage"], command=f"imagegen funnel resume {shlex.quote(str(root))}")
    else:
        last = funnel.data["stages"][-1]
        record.update(final=[str(root / image["path"]) for image in last["images"]],
                      sheet=str(root / last["sheet"]) if last["sheet"] else None)
    return record


# --- picking --------------------------------------------------------------------------------
def parse_picks(text: str, choices: list[int], sheet: str | None) -> list[int]:
    """'3,7' or '3 7': 1-based indices into the stage's contact sheet."""
    try:
        picks = [int(item) for item in re.split(r"[,\s]+", text.strip()) if item]
    except ValueError:
        picks = []
    bad = [p for p in picks if p not in choices]
    if not picks or bad or len(set(picks)) != len(picks):
        why = f"{', '.join(map(str, bad))} not on the sheet" if bad else "give distinct numbers like 3,7"
        raise ImagegenError("invalid_argument",
                            f"pick {text.strip()!r}: {why} (choices: {', '.join(map(str, choices))})",
                            hint=f"Pick by the numbers on the contact sheet{': ' + sheet if sheet else ''}.")
    return picks


def auto_pick(prompt: str, images: list[tuple[int, Path]], keep: int, reporter) -> list[int]:
    """The --auto rule: rank by a configured scorer's prompt-image similarity, else keep the first N."""
    command = os.environ.get(SCORER_ENV)
    if not command:
        chosen = [index for index, _ in images[:keep]]
        reporter.status(f"--auto: no CLIP-similarity scorer is configured ({SCORER_ENV}), "
                        f"so it keeps the first {keep}: "
                        f"{', '.join(map(str, chosen))}")
        return chosen
    payload = json.dumps({"prompt": prompt, "images": [str(path) for _, path in images]})
    try:
        done = subprocess.run(shlex.split(command), input=payload, capture_output=True, text=True, timeout=600)
        scores = [float(line) for line in done.stdout.split()]
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise ImagegenError("invalid_argument", f"{SCORER_ENV} ({command}) failed: {exc}",
                            hint=f"Fix the scorer, or unset {SCORER_ENV}.") from None
    if done.returncode != 0 or len(scores) != len(images):
        raise ImagegenError("invalid_argument", f"{SCORER_ENV} ({command}) exited {done.returncode} with "
                            f"{len(scores)} score(s) for {len(images)} image(s): {done.stderr.strip()[-300:]}",
                            hint='The scorer reads {"prompt", "images"} JSON on stdin and prints one number per image.')
    ranked = sorted(zip(scores, [index for index, _ in images], strict=True), key=lambda pair: (-pair[0], pair[1]))
    chosen = sorted(index for _, index in ranked[:keep])
    reporter.status(f"--auto: kept {', '.join(map(str, chosen))} (highest scores from {SCORER_ENV})")
    return chosen


def ask(choices: list[int], keep: int, sheet: str, stdin, stderr) -> list[int] | None:
    """Ask on the terminal; None when the person stops (q or end of input)."""
    default = ",".join(map(str, choices[:keep]))
    while True:
        stderr.write(f"contact sheet: {sheet}\npick {keep} of {len(choices)} "
                     f"(e.g. {default}; Enter = {default}; q = stop here): ")
        stderr.flush()
        line = stdin.readline()
        if not line or line.strip().lower() in ("q", "quit"):
            return None
        try:
            return parse_picks(line if line.strip() else default, choices, sheet)
        except ImagegenError as error:
            stderr.write(f"{error.message}\n")


# --- running --------------------------------------------------------------------------------
@dataclass
class Options:
    gpus: str | None = None
    workers: int = 1
    depth: int = 2
    timeouts: object = None
    explicit: frozenset = frozenset()
    force: bool = False             # run jobs that look too large for every GPU's memory
    fast: bool = False              # fast mode for the drawing stages (workflows.compiled)
    picks: tuple[str, ...] = ()     # applied to the next selections, in order
    vary: int = 0                   # variations of each image of the next selection (funnel/vary.py), then unset
    vary_denoise: float | None = None
    auto: bool = False
    interactive: bool = False


def missing_source(funnel: Funnel, number: int, image: dict, source: dict) -> ImagegenError:
    """A picked image of the stage before that is gone from disk: this image fails up front, the others go on."""
    return ImagegenError("source_missing", f"its source, stage {number - 1} image #{source['index']} "
                         f"({funnel.path(source)}), is gone from disk",
                         hint=f"Run `imagegen funnel resume {shlex.quote(str(funnel.root))}`: it draws stage "
                              f"{number - 1} #{source['index']} again (same seed), "
                              f"then stage {number} #{image['index']}.")


def stage_jobs(funnel: Funnel, number: int, registry: Registry, fast: bool = False) -> list:
    """The stage's unfinished images as jobs. An image whose source is gone is marked failed
    (source_missing) here, before anything is submitted."""
    from imagegen.engine.scheduler import Job

    stage, record = funnel.stage(number), funnel.record(number)
    bundle = resolve(stage.model, registry)
    chosen = None if bundle.family == "upscale" else addons.choose(  # the stage's LoRAs (funnel/loras.py)
        funnel.data["prompt"], record.get("loras") or [], None, None, bundle, registry, where=f"stage {number}")
    previous = {image["index"]: image for image in funnel.record(number - 1)["images"]} if number > 1 else {}
    prompt, negative = funnel.data["prompt"], funnel.data["negative"]
    jobs = []
    for image in record["images"]:
        if funnel.done(image):
            continue
        source = previous.get(image["source"])
        if source is not None and not funnel.done(source):
            error = missing_source(funnel, number, image, source)
            image.update(status="failed", error={"code": error.code, "message": error.message, "hint": error.hint})
            continue
        if image.get("copy") and source is not None:  # a variations stage shows the pick itself first: copied
            vary.copy_pick(funnel, image, source)
            continue
        if bundle.family == "upscale":
            if source is None:  # only a hand-edited funnel.json has an upscaler first
                raise ImagegenError("invalid_funnel_state", f"{funnel.root / STATE_FILE}: stage {number} upscales, "
                                                            "but there is no stage before it to take images from")
            factor = stage.scale or 0
            params = workflows.Params(prompt=prompt, width=source["width"] * factor, height=source["height"] * factor,
                                      steps=1, cfg=1.0, sampler="euler", scheduler="normal", seed=image["seed"],
                                      filename_prefix=f"imagegen/funnel-{number}-{image['index']}")
        else:
            request = stage_request(stage, prompt, image["seed"], negative)
            params = replace(generate.plan_jobs(request, bundle, chosen)[0], fast=fast)
            if source is not None:
                params = replace(params, denoise=stage.denoise or bundle.default("denoise", DEFAULT_DENOISE))
        # quality: refine and polish go to the soonest finisher
        jobs.append(Job(key=f"{number}:{image['index']}", bundle=bundle, params=params, targets=[funnel.path(image)],
                        meta={"stage": number, "index": image["index"]},
                        inputs={"init_image": funnel.path(source)} if source else {},
                        quality=source is not None and bundle.family != "upscale",
                        addons=chosen.bundles if chosen else []))
    return jobs


def render_stage(funnel: Funnel, number: int, runtime, reporter, emit, options: Options, started: set,
                 fetch=None) -> None:
    from imagegen.engine.scheduler import Scheduler
    from imagegen.models.fetch import make_fetcher

    registry = Registry.load()
    if funnel.record(number).get("vary") and not funnel.record(number)["images"]:
        funnel.record(number)["images"] = vary.plan(funnel, number)
    funnel.plan_images(number)
    funnel.save()
    record, stage = funnel.record(number), funnel.stage(number)
    for note in lora_plan.notes(record, number, resolve(stage.model, registry).family):
        reporter.warn(note)
    jobs = stage_jobs(funnel, number, registry, options.fast)
    copies = sum(bool(image.get("copy")) for image in record["images"])  # a variations stage's picks, copied
    total = len(record["images"]) - copies
    earlier = sum(funnel.done(image) and not image.get("copy") for image in record["images"])
    reporter.status(f"stage {number}/{len(funnel.data['stages'])} {stage.name}: {total} image(s) with {stage.model}"
                    + (f" beside the {copies} pick(s) themselves" if copies else "")
                    + (f", {earlier} done earlier" if earlier else ""))
    if jobs:
        slots = runtime.slots(options.gpus, cpu_workers=options.workers)
        generate.check_fast_toolchain(runtime, options.fast)
        hashes = batch.prepare_models(jobs, fetch or make_fetcher(reporter), runtime)  # remote: nothing fetched here

        def budgets(job, state):
            resident = state.last_bundle == job.bundle.name
            return render.job_budgets(job.bundle, job.params, state.handle.device, resident, options.timeouts,
                                      options.explicit)

        def on_outcome(outcome) -> None:
            image = record["images"][outcome.job.meta["index"] - 1]
            if outcome.error is None:
                result = outcome.records[0]
                image.update(status="done", width=result["width"], height=result["height"], worker=outcome.worker,
                             error=None)
                emit({**result, "funnel": {"dir": str(funnel.root), "stage": number, "stage_name": stage.name,
                                           "index": image["index"], "source": image["source"]}})
            else:
                image.update(status="failed", error={"code": outcome.error.code, "message": outcome.error.message})
            funnel.save()
            reporter.finished(1, failed=outcome.error is not None)

        scheduler = Scheduler(runtime, batch.slots_for(runtime, slots, jobs), jobs, on_outcome, budgets, hashes,
                              batch.local_dirs(jobs), overwrite=True, depth=options.depth, reporter=reporter,
                              registry=registry, force=options.force)
        reporter.start(total, earlier)
        reporter.attach(scheduler.workers)
        try:
            scheduler.run()
        finally:
            started.update(scheduler.started_here)
            reporter.close()
    tiles = [contact_sheet.Tile(image["index"], image["seed"], funnel.path(image),
                                "" if funnel.done(image) else image["status"]) for image in record["images"]]
    title = f"stage {number} {stage.name}: {funnel.data['prompt']}"[:120]
    contact_sheet.write(tiles, funnel.inside(f"{record['dir']}/{SHEET}", "sheet"), title)
    record["sheet"] = f"{record['dir']}/{SHEET}"
    funnel.save()
    failed = [image for image in record["images"] if not funnel.done(image)]
    if failed:
        first = failed[0].get("error") or {"message": "not written"}
        raise ImagegenError("jobs_failed", f"stage {number} ({stage.name}): {len(failed)} image(s) failed, "
                                           f"e.g. #{failed[0]['index']}: {first['message']}",
                            hint=f"Run `imagegen funnel resume {shlex.quote(str(funnel.root))}` to retry only those.",
                            failed=len(failed))


def select(funnel: Funnel, number: int, options: Options, reporter, stdin=None,
           stderr=None) -> tuple[list[int], str] | None:
    """The picks from a finished stage and how they were made, or None when nobody can pick now."""
    record = funnel.record(number)
    keep = record["keep"] or 1
    choices = [image["index"] for image in record["images"] if funnel.done(image)]
    sheet = str(funnel.inside(record["sheet"], "sheet"))
    if len(choices) <= keep:
        return choices, "all"
    if options.picks:
        text, options.picks = options.picks[0], options.picks[1:]
        return parse_picks(text, choices, sheet), "pick"
    if options.auto:
        images = [(i, funnel.path(record["images"][i - 1])) for i in choices]
        return auto_pick(funnel.data["prompt"], images, keep, reporter), "auto"
    if options.interactive:
        import sys

        picks = ask(choices, keep, sheet, stdin or sys.stdin, stderr or sys.stderr)
        return (picks, "interactive") if picks else None
    return None


def advance(funnel: Funnel, runtime, reporter, emit, options: Options, fetch=None) -> dict:
    """Render and pick until the funnel is done or needs a pick nobody gave; returns the status record."""
    started: set[str] = set()
    lock = state_file.lock(funnel.root)
    try:
        funnel.data = Funnel.load(funnel.root).data  # what the state file says now, under the lock
        while True:
            step = funnel.next_step()
            if step["action"] == "render":
                render_stage(funnel, step["stage"], runtime, reporter, emit, options, started, fetch)
            elif step["action"] == "pick":
                chosen = select(funnel, step["stage"], options, reporter)
                if chosen is None:
                    return status_record(funnel)
                record = funnel.record(step["stage"])
                record["picks"], record["picked_by"] = chosen
                funnel.save()
                kept = ("image " if len(chosen[0]) == 1 else "images ") + ", ".join(map(str, chosen[0]))
                reporter.status(f"stage {step['stage']} {step['name']}: kept {kept} ({chosen[1]})")
                if options.vary:
                    added = vary.insert(funnel, step["stage"], options.vary, options.vary_denoise)
                    reporter.status(f"stage {added} {funnel.record(added)['name']}: {options.vary} variation(s) of "
                                    f"{'each of ' if len(chosen[0]) > 1 else ''}{kept}, then a pick before stage "
                                    f"{added + 1}")
                    options.vary = 0
            else:
                return status_record(funnel)
    except KeyboardInterrupt:
        for slot in started:  # workers this command started in earlier stages; the running stage stopped its own
            runtime.stop(slot)
        raise
    finally:
        lock.release()


def summary_lines(funnel: Funnel) -> list[str]:
    """`funnel show`: one paragraph per stage, then what comes next."""
    root, data = funnel.root, funnel.data
    lines = [f"funnel {root}", f"prompt: {data['prompt']}", f"seed: {data['seed']}"]
    for number, record in enumerate(data["stages"], start=1):
        done = sum(funnel.done(image) for image in record["images"])
        settings = ", ".join(f"{key} {record[key]}" for key in ("count", "keep", "size", "steps", "denoise", "scale")
                             if record.get(key) is not None)
        lines.append(f"stage {number} {record['name']}: {record['model']} ({settings})")
        if record.get("loras") or record.get("without_loras"):
            applied = ", ".join(f"{lora_plan.label(e['name'])}:{e['strength']:g}" for e in record.get("loras") or [])
            skipped = ", ".join(lora_plan.label(e["name"]) for e in record.get("without_loras") or [])
            lines.append(f"  loras: {applied or 'none'}" + (f" (without {skipped})" if skipped else ""))
        if not record["images"]:
            lines.append("  not started")
            continue
        sheet = f"; sheet: {root / record['sheet']}" if record["sheet"] else ""
        lines.append(f"  images: {done}/{len(record['images'])} done{sheet}")
        for image in record["images"]:
            origin = f" from #{image['source']}" if image["source"] is not None else ""
            state = "done" if funnel.done(image) else image["status"]
            lines.append(f"  #{image['index']:<3} seed {image['seed']:<11} {state:<8} {root / image['path']}{origin}")
        if record["picks"] is not None:
            lines.append(f"  picked: {', '.join(map(str, record['picks']))} ({record['picked_by']})")
    status = status_record(funnel)
    if status["status"] == "done":
        lines.append("next: nothing, the funnel is done; final: " + ", ".join(status["final"]))
    elif status["status"] == "awaiting_pick":
        lines.append(f"next: pick {status['keep']} from stage {status['stage']} ({status['sheet']}): "
                     f"{status['command']}")
    else:
        lines.append(f"next: render stage {status['stage']}: {status['command']}")
    return lines
