"""Write what a worker rendered: budgets for a job, each finished image fetched, checked, tagged
with its parameters (PNG chunks) and written atomically, and any exception as a user-facing error."""

from __future__ import annotations

import errno
import io
import json
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from imagegen import COMFYUI_VERSION, __version__
from imagegen.comfy import png, ui_graph, workflows
from imagegen.comfy.client import Timeouts, output_images
from imagegen.engine import addons, hires, output, timings
from imagegen.models import cache
from imagegen.models.registry import Bundle
from imagegen.util.env import env_float
from imagegen.util.errors import ImagegenError

REQUEST_TIMEOUT: float | None = None  # a fixed value (tests); None reads IMAGEGEN_TIMEOUT_REQUEST when used


def request_timeout() -> float:
    """Seconds one HTTP request to a worker may take (IMAGEGEN_TIMEOUT_REQUEST, checked when used)."""
    return REQUEST_TIMEOUT if REQUEST_TIMEOUT is not None else env_float("IMAGEGEN_TIMEOUT_REQUEST", 30.0, minimum=0.1)


def image_parameters(
    bundle: Bundle, params: workflows.Params, hashes: dict | None = None, comfyui_version: str | None = None
) -> dict:
    """The parameters record an image carries: enough to reproduce it with --from. `comfyui_version`:
    the worker's (ComfyClient.comfyui_version), the pinned one when the worker does not say."""
    hashes = hashes or {}
    record: dict[str, Any] = {
        "prompt": params.prompt,
        "negative": params.negative,
        "model": bundle.name,
        "family": bundle.family,
        "seed": params.seed,
        "width": params.width,
        "height": params.height,
        "steps": params.steps,
        "cfg": params.cfg,
        "sampler": params.sampler,
        "scheduler": params.scheduler,
        "denoise": params.denoise,
        "imagegen_version": __version__,
        "comfyui_version": comfyui_version or COMFYUI_VERSION,
        "files": {
            role: {"name": f.filename, "sha256": hashes.get(role) or f.sha256} for role, f in bundle.files.items()
        },
    }
    if bundle.family == "flux":
        record["guidance"] = params.guidance
    if params.sources:  # the user's input image and mask: name, absolute path, sha256 (engine/inputs.py)
        record["inputs"] = {role: dict(source) for role, source in params.sources.items()}
        if "mask" in params.sources or params.extend:
            record["mask_grow"] = params.mask_grow
        if params.extend:
            record["extend"] = list(params.extend)
    if params.fast:
        record["fast"] = True
    record.update(hires.record(params))
    record.update(addons.records(params))  # loras: [{name, sha256, strength}], controls: [{model, sha256, ...}]
    main = "checkpoint" if "checkpoint" in bundle.files else "diffusion_model"
    if record["files"].get(main, {}).get("sha256"):
        record["model_hash"] = record["files"][main]["sha256"]
    return record


def is_resident(bundle: Bundle, worker_info: dict) -> bool:
    """Whether the worker's last job used this bundle's model, so it is likely still loaded."""
    main = bundle.files.get("checkpoint") or bundle.files.get("diffusion_model")
    return main is not None and worker_info.get("last_model") == main.filename


def job_budgets(
    bundle: Bundle, params: workflows.Params, device: str, resident: bool, base: Timeouts, explicit: set[str]
) -> Timeouts:
    """Budgets sized from the bytes to load (more when the model is not resident) and learned step times."""
    size = 0
    for file in bundle.files.values():
        path = cache.present_path(file)
        size += path.stat().st_size if path else (file.size or 0)
    learned = timings.estimate(timing_name(bundle, params), params.width, params.height, device)
    return timings.budgets(base, learned, size, resident, params.steps, explicit, compiles=params.fast)


def timing_name(bundle: Bundle, params: workflows.Params) -> str:
    """Fast-mode jobs learn their own timings: compiling makes the first step slow and the rest fast. A hires
    job's two passes are timed apart from one-pass jobs of the same first-pass size."""
    name = f"{bundle.name}+fast" if params.fast else bundle.name
    return f"{name}+hires{params.hires.scale:g}" if params.hires else name


def save_outputs(
    client,
    entry: dict,
    bundle: Bundle,
    params: workflows.Params,
    targets: list[Path | None],
    worker,
    overwrite: bool,
    hashes: dict,
    submitted: float,
    learn: bool = True,
    warn: Callable[[str], None] | None = None,
    extra: dict | None = None,
) -> list[dict]:
    """Fetch a finished job's images, tag them with their parameters, write them atomically, and
    learn from its timings (learn=False: a fast-mode job that compiled, whose times say nothing).
    A latent batch gives one image per target, in batch order. `warn` hears of a flat black image."""
    refs = output_images(entry)
    if len(refs) < len(targets):
        raise ImagegenError(
            "execution_failed", f"ComfyUI finished the job but saved {len(refs)} of {len(targets)} image(s)"
        )
    phase_times = entry.get("imagegen_phase_times", {})
    if learn:
        timings.record(
            timing_name(bundle, params), params.width, params.height, worker.device, phase_times, params.steps
        )
    records = []
    for index, (ref, target) in enumerate(zip(refs, targets, strict=False)):
        fetch_started = time.monotonic()
        data = client.fetch_file(ref)
        fetched = time.monotonic()
        if warn is not None and looks_blank(data):
            warn(
                f"{target or 'the image'} is one flat, nearly black colour: the VAE likely decoded NaNs (a broken fp16 "
                "VAE does this). Try without --fast, a bundle with an fp32 VAE, or another model."
            )
        record = image_parameters(bundle, params, hashes, client.comfyui_version())
        record.update(extra or {})  # what the job adds (an upscale's source and scale: Job.meta["record"])
        record["width"], record["height"] = png.png_size(data)  # an upscale's size is its input's times the scale
        if params.batch_size > 1:
            record.update(batch_size=params.batch_size, batch_index=index)
        data = png.add_text_chunks(
            data, {"parameters": png.a1111_parameters(record), "imagegen": json.dumps(record, sort_keys=True),
                   **ui_graph.workflow_chunk(data)}  # the editor opens the graph with a layout
        )
        write_image(data, target, overwrite)
        records.append(result(record, target, worker, phase_times, (fetch_started, fetched, submitted)))
    return records


def write_image(data: bytes, target: Path | None, overwrite: bool) -> None:
    """Write a tagged PNG atomically (None: to stdout); a failure is the user-facing error naming where."""
    try:
        if target is None:
            output.write_stdout(data)
        else:
            output.write_atomic(target, data, overwrite)
    except BrokenPipeError:
        raise  # the reader of stdout went away: the whole call ends, not only this job
    except OSError as exc:
        raise as_error(exc, str(target or "stdout")) from exc


def result(record: dict, target: Path | None, worker, phase_times: dict, times: tuple[float, float, float]) -> dict:
    """The result record (`--json`, the manifest) of one written image; `times`: when its fetch started and
    ended and when its job was submitted (time.monotonic)."""
    fetch_started, fetched, submitted = times
    return {
        "schema": output.RESULT_SCHEMA,
        "path": str(target) if target else "-",
        **record,
        "worker": worker.name,
        "device": worker.device,
        "timings": {
            **{k: round(v, 3) for k, v in phase_times.items()},
            "fetch": round(fetched - fetch_started, 3),
            "write": round(time.monotonic() - fetched, 3),
            "since_submit": round(time.monotonic() - submitted, 3),
        },
    }


def looks_blank(data: bytes) -> bool:
    """Every pixel the same very dark value: what NaNs from a broken fp16 VAE decode to. Cheap: one
    pass over the pixels in C (Image.getextrema)."""
    if _clearly_varied(data):
        return False  # the common case, without importing Pillow (tens of ms a one-shot call)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            extrema = image.convert("RGB").getextrema()
    except Exception:  # noqa: BLE001 - an image Pillow cannot read is not ours to judge
        return False
    return all(low == high for low, high in extrema) and max(high for _, high in extrema) <= BLANK_LEVEL


def _clearly_varied(data: bytes) -> bool:
    """Many distinct byte values in the first 64 KiB of the decoded scanlines: not one flat colour
    (whose filtered scanlines hold a handful of values). Anything unsure is left to Pillow."""
    try:
        idat = b"".join(body for kind, body, _ in png.iter_chunks(data) if kind == b"IDAT")
        head = zlib.decompressobj().decompress(idat, 65536)
    except Exception:  # noqa: BLE001 - unreadable here: let Pillow judge
        return False
    return len(set(head)) > 32


BLANK_LEVEL = 8  # out of 255: "very dark"
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def as_error(exc: BaseException, where: str = "") -> ImagegenError:
    """Any exception as a user-facing error. A full disk is disk_full; a lost connection is the
    worker's fault; an HTTP error answer fails the job; anything else is internal_error naming it."""
    if isinstance(exc, ImagegenError):
        return exc
    if isinstance(exc, BrokenPipeError):  # the reader of stdout left (`-o - | head -c 10`): exit 141
        return ImagegenError("output_closed", "stdout was closed before all output was written")
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        place = where or exc.filename or "the output"
        return ImagegenError(
            "disk_full",
            f"no space left on the disk to write {place} ({exc.strerror or exc})",
            hint="Free disk space (or choose another -o folder), then run the same command again.",
        )
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return ImagegenError(
            "worker_unreachable", f"lost the connection to the worker: {exc.__class__.__name__}: {exc}"
        )
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else "an error"
        url = exc.response.url if exc.response is not None else "a request"
        return ImagegenError("execution_failed", f"the worker answered {status} on {url}")
    if isinstance(exc, OSError) and where:
        return ImagegenError("output_not_writable", f"cannot write {where}: {exc.strerror or exc}")
    return ImagegenError("internal_error", f"unexpected {exc.__class__.__name__}: {exc}")
