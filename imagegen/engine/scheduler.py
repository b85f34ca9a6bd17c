"""Fan jobs out over workers: one shared queue that every worker pulls from.

A faster worker simply comes back for more. Each worker keeps `depth` jobs queued in its
ComfyUI so it never idles between them, and prefers jobs of the model it has loaded. A job
that fails for its own reason is reported failed and the rest go on; a job whose worker died
or hung goes back to the queue for another worker (a bounded number of times), and the dead
worker is restarted once. Nothing is dropped: every job ends as done or failed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import replace
from typing import Callable

from imagegen.comfy import workflows
from imagegen.comfy.client import Timeouts
from imagegen.engine.jobs import WORKER_FAULTS, Job, Outcome, WorkerState
from imagegen.engine import render
from imagegen.engine.routing import Router, host_memory_bytes, prefer_loaded_model
from imagegen.util.errors import ImagegenError


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


class Scheduler:
    def __init__(self, runtime, slots: list[str], jobs: list[Job], on_outcome: Callable[[Outcome], None],
                 budgets: Callable[[Job, WorkerState], Timeouts], hashes: dict[str, dict], mounts: set[str],
                 overwrite: bool = False, depth: int = 2, max_attempts: int = 3, reporter=None,
                 registry=None, force: bool = False, max_restarts: int = 2):
        self.runtime, self.slots, self.on_outcome = runtime, slots, on_outcome
        self.budgets, self.hashes, self.mounts, self.overwrite = budgets, hashes, mounts, overwrite
        self.depth, self.max_attempts, self.reporter, self.max_restarts = depth, max_attempts, reporter, max_restarts
        self._fast_note_given = False
        self.workers = [WorkerState(slot) for slot in slots]
        self.router = Router(self.workers, registry)
        if force:
            self.router.fits = lambda job, worker: True
        self.queue = JobQueue(jobs, self.router.choose, self.router.someone_else_can_take)
        self.jobs = jobs
        self.cancel = threading.Event()
        self.lock = threading.Lock()
        self.started_here: list[str] = []
        self.last_fault: ImagegenError | None = None

    # --- the run ------------------------------------------------------------------
    def run(self) -> None:
        """Start every worker, check every job fits some GPU, then feed the workers until done."""
        self._in_threads(self._start, "start")
        ready = [state for state in self.workers if state.handle is not None]
        if not ready:
            raise self.last_fault or ImagegenError("worker_start_failed", "no worker could start")
        self.router.check_feasible([(job.bundle, job.params) for job in self.jobs], [state.memory_bytes for state in ready])
        self._in_threads(self._serve, "worker")
        for job in self.queue.drain():  # no worker is left that can take them: report, never drop
            reason = self.last_fault.message if self.last_fault else "no running worker can hold it"
            self._emit(Outcome(job, "-", error=ImagegenError("worker_died", f"no worker left to run this job ({reason})")))

    def _in_threads(self, target, label: str) -> None:
        threads = [threading.Thread(target=target, args=(state,), name=f"{label}-{state.slot}", daemon=True)
                   for state in self.workers]
        for thread in threads:
            thread.start()
        try:
            while any(thread.is_alive() for thread in threads):
                for thread in threads:
                    thread.join(0.2)
        except KeyboardInterrupt:
            self.cancel.set()
            for thread in threads:
                thread.join(10)  # each interrupts its queued prompts and finishes the file it writes
            for slot in self.started_here:
                self.runtime.stop(slot)
            raise

    def _emit(self, outcome: Outcome) -> None:
        with self.lock:
            self.on_outcome(outcome)

    def _status(self, message: str) -> None:
        if self.reporter:
            self.reporter.status(message)

    def _as_run(self, job: Job, state: WorkerState) -> workflows.Params:
        params = workflows.for_device(job.params, state.handle.device)
        if job.params.fast and not params.fast and not self._fast_note_given:
            self._fast_note_given = True
            self._status(workflows.FAST_ON_CPU_NOTE)
        return params

    def _start(self, state: WorkerState) -> bool:
        try:
            state.handle = self.runtime.ensure(state.slot, on_status=self._status, mounts=self.mounts)
            info = {**state.handle.info, **state.handle.client(request_timeout=10).worker_info()}
        except ImagegenError as error:
            state.status, state.handle = f"failed to start: {error.code}", None
            self.last_fault = error
            self._status(f"worker {state.slot} could not start: {error.message}")
            return False
        state.name, state.status, state.healthy = state.handle.name, "ready", True
        state.gpu = info.get("gpu")
        self.router.restore(state)
        if state.gpu and state.gpu.get("memory_total_mib"):
            state.memory_bytes = int(state.gpu["memory_total_mib"]) * 1024 * 1024
        elif state.handle.device == "cpu":
            state.memory_bytes = host_memory_bytes() or None
        if state.handle.started_here:
            with self.lock:
                self.started_here.append(state.slot)
        return True

    def _serve(self, state: WorkerState) -> None:
        if state.handle is None:
            return
        restartable = getattr(self.runtime, "name", "") != "remote"
        while not self.cancel.is_set():
            fault = self._drive(state)
            if fault is None:
                state.status = "done"
                return
            self.last_fault = fault
            state.healthy = False
            state.status = "unhealthy"
            self.runtime.stop(state.slot)
            self._status(f"worker {state.name} failed ({fault.code}); its jobs go to other workers")
            if not self._rejoin(state, restartable):
                state.status = f"left after {fault.code}"
                return

    def _rejoin(self, state: WorkerState, restartable: bool) -> bool:
        """Bring a failed worker back: restart it (a bounded number of times), or, for a worker we
        cannot restart, wait until it answers its health check again, while there is work left."""
        while not self.cancel.is_set() and not self.queue.finished():
            if restartable and state.restarts >= self.max_restarts:
                return False
            state.restarts += 1
            if self._start(state):
                self._status(f"worker {state.name} is back")
                return True
            if restartable:
                return False
            self.cancel.wait(2.0)
        return False

    def _drive(self, state: WorkerState) -> ImagegenError | None:
        """Feed one worker until the queue is empty. Returns the fault that stopped the worker, if any."""
        client = state.handle.client(request_timeout=render.REQUEST_TIMEOUT)
        progress = self.reporter.worker_progress(state) if self.reporter and hasattr(self.reporter, "worker_progress") else None
        with client.session(Timeouts(), progress, self.cancel) as session:
            while not self.cancel.is_set():
                while len(state.inflight) < self.depth:
                    job = self.queue.take(state, block=not state.inflight)
                    if job is None:
                        break
                    job.attempts += 1
                    try:
                        params = self._as_run(job, state)
                        if job.source is not None:
                            data = job.source.read_bytes()  # named by content: funnels sharing a worker never collide
                            name = f"{hashlib.sha256(data).hexdigest()[:16]}-{job.source.name}"
                            params = replace(params, init_image=client.upload_image(data, name))
                        prompt_id = session.submit(workflows.build(job.bundle, params), self.budgets(job, state))
                    except ImagegenError as error:
                        if error.code in WORKER_FAULTS:
                            return self._requeue_all(state, error, extra=[job])
                        self._fail(job, state, error)
                        continue
                    state.inflight[prompt_id] = (job, time.monotonic())
                    state.last_model = job.bundle.name
                if not state.inflight:
                    return None
                try:
                    prompt_id, entry = session.next_finished()
                except ImagegenError as error:
                    failed = error.details.get("prompt_id")
                    if error.code == "interrupted" and self.cancel.is_set():
                        return None
                    if failed in state.inflight and error.code not in WORKER_FAULTS:
                        job, _ = state.inflight.pop(failed)
                        self._fail(job, state, error)
                        continue
                    return self._requeue_all(state, error)
                job, submitted = state.inflight.pop(prompt_id)
                try:
                    records = render.save_outputs(client, entry, job.bundle, self._as_run(job, state), job.targets, state.handle,
                                           self.overwrite, self.hashes.get(job.bundle.name, {}), submitted)
                except ImagegenError as error:
                    if error.code in WORKER_FAULTS:
                        return self._requeue_all(state, error, extra=[job])
                    self._fail(job, state, error)
                    continue
                phases = entry.get("imagegen_phase_times", {})
                state.done += len(records)
                state.busy_seconds += sum(phases.get(p, 0.0) for p in ("loading", "sampling", "finishing"))
                self.queue.settle(job)
                self._emit(Outcome(job, state.name, records=records))
                if not self.router.observe(state, job, phases):
                    return self._requeue_all(state, ImagegenError(
                        "worker_unhealthy", f"worker {state.name} ran more than 5x slower than its own history"))
        return None

    def _fail(self, job: Job, state: WorkerState, error: ImagegenError) -> None:
        self.queue.settle(job)
        self._emit(Outcome(job, state.name, error=error))

    def _requeue_all(self, state: WorkerState, fault: ImagegenError, extra: list[Job] = ()) -> ImagegenError:
        """The worker failed: its jobs go back to the queue, or fail once they used up their attempts."""
        jobs = [job for job, _ in state.inflight.values()] + list(extra)
        state.inflight.clear()
        for job in jobs:
            if job.attempts < self.max_attempts:
                self.queue.settle(job, requeue=True)
            else:
                self.queue.settle(job)
                self._emit(Outcome(job, state.name or state.slot, error=ImagegenError(
                    fault.code, f"gave up after {job.attempts} attempts: {fault.message}", hint=fault.hint)))
        return fault
