"""Jobs and workers as the scheduler sees them: what a job is, how it ended, each worker's state, and
the queue every worker pulls from."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    # local files the graph reads (workflows.INPUT_KEYS: "init_image", "mask", "control:N"), uploaded by
    # content hash to whichever worker runs the job
    inputs: dict[str, Path] = field(default_factory=dict)
    addons: list[Bundle] = field(default_factory=list)  # its LoRA/ControlNet files (one-file bundles, engine/addons)
    attempts: int = 0
    quality: bool = False          # prefers the fastest worker (see routing)
    workflow: Any = None           # a user's own graph (engine/workflow_jobs.WorkflowJob): submitted instead of
    #                                workflows.build(bundle, params); its inputs are keyed "NODE.input"


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
    handle: Any = None                             # a runtimes.base.WorkerHandle once started
    last_bundle: str | None = None                 # the bundle of the job it ran last (likely still loaded)
    done: int = 0
    busy_seconds: float = 0.0
    status: str = "starting"
    restarts: int = 0
    inflight: dict = field(default_factory=dict)  # prompt_id -> (job, submitted_at)
    held: list = field(default_factory=list)       # jobs taken from the queue and not settled yet
    compiled: set = field(default_factory=set)     # fast-mode shapes this worker has compiled in this run
    gpu: dict | None = None
    memory_bytes: int | None = None
    healthy: bool = True
    speed: float | None = None                     # seconds per step per megapixel, learned
    samples: int = 0
    load_seconds: dict = field(default_factory=dict)
    last_seen: float = 0.0

    def queued_jobs(self) -> list:
        return [job for job, _ in self.inflight.values()]


class JobQueue:
    """Jobs waiting for a worker, taken model by model."""

    def __init__(self, jobs: list[Job], choose=None, others_can_take=None):
        self.waiting = list(jobs)
        self.inflight = 0
        self.cond = threading.Condition()
        self.choose = choose or prefer_loaded_model
        self.others_can_take = others_can_take or (lambda worker, waiting: False)

    def take(self, worker: WorkerState, block: bool) -> Job | None:
        """The next job for this worker, or None when there is none now (block=False) or will be none (block=True)."""
        with self.cond:
            while True:
                job = self.choose(worker, self.waiting) if self.waiting else None
                if job is not None:
                    self.waiting.remove(job)
                    self.inflight += 1
                    return job
                if not block:
                    return None
                if self.inflight == 0 and not (self.waiting and self.others_can_take(worker, self.waiting)):
                    return None  # nothing will come back, and nothing waiting is meant for another worker
                self.cond.wait(0.5)  # a job in flight elsewhere may come back; a busier worker may free up

    def finished(self) -> bool:
        with self.cond:
            return not self.waiting and self.inflight == 0

    def settle(self, job: Job, requeue: bool = False) -> None:
        with self.cond:
            self.inflight -= 1
            if requeue:
                self.waiting.insert(0, job)
            self.cond.notify_all()

    def drain(self) -> list[Job]:
        with self.cond:
            left, self.waiting = self.waiting, []
            self.cond.notify_all()
            return left


def prefer_loaded_model(worker: WorkerState, waiting: list[Job]) -> Job | None:
    """Retries first (they waited longest); then stay on the model the worker has loaded; otherwise
    take the model with the most work left."""
    retries = [job for job in waiting if job.attempts]
    if retries:
        return retries[0]
    same = [job for job in waiting if job.bundle.name == worker.last_bundle]
    if same:
        return same[0]
    counts: dict[str, int] = {}
    for job in waiting:
        counts[job.bundle.name] = counts.get(job.bundle.name, 0) + 1
    busiest = max(counts, key=lambda name: counts[name])
    return next(job for job in waiting if job.bundle.name == busiest)
