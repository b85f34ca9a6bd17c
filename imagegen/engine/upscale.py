"""`imagegen upscale`: enlarge existing images with an upscale model on the usual workers.

Every input is checked and decoded on this machine and every output path decided before a worker
starts. One job per image runs through the Scheduler (`workflows.upscale`: the model's own factor,
then a lanczos resize to exactly `scale` times the input, so a x4 model serves --scale 2). Each
PNG names its source image's sha256, the upscale model and the scale.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from imagegen.comfy import workflows
from imagegen.comfy.client import Timeouts
from imagegen.engine import generate, hires, inputs, output, render
from imagegen.engine.progress import Reporter
from imagegen.models.registry import Bundle, Registry
from imagegen.util import paths
from imagegen.util.errors import ImagegenError

MAX_SCALE = 8.0
MAX_IMAGES = 1000


@dataclass
class UpscaleRequest:
    images: list[Path]
    scale: float = 2.0
    model: str | None = None          # a registered upscale model or a .safetensors path (hires.DEFAULT_UPSCALE_MODEL)
    output: str | None = None         # a directory (or one .png for one image, or - for stdout)
    overwrite: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    explicit_timeouts: set[str] = field(default_factory=set)


@dataclass
class Source:
    path: Path
    sha256: str
    width: int                        # after EXIF orientation, as the worker's LoadImage sees it
    height: int
    parameters: dict                  # the source's own imagegen record, when it has one
    normalized: Path                  # the upright PNG that is uploaded


@dataclass
class UpscalePlan:
    bundle: Bundle
    sources: list[Source]
    jobs: list[workflows.Params]
    targets: list[Path | None]
    request: UpscaleRequest


def read_source(path: Path) -> Source:
    """Decode the image here (so a corrupt or huge file is refused before any worker starts), turn it upright
    (EXIF) and hash it; the worker gets the normalized PNG (engine/inputs.py)."""
    checked = inputs.load(Path(path), "upscale")
    own = _own_parameters(inputs.read_bytes(checked.path, "upscale"))
    return Source(checked.path, checked.sha256, checked.width, checked.height, own, checked.normalized)


def _own_parameters(data: bytes) -> dict:
    """The prompt and seed of an image imagegen made, carried over into its upscale's record."""
    import json

    from imagegen.comfy import png

    try:
        chunk = png.read_text_chunks(data).get("imagegen") if data.startswith(png.PNG_SIGNATURE) else None
        record = json.loads(chunk) if chunk else {}
    except (png.BadPNG, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def scale_label(scale: float) -> str:
    return f"x{scale:g}"


def check_scale(scale: float) -> float:
    if not isinstance(scale, (int, float)) or not 1.0 <= scale <= MAX_SCALE or scale != scale:
        raise ImagegenError("invalid_argument", f"--scale {scale} is outside 1..{MAX_SCALE:g}",
                            hint="Pass --scale 2 (or 1.5, 3, 4); the model's own factor does not limit it.")
    return float(scale)


def plan(request: UpscaleRequest, registry: Registry | None = None) -> UpscalePlan:
    """Validate the model, the scale, every input and every output path; nothing is started."""
    if not request.images:
        raise ImagegenError("invalid_argument", "no images to upscale", hint="imagegen upscale IMAGE.png --scale 2")
    if len(request.images) > MAX_IMAGES:
        raise ImagegenError("invalid_argument", f"{len(request.images)} images; one call takes at most {MAX_IMAGES}")
    if request.output == "-" and len(request.images) > 1:
        raise ImagegenError("invalid_argument", f"-o - writes one PNG to stdout, but {len(request.images)} images "
                            "were given", hint="Upscale one image with -o -, or pass -o DIR for several.")
    scale = check_scale(request.scale)
    bundle = hires.upscale_model(request.model, registry)
    sources = [read_source(Path(image).expanduser()) for image in request.images]
    jobs = []
    for source in sources:
        width, height = round(source.width * scale), round(source.height * scale)
        if max(width, height) > workflows.MAX_RESOLUTION:
            raise ImagegenError("invalid_argument",
                                f"{source.path}: {source.width}x{source.height} times {scale:g} is {width}x{height}, "
                                f"over the {workflows.MAX_RESOLUTION} pixel limit of a side",
                                hint="Pass a smaller --scale.")
        own = source.parameters
        prompt, negative, seed = own.get("prompt"), own.get("negative"), own.get("seed")
        jobs.append(workflows.Params(prompt=prompt if isinstance(prompt, str) else "",
                                     negative=negative if isinstance(negative, str) else "",
                                     width=width, height=height, steps=1, cfg=1.0, sampler="euler",
                                     scheduler="normal", seed=seed if isinstance(seed, int) and _is_seed(seed) else 0,
                                     filename_prefix=f"imagegen/upscale-{secrets.token_hex(4)}"))
    names = [f"{source.path.stem}-{scale_label(scale)}.png" for source in sources]
    where = request.output
    if where is not None and where != "-" and not where.lower().endswith(".png"):
        where = where.rstrip("/" + os.sep) + os.sep  # -o DIR: a folder, made when missing
    targets = output.plan_outputs(where, len(sources), names, request.overwrite, paths.default_output_dir())
    seen: dict[Path, Path] = {}
    for source, target in zip(sources, targets, strict=True):
        if target is not None and target in seen:
            raise ImagegenError("invalid_argument", f"{seen[target]} and {source.path} would both be written to "
                                                    f"{target}",
                                hint="Upscale images of the same name in separate calls with different -o folders.")
        if target is not None:
            seen[target] = source.path
        if target is not None and target.resolve() == source.path.resolve():
            raise ImagegenError("output_exists", f"{target} is the input image itself",
                                hint="Choose another -o path; an upscale never replaces its source.")
    return UpscalePlan(bundle, sources, jobs, targets, request)


def _is_seed(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= workflows.MAX_SEED


def provenance(source: Source, bundle: Bundle, scale: float) -> dict:
    """What an upscaled image's record adds: its source, the model and the scale."""
    return {"upscale": {"source": {"path": str(source.path), "sha256": source.sha256,
                                   "width": source.width, "height": source.height},
                        "model": bundle.name, "scale": scale}}


def execute(planned: UpscalePlan, runtime, reporter: Reporter, fetch=None):
    """Make the model loadable, find a worker, and yield one result record per image, in order."""
    from imagegen.engine.scheduler import Job, Scheduler
    from imagegen.models import cache
    from imagegen.models.fetch import make_fetcher

    bundle, request = planned.bundle, planned.request
    generate.make_loadable(bundle, runtime, fetch or make_fetcher(reporter))
    worker = runtime.ensure(on_status=reporter.status, mounts=generate.local_dirs(bundle))
    resident = render.is_resident(bundle, worker.client().worker_info())
    first = planned.jobs[0]
    budgets = render.job_budgets(bundle, first, worker.device, resident, request.timeouts, request.explicit_timeouts)
    count = len(planned.jobs)
    reporter.job(f"upscale {count} image(s) {scale_label(request.scale)} with {bundle.name}")
    jobs = [Job(key=str(index), bundle=bundle, params=params, targets=[target],  # type: ignore[list-item]  # None: stdout
                inputs={"init_image": source.normalized},
                meta={"record": provenance(source, bundle, request.scale)})
            for index, (params, source, target) in enumerate(zip(planned.jobs, planned.sources, planned.targets,
                                                                 strict=True))]
    scheduler = Scheduler(runtime, [worker.slot], jobs, lambda outcome: None, lambda job, state: budgets,
                          {bundle.name: cache.file_hashes(bundle)}, generate.local_dirs(bundle),
                          overwrite=request.overwrite, depth=min(count, 4), max_attempts=1, max_restarts=0,
                          reporter=reporter, force=True, session_timeouts=budgets, handles={worker.slot: worker})
    yield from generate.in_order(scheduler.stream())
