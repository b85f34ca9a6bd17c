"""A job that runs a user's own graph (`imagegen run`, batch `workflow` items): the graph it submits, with
its uploaded inputs patched in, and how its output nodes' images are saved with their provenance."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagegen import COMFYUI_VERSION, __version__
from imagegen.comfy import png, ui_graph
from imagegen.engine import render, timings
from imagegen.util.errors import ImagegenError


@dataclass
class WorkflowJob:
    """What a Job of a user's graph carries besides its Bundle and Params (which routing and budgets read)."""
    graph: dict                              # the API graph with every --set applied (uploads by local name)
    record: dict                             # provenance: {"workflow": name, sha256, format, set, inputs}
    ui: dict | None = None                   # the user's UI graph, with the --set values written in
    uploads: dict[str, tuple[str, str]] = field(default_factory=dict)  # Job.inputs key -> (node id, input)


def graph_for(work: WorkflowJob, uploaded: dict[str, str]) -> dict:
    """The graph to submit: each uploaded input's name in the worker's input folder patched in."""
    graph = copy.deepcopy(work.graph)
    for key, name in uploaded.items():
        node_id, name_of_input = work.uploads[key]
        graph[node_id]["inputs"][name_of_input] = name
    return graph


def output_refs(entry: dict, graph_order: list[str]) -> list[dict]:
    """The images the output nodes saved, in graph order: SaveImage's (type output); previews only when
    the workflow saves nothing else. Non-PNG outputs (animations) are left on the worker."""
    outputs = entry.get("outputs") or {}
    order = [n for n in graph_order if n in outputs] + [n for n in outputs if n not in graph_order]
    refs = [ref for node_id in order for ref in (outputs[node_id] or {}).get("images", [])
            if str(ref.get("filename", "")).lower().endswith(".png")]
    saved = [ref for ref in refs if ref.get("type", "output") == "output"]
    return saved or refs


def expected_images(graph: dict) -> int:
    """How many images a graph saves at least, as far as it shows (its SaveImage nodes, times a latent batch):
    what `-o -` and the names beside `-o FILE.png` are checked against before any worker starts."""
    saves = sum(node.get("class_type") == "SaveImage" for node in graph.values())
    batch = max((n["inputs"].get("batch_size") for n in graph.values()
                 if isinstance(n.get("inputs", {}).get("batch_size"), int)), default=1)
    return saves * max(1, batch)


def check_targets(targets: Sequence[Path | None], images: int, overwrite: bool) -> None:
    """Refuse, before anything is written, `images` images for stdout, or names beside the first (NAME-2.png,
    ...) that exist already."""
    paths = [target_for(targets, index) for index in range(images)]  # -o -: the refusal
    existing = [path for path in paths[len(targets):] if path is not None and path.exists()]
    if existing and not overwrite:
        raise ImagegenError("output_exists", f"{existing[0]} exists already (the workflow saves {images} images: "
                            f"{paths[0].name if paths[0] else '-'} and the ones beside it)",
                            hint="Pass --overwrite, or choose another -o path (or -o DIR/).")


def target_for(targets: Sequence[Path | None], index: int) -> Path | None:
    """The path of a job's index-th image: its planned targets, then name-2.png, name-3.png, ... beside the first."""
    if index < len(targets):
        return targets[index]
    first = targets[0]
    if first is None:
        raise ImagegenError("invalid_argument", "the workflow saves several images, but -o - writes only one",
                            hint="Pass -o DIR to keep every image the workflow saves.")
    return first.with_name(f"{first.stem}-{index + 1}{first.suffix}")


def save_outputs(client, entry: dict, job, worker, overwrite: bool, hashes: dict, submitted: float,
                 learn: bool = True) -> list[dict]:
    """Fetch every image the job's output nodes saved, tag each (imagegen record, A1111 parameters, the UI
    `workflow` chunk beside ComfyUI's own `prompt` chunk) and write it atomically."""
    work: WorkflowJob = job.workflow
    refs = output_refs(entry, list(work.graph))
    if not refs:
        raise ImagegenError("execution_failed", "ComfyUI finished the workflow, but its output nodes saved no PNG "
                            "image", hint="Give the workflow a SaveImage node fed by the image you want.")
    check_targets(job.targets, len(refs), overwrite)  # before any is written
    params, phase_times = job.params, entry.get("imagegen_phase_times", {})
    if learn:
        timings.record(job.bundle.name, params.width, params.height, worker.device, phase_times, params.steps)
    record = provenance(job, hashes, client.comfyui_version())
    records = []
    for index, ref in enumerate(refs):
        target = target_for(job.targets, index)
        started = time.monotonic()
        data = client.fetch_file(ref)
        fetched = time.monotonic()
        image = {**record, "workflow": {**record["workflow"], "output_node": _node_of(entry, ref)}}
        image["width"], image["height"] = png.png_size(data)
        data = png.add_text_chunks(data, {"parameters": png.a1111_parameters(image),
                                          "imagegen": json.dumps(image, sort_keys=True),
                                          **ui_graph.workflow_chunk(data, work.ui)})
        render.write_image(data, target, overwrite)
        records.append(render.result(image, target, worker, phase_times, (started, fetched, submitted)))
    return records


def _node_of(entry: dict, ref: dict) -> str | None:
    for node_id, node_output in (entry.get("outputs") or {}).items():
        if ref in (node_output or {}).get("images", []):
            return str(node_id)
    return None


def provenance(job, hashes: dict, comfyui_version: str | None) -> dict:
    """The `imagegen` record of a workflow job's images: enough for `imagegen run --from IMAGE`."""
    params, bundle, work = job.params, job.bundle, job.workflow
    files = {role: {"name": f.filename, "sha256": hashes.get(role) or f.sha256} for role, f in bundle.files.items()}
    record: dict[str, Any] = {
        "prompt": params.prompt, "negative": params.negative, "model": bundle.name, "family": bundle.family,
        "seed": params.seed, "width": params.width, "height": params.height, "steps": params.steps,
        "cfg": params.cfg, "sampler": params.sampler, "scheduler": params.scheduler, "denoise": params.denoise,
        "imagegen_version": __version__, "comfyui_version": comfyui_version or COMFYUI_VERSION,
        "files": files, **work.record,
    }
    main = next((f["sha256"] for f in files.values() if f.get("sha256")), None)
    if main:
        record["model_hash"] = main
    return record
