"""`imagegen batch`: many prompts over every worker, with a manifest that makes reruns resume.

Input: one prompt per line, or JSONL objects with per-item overrides
  {"prompt": "...", "model": "sdxl", "seed": 7, "size": "768x512", "steps": 30, "cfg": 6,
   "negative": "...", "count": 4, "output": "castle.png", "sampler": "...", "scheduler": "...", "guidance": 3.5,
   "image": "in.png", "mask": "mask.png", "mask_grow": 8, "denoise": 0.6}  (image/mask: relative to the file)
Blank lines and lines starting with # are skipped; each line is read with a bound (MAX_LINE_CHARS).
Output: a directory with the images (an `output` is a plain file name in it) and manifest.jsonl, one
line per finished (or failed) image, appended atomically as it happens (engine/manifest.py). The run
holds .imagegen-batch.lock in the directory: a second batch there stops at once with output_busy.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from imagegen.comfy import png
from imagegen.comfy.client import Timeouts
from imagegen.engine import addons, generate, hires, inputs, output, render, workflow_items
from imagegen.engine.manifest import MANIFEST, Manifest, lock_folder  # noqa: F401  (MANIFEST: re-exported)
from imagegen.engine.scheduler import Job, Outcome
from imagegen.models import cache
from imagegen.models.registry import Registry
from imagegen.util import files
from imagegen.util.errors import ImagegenError

LOCK = ".imagegen-batch.lock"               # held for the whole run: one batch per output folder
# The longest line a valid item can need: a prompt and a negative prompt at the limit, every character
# \u-escaped (json.dumps' default), plus the other fields. Reading stops there, not at the end of the line.
MAX_LINE_CHARS = 2 * 6 * generate.MAX_PROMPT_CHARS + 4096
MANIFEST_SCHEMA = "imagegen.manifest/1"
ITEM_KEYS = {"prompt", "model", "seed", "size", "steps", "cfg", "negative", "count", "output", "sampler",
             "scheduler", "guidance", "checkpoint", "fast", "hires", "loras", "controls", "control_preprocess",
             "image", "mask", "mask_grow", "denoise", "extend"}
INPUT_PATHS = ("image", "mask")  # relative paths are relative to the prompts file's folder (LoRA/ControlNet too)


@dataclass
class Item:
    line: int
    fields: dict
    folder: Path | None = None  # relative paths are relative to it (the prompts file's; None: the current one)


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)


def parse_items(text: str, source: str = "stdin") -> list[Item]:
    return read_items(io.StringIO(text), source)


def _lines(stream, source: str):
    """(number, line) from a text stream, each read with a bound: a line longer than any valid item
    is refused as soon as that much of it has been read, never read whole into memory."""
    number = 0
    while True:
        try:
            raw = stream.readline(MAX_LINE_CHARS + 2)  # room for the "\r\n" of a line at the bound
        except (UnicodeDecodeError, ValueError):
            raise ImagegenError("invalid_argument", f"{source} line {number + 1}: not UTF-8 text",
                                hint="Save the prompts file as UTF-8.") from None
        if not raw:
            return
        number += 1
        line = raw.rstrip("\r\n")
        if len(line) > MAX_LINE_CHARS:
            raise ImagegenError("invalid_prompt", f"{source} line {number}: longer than {MAX_LINE_CHARS} characters "
                                f"(a prompt may have at most {generate.MAX_PROMPT_CHARS})",
                                hint="Shorten the prompt on that line; put one prompt per line.")
        yield number, line


def read_items(stream, source: str = "stdin", folder: Path | None = None) -> list[Item]:
    """The items of a prompts file or stdin, read line by line (see _lines). An item's image and mask
    paths are relative to `folder` (the prompts file's; the current one for stdin)."""
    items = []
    registry: Registry | None = None
    for number, raw in _lines(stream, source):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ImagegenError("invalid_argument", f"{source} line {number}: not valid JSON ({exc.msg})",
                                    hint='Each JSONL line must be one JSON object, e.g. {"prompt": "a fox", "seed": 3}.'
                                    ) from None
            if not isinstance(fields, dict) or not (isinstance(fields.get("prompt"), str) or "workflow" in fields):
                raise ImagegenError("invalid_prompt", f"{source} line {number}: a JSON item needs a \"prompt\" string "
                                    "(or a \"workflow\" file)")
            unknown = set() if "workflow" in fields else set(fields) - ITEM_KEYS  # workflow items: workflow_items
            if unknown:
                raise ImagegenError("invalid_argument",
                                    f"{source} line {number}: unknown field(s) {', '.join(sorted(unknown))}",
                                    hint=f"Known fields: {', '.join(sorted(ITEM_KEYS))}.")
            for key in INPUT_PATHS:
                if isinstance(fields.get(key), str) and folder is not None:
                    fields[key] = str(folder / Path(fields[key]).expanduser())
            if folder is not None and (fields.get("loras") or fields.get("controls")):  # their files too
                registry = registry or Registry.load()
                fields["loras"], fields["controls"] = addons.anchored(fields.get("loras"), fields.get("controls"),
                                                                      folder, registry)
        else:
            fields = {"prompt": line}
        items.append(Item(number, fields, folder))
    if not items:
        raise ImagegenError("invalid_prompt", f"no prompts in {source}",
                            hint="Give one prompt per line, or JSONL objects.")
    return items


def safe_name(name: str, where: str) -> str:
    """An output name from the input: a plain file name, never a path."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
            or name.startswith(".") or "\0" in name or len(name) > 200:
        raise ImagegenError("invalid_argument",
                            f"{where}: output name {name!r} must be a plain file name (no directories, no leading dot)")
    return name if name.lower().endswith(".png") else name + ".png"


def _stable_seed(prompt: str, line: int, base: int) -> int:
    digest = hashlib.sha256(f"{base}|{line}|{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def plan(items: list[Item], out_dir: Path, defaults: dict, base_seed: int, pack: int,
         registry: Registry | None = None) -> list[Job]:
    """Every job of the batch, validated before anything starts. Seeds never depend on chance, so a
    rerun of the same input plans the same jobs and can skip those already done."""
    registry = registry or Registry.load()
    jobs: list[Job] = []
    names: set[str] = set()
    root = out_dir.resolve()
    loaded: dict = {}  # workflow files read so far
    for item in items:
        where = f"line {item.line}"
        if "workflow" in item.fields:  # a user's own graph (engine/workflow_items.py)
            jobs += workflow_items.plan_item(item.fields, item.line, out_dir, base_seed, names, loaded, safe_name,
                                             folder=item.folder)
            continue
        fields = {**defaults, **{k: v for k, v in item.fields.items() if v is not None}}
        count = fields.pop("count", 1)
        name = fields.pop("output", None)
        checkpoint = fields.pop("checkpoint", None)
        if item.fields.get("model") and "checkpoint" not in item.fields:
            checkpoint = None  # an item naming a model wins over the batch's default checkpoint
        if fields.get("seed") is None:
            fields["seed"] = _stable_seed(fields["prompt"], item.line, base_seed)
        if not isinstance(fields.get("fast", False), bool):
            raise ImagegenError("invalid_argument", f"{where}: fast must be true or false, not {fields['fast']!r}")
        try:
            keys = ("prompt", "model", "negative", "seed", "steps", "cfg", "size", "sampler", "scheduler", "guidance",
                    "image", "mask", "mask_grow", "denoise", "extend")
            given: dict[str, Any] = {k: fields.get(k) for k in keys}
            request = generate.Request(**given,
                                       checkpoint=Path(checkpoint) if checkpoint else None, count=count,
                                       fast=fields.get("fast", False),
                                       hires=hires.from_item(fields.get("hires"), where))
            bundle = generate.resolve_bundle(request, registry)
            chosen = addons.choose(generate.check_prompt(request.prompt), _listed(fields, "loras", where),
                                   _listed(fields, "controls", where), fields.get("control_preprocess"), bundle,
                                   registry)
            params_list = generate.plan_jobs(request, bundle, chosen)
        except ImagegenError as error:
            error.message = f"{where}: {error.message}"
            raise
        except TypeError as exc:
            raise ImagegenError("invalid_argument", f"{where}: a field has the wrong type ({exc})") from None
        stem = safe_name(name, where)[:-4] if name else None
        for start in range(0, len(params_list), pack):
            group = params_list[start:start + pack]
            targets = []
            for index, params in enumerate(group, start=start):
                file = (f"{stem}.png" if count == 1 else f"{stem}-{index + 1}.png") if stem else \
                    f"{item.line:04d}-{output.slugify(params.prompt, 32)}-{params.seed}.png"
                if file in names:
                    raise ImagegenError("invalid_argument", f"{where}: output name {file} is used twice in this batch")
                names.add(file)
                if (out_dir / file).resolve().parent != root:  # a link in the folder that leads out of it
                    raise ImagegenError("invalid_argument",
                                        f"{where}: output {out_dir / file} is a link that leads outside {out_dir}",
                                        hint="Remove the link, or choose another -o directory.")
                targets.append(out_dir / file)
            params = replace(group[0], batch_size=len(group))
            # fast: how, not what
            settings = {k: v for k, v in params.to_dict().items() if k not in ("filename_prefix", "fast")}
            settings["sources"] = {role: source["sha256"] for role, source in params.sources.items()}  # content
            identity = json.dumps({"line": item.line, "start": start, "bundle": bundle.name, **settings},
                                  sort_keys=True)
            key = f"{item.line}:{start}:{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
            jobs.append(Job(key=key, bundle=bundle, params=params, targets=targets,
                            meta={"line": item.line, "index": start, "item": item.fields},
                            inputs={**inputs.job_files(params.sources), **addons.job_files(params)},
                            addons=chosen.bundles))
    return jobs


def manifest_lines(outcome: Outcome) -> list[dict]:
    job = outcome.job
    base = {"schema": MANIFEST_SCHEMA, "key": job.key, "line": job.meta["line"], "attempts": job.attempts,
            "worker": outcome.worker}
    if outcome.error is None:
        return [{**record, **base, "status": "done", "index": job.meta["index"] + offset}
                for offset, record in enumerate(outcome.records)]
    return [{**base, "status": "failed", "index": job.meta["index"] + offset, "path": str(target),
             "prompt": job.params.prompt, "model": job.bundle.name, "seed": job.params.seed,
             "error": {"code": outcome.error.code, "message": outcome.error.message, "hint": outcome.error.hint}}
            for offset, target in enumerate(job.targets)]


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ImagegenError("output_not_writable", f"{out_dir} is a file; batch needs a directory")
    problem = files.probe_writable(out_dir)  # os.access is not proof: /proc, read-only mounts, ACLs
    if problem is not None:
        raise ImagegenError("output_not_writable", f"cannot create files in {files.nearest_existing_parent(out_dir)}: "
                            f"{problem.strerror or problem}", hint="Choose an -o folder that is writable.")


def _listed(fields: dict, key: str, where: str) -> list | None:
    value = fields.get(key)
    if value is not None and not isinstance(value, list):
        raise ImagegenError("invalid_argument", f"{where}: {key} must be a list, not {value!r}",
                            hint='For example "loras": ["style:0.8"] or "controls": [{"model": "canny-sd15", '
                                 '"image": "edges.png"}].')
    return value


def local_dirs(jobs: list[Job]) -> set[str]:
    dirs: set[str] = set()
    for job in jobs:
        dirs |= generate.local_dirs(job.bundle) | addons.local_files(job.addons)
    for upscaler in hires.model_bundles([job.params for job in jobs]):
        dirs |= generate.local_dirs(upscaler)
    return dirs


def prepare_models(jobs: list[Job], fetch, runtime=None) -> dict[str, dict]:
    """Fetch each model once (not once per worker) and hash its files for the images' provenance."""
    hashes = {}
    loaded: set[str] = set()
    for job in jobs:
        if job.bundle.name not in hashes:
            generate.make_loadable(job.bundle, runtime, fetch)
            hashes[job.bundle.name] = cache.file_hashes(job.bundle)
        for extra in job.addons:  # its LoRAs and ControlNets, each file once
            file = next(iter(extra.files.values())).filename
            if file not in loaded:
                generate.make_loadable(extra, runtime, fetch)
                loaded.add(file)
        job.params = addons.hashed(job.params, job.addons)
    for upscaler in hires.model_bundles([job.params for job in jobs]):  # what --hires-model passes load
        generate.make_loadable(upscaler, runtime, fetch)
    return hashes


def slots_for(runtime, slots: list[str], jobs: list[Job]) -> list[str]:
    """At most one slot per job, those of hosts that hold the jobs' models first (Docker over SSH)."""
    holding_first = getattr(runtime, "holding_first", None)
    return (holding_first(slots) if holding_first else slots)[: len(jobs)]


PACK_RE = re.compile(r"^(auto|\d+)$")


def pack_size(choice: str, slots: list[str]) -> int:
    """Images of one item rendered as one latent batch: worth it on GPUs, not on CPUs."""
    from imagegen.runtimes.base import is_cpu_slot

    if not PACK_RE.match(choice or ""):
        raise ImagegenError("invalid_argument", f"--pack {choice!r}: give auto or a number of images")
    if choice == "auto":
        return 1 if all(is_cpu_slot(slot) for slot in slots) else 4
    return max(1, min(int(choice), 64))


def _ours(path: Path, job: Job) -> bool:
    """An image at a target path that this very job wrote (its manifest line was lost in a crash)."""
    try:
        record = json.loads(png.read_text_chunks(path.read_bytes()).get("imagegen", "{}"))
    except (OSError, ValueError):
        return False
    theirs = (record.get("prompt"), record.get("model"), record.get("seed"))
    return theirs == (job.params.prompt, job.bundle.name, job.params.seed)


def run(items: list[Item], out_dir: Path, runtime, reporter, emit, *, defaults: dict, base_seed: int, pack: str,
        gpus: str | None, workers: int, depth: int, overwrite: bool, timeouts, explicit: set[str], fetch=None,
        force: bool = False) -> Summary:
    """Plan, lock the folder, skip what an earlier run finished, fetch each model once, and fan the rest out."""
    check_out_dir(out_dir)
    slots = runtime.slots(gpus, cpu_workers=workers)
    jobs = plan(items, out_dir, defaults, base_seed, pack_size(pack, slots))
    lock = lock_folder(out_dir, LOCK, "Another imagegen batch is writing there: wait for it to finish, "
                                      "or choose another -o directory.")
    try:
        return _run_locked(jobs, out_dir, runtime, reporter, emit, slots, depth=depth, overwrite=overwrite,
                           timeouts=timeouts, explicit=explicit, fetch=fetch, force=force)
    finally:
        lock.release()


def _run_locked(jobs: list[Job], out_dir: Path, runtime, reporter, emit, slots, *, depth, overwrite, timeouts, explicit,
                fetch, force) -> Summary:
    from imagegen.engine.scheduler import Scheduler
    from imagegen.models.fetch import make_fetcher

    manifest = Manifest(out_dir)
    records = manifest.read()
    if manifest.warning():
        reporter.status(manifest.warning())
    finished = manifest.finished(records, jobs)
    todo = [job for job in jobs if job.key not in finished]
    summary = Summary(total=sum(len(j.targets) for j in jobs),
                      skipped=sum(len(j.targets) for j in jobs if j.key in finished))
    if not overwrite:
        clashes = [t for job in todo for t in job.targets if t.exists() and not _ours(t, job)]
        if clashes:
            raise ImagegenError("output_exists", f"{len(clashes)} output file(s) exist already and are not from this "
                                                 f"batch, e.g. {clashes[0]}",
                                hint="Pass --overwrite, or choose another -o directory.")
    manifest.compact(records, jobs, finished)
    reporter.start(summary.total, summary.skipped)
    if not todo:
        return summary
    generate.check_fast_toolchain(runtime, any(job.params.fast for job in todo))
    hashes = prepare_models(todo, fetch or make_fetcher(reporter), runtime)

    def budgets(job: Job, state) -> Timeouts:
        resident = state.last_bundle == job.bundle.name
        return render.job_budgets(job.bundle, job.params, state.handle.device, resident, timeouts, explicit)

    def on_outcome(outcome: Outcome) -> None:
        lines = manifest_lines(outcome)
        manifest.append(lines)
        summary.total += max(0, len(lines) - len(outcome.job.targets))  # a workflow saved more than it planned
        if outcome.error is None:
            summary.done += len(lines)
        else:
            summary.failed += len(lines)
            summary.failures += lines
        reporter.finished(len(lines), failed=outcome.error is not None)
        for line in lines:
            emit(line)

    scheduler = Scheduler(runtime, slots_for(runtime, slots, todo), todo, on_outcome, budgets, hashes, local_dirs(todo),
                          overwrite=True, depth=depth, reporter=reporter, registry=Registry.load(), force=force)
    reporter.attach(scheduler.workers)
    try:
        scheduler.run()
    finally:
        reporter.close()
    return summary
