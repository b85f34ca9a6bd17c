"""Batch items that run a user's own workflow: `{"workflow": "file.json", "set": {...}}` per JSONL line, with
`seed`, `count`, `output` and the well-known names (prompt, size, ...) as shorthands for `set`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from imagegen.comfy import graph_params
from imagegen.engine import output, workflow_run
from imagegen.engine.jobs import Job
from imagegen.util.errors import ImagegenError

ITEM_KEYS = {"workflow", "set", "seed", "count", "output", *graph_params.WELL_KNOWN}


def settings_of(fields: dict, where: str) -> dict:
    """The item's `set` object with the shorthand fields added (a shorthand wins over the same key in set)."""
    unknown = set(fields) - ITEM_KEYS
    if unknown:
        raise ImagegenError("invalid_argument", f"{where}: field(s) {', '.join(sorted(unknown))} do not apply to a "
                            "workflow item", hint='Set the workflow\'s inputs with "set": {"KEY": VALUE}; see '
                                                  "`imagegen run WORKFLOW --list-params`.")
    given = fields.get("set") or {}
    if not isinstance(given, dict):
        raise ImagegenError("invalid_argument", f"{where}: set must be an object of KEY: VALUE, not {given!r}",
                            hint='For example "set": {"prompt": "a fox", "3.steps": 4}.')
    shorthands = {k: v for k, v in fields.items() if k in graph_params.WELL_KNOWN and k != "seed"}
    return {**given, **shorthands}


def stable_seed(fields: dict, line: int, base: int) -> int:
    text = json.dumps({k: v for k, v in fields.items() if k not in ("count", "output")}, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(f"{base}|{line}|{text}".encode()).digest()[:4], "big")


def plan_item(fields: dict, line: int, out_dir: Path, base_seed: int, names: set[str], loaded: dict,
              safe_name: Callable[[str, str], str], local_models: bool = True, folder: Path | None = None) -> list[Job]:
    """The jobs of one workflow item (count of them, seeds seed, seed+1, ...), each with one planned target
    (`safe_name`: the batch's rule for an output name; `loaded`: workflows read so far, by path). Its paths (the
    workflow, images and model files it sets) are relative to `folder`, the prompts file's (else the current)."""
    where = f"line {line}"
    folder = (folder or Path.cwd()).absolute()
    try:
        path = folder / Path(str(fields["workflow"])).expanduser()
        if path not in loaded:
            loaded[path] = workflow_run.load(path)
        workflow = loaded[path]
        settings = settings_of(fields, where)
        count = fields.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 100:
            raise ImagegenError("invalid_argument", f"{where}: count must be 1..100, not {count!r}")
        if "seed" in graph_params.well_known(workflow.graph):
            settings["seed"] = fields["seed"] if fields.get("seed") is not None else stable_seed(fields, line,
                                                                                                 base_seed)
        jobs = workflow_run.plan_jobs(workflow, settings, count, [None] * count, local_models=local_models,
                                      key_prefix=f"{line}:", base=folder)
    except ImagegenError as error:
        error.message = f"{where}: {error.message}"
        raise
    stem = fields.get("output")
    if stem is not None:
        stem = safe_name(stem, where)[:-4]
    for index, job in enumerate(jobs):
        file = (f"{stem}.png" if count == 1 else f"{stem}-{index + 1}.png") if stem else \
            f"{line:04d}-{output.slugify(job.params.prompt or workflow.source.stem, 32)}-{job.params.seed}.png"
        if file in names:
            raise ImagegenError("invalid_argument", f"{where}: output name {file} is used twice in this batch")
        names.add(file)
        if (out_dir / file).resolve().parent != out_dir.resolve():  # a link in the folder that leads out of it
            raise ImagegenError("invalid_argument", f"{where}: output {out_dir / file} is a link that leads outside "
                                f"{out_dir}", hint="Remove the link, or choose another -o directory.")
        job.targets = [out_dir / file]
        job.meta.update(line=line, index=index, item=fields)
    return jobs
