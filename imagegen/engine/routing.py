"""Which worker should run which job, on machines with mixed GPUs.

1. Fit: a job goes only to a worker whose GPU can hold it: model bytes plus activation memory for
   its size and batch (estimates below). A job that fits no GPU fails before anything starts.
2. Drafts (many small jobs) go to whichever worker asks first: every idle worker helps, until the
   batch's tail: a slower worker leaves a draft to the others when they would finish everything
   still waiting, that draft included, before it finished this one.
3. Quality jobs (funnel's later stages, large sizes, Flux) go to the worker that will finish them
   soonest: its backlog plus the job's time at its learned speed. A slower worker takes one only
   when the faster ones are busy for longer than the job would take it (overflow).
4. Speed is learned per worker as seconds per sampling step per megapixel, from its finished jobs.
"""

from __future__ import annotations

import os
import time

from imagegen.engine.jobs import prefer_loaded_model  # noqa: F401 - where the choice began
from imagegen.util import paths
from imagegen.util.errors import ImagegenError

MIB = 1024 * 1024
# Activation memory per output pixel of one image at fp16 with PyTorch attention, VAE decode
# included: rough published orders of magnitude (SD1.5 512² ~1 GB, SDXL 1024² ~2.6 GB, Flux 1024²
# ~2 GB). Estimates, not measurements: --force runs a job anyway.
ACTIVATION_BYTES_PER_PIXEL = {"sd15": 4000, "sdxl": 2500, "flux": 2000, "upscale": 50}  # upscales run in 512px tiles
TEXT_ENCODER_ROLES = ("t5", "clip_l")
RUNTIME_OVERHEAD = 600 * MIB  # CUDA context, ComfyUI, allocator slack
QUALITY_PIXELS = 1024 * 1024  # at or above this size a job is quality work
SLOW_FACTOR = 5.0  # this many times slower than its own history: unhealthy
OVERFLOW_MARGIN = 1.10  # a slower worker takes quality work if it finishes within 10%
SPEEDS = "speeds.json"  # learned speed per GPU (or worker), in the state dir


def _role_bytes(bundle) -> dict[str, int]:
    sizes = {}
    for role, file in bundle.files.items():
        size = file.size or 0
        if role == "diffusion_model" and str(bundle.default("weight_dtype", "default")).startswith("fp8"):
            size //= 2  # cast to fp8 on load
        sizes[role] = size
    return sizes


def model_bytes(bundle) -> int:
    """Bytes the weights take on the GPU at their peak. ComfyUI encodes the prompt first and then
    loads the diffusion model, evicting separate text encoders when memory is short."""
    sizes = _role_bytes(bundle)
    encoders = sum(sizes.pop(role, 0) for role in TEXT_ENCODER_ROLES)
    return max(encoders, sum(sizes.values()))


def estimate_bytes(bundle, params) -> int:
    """GPU memory a job needs: its model files (weights load at about their stored size) plus
    activations for its size and batch."""
    per_pixel = ACTIVATION_BYTES_PER_PIXEL.get(bundle.family, 6000)
    return model_bytes(bundle) + per_pixel * params.width * params.height * max(1, params.batch_size) + RUNTIME_OVERHEAD


def is_quality(job) -> bool:
    return job.quality or job.bundle.family == "flux" or job.params.width * job.params.height >= QUALITY_PIXELS


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def fp8_hint(bundle, registry) -> str:
    """Name a smaller variant of the same family, when the registry has one."""
    smaller = sorted(
        (b for b in registry.bundles.values() if b.family == bundle.family and model_bytes(b) < model_bytes(bundle)),
        key=model_bytes,
    )
    fp8 = [b for b in smaller if "fp8" in b.name or any("fp8" in f.filename for f in b.files.values())]
    pick = (fp8 or smaller)[:1]
    return f" Try the smaller variant {pick[0].name!r} ({model_bytes(pick[0]) / 1e9:.1f} GB)." if pick else ""


class Router:
    def __init__(self, workers: list, registry=None):
        self.workers = workers
        self.registry = registry

    # --- capacity -----------------------------------------------------------------
    @staticmethod
    def capacity(worker) -> int | None:
        """Bytes a worker can hold; None while unknown (not started yet)."""
        return worker.memory_bytes

    def fits(self, job, worker) -> bool:
        capacity = self.capacity(worker)
        return capacity is None or estimate_bytes(job.bundle, job.params) <= capacity

    def check_feasible(self, work: list[tuple], capacities: list[int | None]) -> None:
        """Fail before starting when a (bundle, params) pair fits no GPU at all."""
        known = [c for c in capacities if c is not None]
        if not known:
            return
        largest = max(known)
        for bundle, params in work:
            need = estimate_bytes(bundle, params)
            if need > largest:
                hint = fp8_hint(bundle, self.registry) if self.registry else ""
                raise ImagegenError(
                    "insufficient_gpu_memory",
                    f"{bundle.name} at {params.width}x{params.height} (batch {params.batch_size}) needs about "
                    f"{need / 1e9:.1f} GB but the largest GPU here has {largest / 1e9:.1f} GB.{hint}",
                    hint="Use a smaller --size or model, or pass --force to try anyway "
                    "(ComfyUI may offload weights, slowly).",
                    needed_bytes=need,
                    largest_bytes=largest,
                )

    # --- speed --------------------------------------------------------------------
    @staticmethod
    def job_work(job) -> float:
        """Sampling steps times megapixels: a job's size in the unit speeds are learned in."""
        return job.params.steps * job.params.width * job.params.height * max(1, job.params.batch_size) / 1e6

    @classmethod
    def job_seconds(cls, job, worker) -> float | None:
        if worker.speed is None:
            return None
        loading = 0.0 if worker.last_bundle == job.bundle.name else worker.load_seconds.get(job.bundle.name, 0.0)
        return worker.speed * cls.job_work(job) + loading

    def finish_time(self, job, worker) -> float | None:
        own = self.job_seconds(job, worker)
        if own is None:
            return None
        backlog = sum(self.job_seconds(j, worker) or 0.0 for j in worker.queued_jobs())
        return backlog + own

    def active(self, worker) -> bool:
        return worker.status in ("starting", "ready", "restarting") and worker.healthy

    # --- choice -------------------------------------------------------------------
    def choose(self, worker, waiting: list):
        eligible = [job for job in waiting if self.fits(job, worker)]
        if not eligible:
            return None
        retries = [job for job in eligible if job.attempts]
        if retries:
            return retries[0]
        drafts = [job for job in eligible if not is_quality(job)]
        if drafts and worker.speed is None:
            return prefer_loaded_model(worker, drafts)  # learn this worker's speed on small work first
        for job in (j for j in eligible if is_quality(j)):
            mine = self.finish_time(job, worker)
            rivals = [
                self.finish_time(job, w)
                for w in self.workers
                if w is not worker and self.active(w) and self.fits(job, w)
            ]
            known = [t for t in rivals if t is not None]
            if mine is None or not known or mine <= min(known) * OVERFLOW_MARGIN:
                return job
        job = prefer_loaded_model(worker, drafts) if drafts else None
        return job if job is None or self.helps_the_tail(job, worker, waiting) else None

    def helps_the_tail(self, job, worker, waiting: list) -> bool:
        """Whether this worker would finish the draft before the other workers finish all the work left:
        their backlogs and everything waiting, the draft included, at their learned speeds. Always so in
        the bulk of a batch; at its tail a slow worker stops taking drafts a faster one would finish first."""
        mine = self.finish_time(job, worker)
        rivals = [w for w in self.workers
                  if w is not worker and self.active(w) and w.speed and self.fits(job, w)]
        if mine is None or not rivals:
            return True
        left = sum(self.job_work(j) for j in waiting) + sum(self.job_work(j) for w in rivals for j in w.queued_jobs())
        return mine <= left / sum(1 / w.speed for w in rivals)

    def someone_else_can_take(self, worker, waiting: list) -> bool:
        return any(self.fits(job, w) for job in waiting for w in self.workers if w is not worker and self.active(w))

    # --- learning -----------------------------------------------------------------
    @staticmethod
    def _speed_key(worker) -> str:
        return (worker.gpu or {}).get("uuid") or worker.name or worker.slot

    @classmethod
    def restore(cls, worker) -> None:
        """The speed this worker's GPU showed in earlier runs (funnel stages, earlier batches)."""
        entry = paths.read_state(SPEEDS).get(cls._speed_key(worker))
        if entry and worker.speed is None:
            worker.speed, worker.samples = entry["speed"], entry["samples"]

    @classmethod
    def remember(cls, worker) -> None:
        entry = {"speed": worker.speed, "samples": worker.samples, "name": worker.name}
        paths.update_state(SPEEDS, lambda store: store.update({cls._speed_key(worker): entry}))  # locked

    @classmethod
    def observe(cls, worker, job, phase_times: dict) -> bool:
        """Fold a finished job into the worker's speed. Returns False when the worker ran far slower
        than its own history (it is then taken out of the rotation)."""
        sampling = phase_times.get("sampling")
        megapixels = job.params.width * job.params.height * max(1, job.params.batch_size) / 1e6
        if phase_times.get("loading") is not None and worker.last_bundle != job.bundle.name:
            worker.load_seconds[job.bundle.name] = phase_times["loading"]
        if not sampling or not job.params.steps or not megapixels:
            return True
        observed = sampling / (job.params.steps * megapixels)
        usual = worker.speed
        worker.samples += 1
        worker.speed = observed if usual is None else usual + (observed - usual) / 3
        worker.last_seen = time.monotonic()
        cls.remember(worker)
        on_cpu = worker.handle is not None and getattr(worker.handle, "device", "") == "cpu"
        return on_cpu or usual is None or worker.samples < 3 or observed <= SLOW_FACTOR * usual
