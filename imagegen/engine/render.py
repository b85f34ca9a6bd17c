"""Render on a worker and write the results: budgets for a job, and each finished image fetched,
tagged with its parameters (PNG chunks) and written atomically."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from imagegen import COMFYUI_VERSION, __version__
from imagegen.comfy import png, workflows
from imagegen.comfy.client import Timeouts, output_images
from imagegen.engine import output, timings
from imagegen.engine.progress import Reporter
from imagegen.models import cache
from imagegen.models.registry import Bundle
from imagegen.util.errors import ImagegenError

REQUEST_TIMEOUT = float(os.environ.get("IMAGEGEN_TIMEOUT_REQUEST", "30"))


def image_parameters(bundle: Bundle, params: workflows.Params, hashes: dict | None = None,
                     comfyui_version: str | None = None) -> dict:
    """The parameters record an image carries: enough to reproduce it with --from. `comfyui_version`:
    the worker's (ComfyClient.comfyui_version), the pinned one when the worker does not say."""
    hashes = hashes or {}
    record = {"prompt": params.prompt, "negative": params.negative, "model": bundle.name, "family": bundle.family,
              "seed": params.seed, "width": params.width, "height": params.height, "steps": params.steps,
              "cfg": params.cfg, "sampler": params.sampler, "scheduler": params.scheduler,
              "denoise": params.denoise, "imagegen_version": __version__, "comfyui_version": comfyui_version or COMFYUI_VERSION,
              "files": {role: {"name": f.filename, "sha256": hashes.get(role) or f.sha256} for role, f in bundle.files.items()}}
    if bundle.family == "flux":
        record["guidance"] = params.guidance
    if params.fast:
        record["fast"] = True
    main = "checkpoint" if "checkpoint" in bundle.files else "diffusion_model"
    if record["files"].get(main, {}).get("sha256"):
        record["model_hash"] = record["files"][main]["sha256"]
    return record


def is_resident(bundle: Bundle, worker_info: dict) -> bool:
    """Whether the worker's last job used this bundle's model, so it is likely still loaded."""
    main = bundle.files.get("checkpoint") or bundle.files.get("diffusion_model")
    return bool(main) and worker_info.get("last_model") == main.filename


def job_budgets(bundle: Bundle, params: workflows.Params, device: str, resident: bool, base: Timeouts,
                explicit: set[str]) -> Timeouts:
    """Budgets sized from the bytes to load (more when the model is not resident) and learned step times."""
    size = 0
    for file in bundle.files.values():
        path = cache.present_path(file)
        size += path.stat().st_size if path else (file.size or 0)
    learned = timings.estimate(timing_name(bundle, params), params.width, params.height, device)
    return timings.budgets(base, learned, size, resident, params.steps, explicit, compiles=params.fast)


def timing_name(bundle: Bundle, params: workflows.Params) -> str:
    """Fast-mode jobs learn their own timings: compiling makes the first step slow and the rest fast."""
    return f"{bundle.name}+fast" if params.fast else bundle.name


def save_outputs(client, entry: dict, bundle: Bundle, params: workflows.Params, targets: list[Path | None], worker,
                 overwrite: bool, hashes: dict, submitted: float) -> list[dict]:
    """Fetch a finished job's images, tag them with their parameters, write them atomically, and
    learn from its timings. A latent batch gives one image per target, in batch order."""
    refs = output_images(entry)
    if len(refs) < len(targets):
        raise ImagegenError("execution_failed", f"ComfyUI finished the job but saved {len(refs)} of {len(targets)} image(s)")
    phase_times = entry.get("imagegen_phase_times", {})
    timings.record(timing_name(bundle, params), params.width, params.height, worker.device, phase_times, params.steps)
    records = []
    for index, (ref, target) in enumerate(zip(refs, targets)):
        fetch_started = time.monotonic()
        data = client.fetch_file(ref)
        fetched = time.monotonic()
        record = image_parameters(bundle, params, hashes, client.comfyui_version())
        record["width"], record["height"] = png.png_size(data)  # an upscale's size is its input's times the scale
        if params.batch_size > 1:
            record.update(batch_size=params.batch_size, batch_index=index)
        data = png.add_text_chunks(data, {"parameters": png.a1111_parameters(record),
                                             "imagegen": json.dumps(record, sort_keys=True)})
        if target is None:
            output.write_stdout(data)
        else:
            output.write_atomic(target, data, overwrite)
        records.append({"schema": output.RESULT_SCHEMA, "path": str(target) if target else "-", **record,
                        "worker": worker.name, "device": worker.device,
                        "timings": {**{k: round(v, 3) for k, v in phase_times.items()}, "fetch": round(fetched - fetch_started, 3),
                                    "write": round(time.monotonic() - fetched, 3), "since_submit": round(time.monotonic() - submitted, 3)}})
    return records


def render(bundle: Bundle, jobs: list[workflows.Params], targets: list[Path | None], worker, reporter: Reporter,
           timeouts: Timeouts, overwrite: bool, hashes: dict):
    """Queue every job on one worker, then write each image as it finishes."""
    client = worker.client(request_timeout=REQUEST_TIMEOUT)
    graphs = [workflows.build(bundle, params) for params in jobs]
    submitted = time.monotonic()
    reporter.job(f"{bundle.name} {jobs[0].width}x{jobs[0].height}")
    for index, entry in client.stream(graphs, timeouts, reporter.progress):
        yield from save_outputs(client, entry, bundle, jobs[index], [targets[index]], worker, overwrite, hashes, submitted)
