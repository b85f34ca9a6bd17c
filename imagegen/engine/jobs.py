"""Jobs and workers as the scheduler sees them: what a job is, how it ended, and each worker's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imagegen.comfy import workflows
from imagegen.models.registry import Bundle
from imagegen.util.errors import ImagegenError

WORKER_FAULTS = {"timeout", "worker_unreachable", "worker_died", "out_of_memory", "worker_unhealthy"}


@dataclass
class Job:
    key: str                       # stable identity, for the manifest and resuming
    bundle: Bundle
    params: workflows.Params
    targets: list[Path]            # one per image (several for a latent batch)
    meta: dict = field(default_factory=dict)
    source: Path | None = None     # an input image (img2img, upscale), uploaded to whichever worker runs the job
    attempts: int = 0
    quality: bool = False          # prefers the fastest worker (see routing)


@dataclass
class Outcome:
    job: Job
    worker: str
    records: list[dict] = field(default_factory=list)
    error: ImagegenError | None = None


@dataclass
class WorkerState:
    slot: str
    name: str = ""
    handle: object = None
    last_model: str | None = None
    done: int = 0
    busy_seconds: float = 0.0
    status: str = "starting"
    restarts: int = 0
    inflight: dict = field(default_factory=dict)  # prompt_id -> (job, submitted_at)
    gpu: dict | None = None
    memory_bytes: int | None = None
    healthy: bool = True
    speed: float | None = None                     # seconds per step per megapixel, learned
    samples: int = 0
    load_seconds: dict = field(default_factory=dict)
    last_seen: float = 0.0

    def queued_jobs(self) -> list:
        return [job for job, _ in self.inflight.values()]
