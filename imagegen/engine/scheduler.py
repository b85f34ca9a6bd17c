"""Fan jobs out over workers: one shared queue that every worker pulls from. Every command's jobs
(generate, batch, funnel, MCP) run through this one loop: it submits, collects, saves and
classifies failures.

A faster worker simply comes back for more. Each worker keeps `depth` jobs queued in its
ComfyUI so it never idles between them, and prefers jobs of the model it has loaded. A job
that fails for its own reason is reported failed and the rest go on; a job whose worker died
or hung goes back to the queue for another worker (a bounded number of times), and a dead
worker that this command started is restarted. Nothing is dropped and nothing hangs: any
exception in a worker thread settles that worker's jobs, so every job ends as done or failed.
A command stops only workers it started and that nobody else is using.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing

from imagegen.comfy import workflows
from imagegen.comfy.client import Timeouts
from imagegen.engine import addons, render, workflow_jobs
from imagegen.engine.jobs import WORKER_FAULTS, Job, JobQueue, Outcome, WorkerState, prefer_loaded_model  # noqa: F401
from imagegen.engine.routing import Router, host_memory_bytes
from imagegen.util.errors import ImagegenError

DIAGNOSED = ("timeout", "worker_unreachable", "out_of_memory")   # faults the runtime can explain (died? hung?)
FATAL = (BrokenPipeError,)                                       # the whole call ends: nobody reads its output


def worker_fault(runtime, handle, error: ImagegenError, stop: bool) -> ImagegenError:
    """After a stall, a timeout or a lost connection: say what happened (the phase, and whether the
    worker died, hung or ran out of memory), and stop the worker only when `stop` (this command
    started it), so the next call gets a fresh one. A worker someone else started is left running."""
    cause = None
    if error.code in DIAGNOSED:
        try:
            cause = runtime.diagnose(handle)
        except Exception:  # noqa: BLE001 - a diagnosis is a bonus; the fault itself is reported anyway
            cause = None
    if stop:
        runtime.stop(handle.slot)
    if error.code not in DIAGNOSED:
        return error
    note = (" The worker was stopped; the next call starts a fresh one." if stop
            else " The worker was left running: this command did not start it.")
    if cause is not None and error.code != "timeout":
        cause.message += f" (phase '{error.details.get('phase', 'unknown')}').{note}"
        return cause
    error.message += note
    return error


class Scheduler:
    def __init__(self, runtime, slots: list[str], jobs: list[Job], on_outcome: Callable[[Outcome], None],
                 budgets: Callable[[Job, WorkerState], Timeouts], hashes: dict[str, dict], mounts: set[str],
                 overwrite: bool = False, depth: int = 2, max_attempts: int = 3, reporter=None,
                 registry=None, force: bool = False, max_restarts: int = 2, session_timeouts: Timeouts | None = None,
                 handles: dict | None = None):
        self.runtime, self.slots, self.on_outcome = runtime, slots, on_outcome
        self.budgets, self.hashes, self.mounts, self.overwrite = budgets, hashes, mounts, overwrite
        self.depth, self.max_attempts, self.reporter, self.max_restarts = depth, max_attempts, reporter, max_restarts
        self.force = force
        self.session_timeouts = session_timeouts or Timeouts()   # the overall cap of one worker's session
        self.given = dict(handles or {})                          # slot -> a WorkerHandle the caller started
        self.workers = [WorkerState(slot) for slot in slots]
        self.router = Router(self.workers, registry)
        if force:
            self.router.fits = lambda job, worker: True  # type: ignore[method-assign]
        self.queue = JobQueue(jobs, self.router.choose, self.router.someone_else_can_take)
        self.jobs = jobs
        self.cancel = threading.Event()
        self.lock = threading.Lock()
        self.outbox: queue.Queue[Outcome | None] = queue.Queue()
        self.started_here: list[str] = []
        self.prompt_ids: set[str] = set()                         # every prompt this command submitted
        self.last_fault: ImagegenError | None = None
        self.fatal: BaseException | None = None
        self.threads: list[threading.Thread] = []
        self._warned: set[str] = set()

    # --- the run ------------------------------------------------------------------
    def run(self) -> None:
        """Run every job; on_outcome hears of each as it ends, in this thread."""
        with closing(self.stream()) as outcomes:
            for outcome in outcomes:
                try:
                    self.on_outcome(outcome)
                except KeyboardInterrupt:  # Ctrl-C while writing an outcome down: the same as any other time
                    self._interrupt(self.threads)
                    raise
                except OSError as exc:
                    if exc.errno in render.DISK_FULL:
                        raise render.as_error(exc) from exc
                    raise

    def stream(self) -> Generator[Outcome, None, None]:
        """Start every worker, check every job fits some GPU, then yield each job's Outcome as it ends."""
        self._in_threads(self._start, "start")
        ready = [state for state in self.workers if state.handle is not None]
        if not ready:
            raise self.last_fault or ImagegenError("worker_start_failed", "no worker could start")
        if not self.force:
            work = [(job.bundle, job.params) for job in self.jobs]
            self.router.check_feasible(work, [state.memory_bytes for state in ready])
        threads = self.threads = self._spawn(self._serve, "worker")
        ended = False
        try:
            yield from self._outcomes(threads)
            if self.fatal is not None:
                raise self.fatal
            for job in self.queue.drain():  # no worker is left that can take them: report, never drop
                reason = self.last_fault.message if self.last_fault else "no running worker can hold it"
                error = ImagegenError("worker_died", f"no worker left to run this job ({reason})")
                yield Outcome(job, "-", error=error)
            ended = True
        except KeyboardInterrupt:
            self._interrupt(threads)
            raise
        finally:
            if not ended:  # the caller stopped early (an error, or it needed no more): cancel our prompts
                self.cancel.set()
                for thread in threads:
                    thread.join(10)

    def _outcomes(self, threads: list[threading.Thread]) -> Iterator[Outcome]:
        running = len(threads)
        while self.fatal is None and running:
            try:
                outcome = self.outbox.get(timeout=0.2)
            except queue.Empty:
                if not any(thread.is_alive() for thread in threads) and self.outbox.empty():
                    return
                continue
            if outcome is None:
                running -= 1
            else:
                yield outcome
        while not self.outbox.empty():  # outcomes a thread put before its end marker
            outcome = self.outbox.get_nowait()
            if outcome is not None:
                yield outcome

    def _spawn(self, target, label: str) -> list[threading.Thread]:
        threads = [threading.Thread(target=target, args=(state,), name=f"{label}-{state.slot}", daemon=True)
                   for state in self.workers]
        for thread in threads:
            thread.start()
        return threads

    def _in_threads(self, target, label: str) -> None:
        threads = self._spawn(target, label)
        try:
            while any(thread.is_alive() for thread in threads):
                for thread in threads:
                    thread.join(0.2)
        except KeyboardInterrupt:
            self._interrupt(threads)
            raise

    def _interrupt(self, threads: list[threading.Thread]) -> None:
        """Ctrl-C: each thread cancels this command's prompts (and only those) and finishes the file it
        writes; then a worker this command started is stopped, unless someone else is using it."""
        self.cancel.set()
        for thread in threads:
            thread.join(10)
        for state in self.workers:
            if state.slot in self.started_here and not self._others_using(state):
                self.runtime.stop(state.slot)

    def _others_using(self, state: WorkerState) -> bool:
        """Whether the worker's ComfyUI queue holds prompts that are not ours."""
        if state.handle is None:
            return False
        try:
            listed = state.handle.client(request_timeout=3).queue()
        except Exception:  # noqa: BLE001 - a worker that does not answer serves nobody
            return False
        ids = {item[1] for key in ("queue_running", "queue_pending") for item in listed.get(key, []) if len(item) > 1}
        return bool(ids - self.prompt_ids)

    def _emit(self, outcome: Outcome) -> None:
        self.outbox.put(outcome)

    def _status(self, message: str) -> None:
        if self.reporter:
            self.reporter.status(message)

    def _once(self, key: str, message: str, warning: bool = False) -> None:
        with self.lock:
            if key in self._warned or self.reporter is None:
                return
            self._warned.add(key)
        if warning:
            self.reporter.warn(message)
        elif hasattr(self.reporter, "once"):
            self.reporter.once(key, message)
        else:
            self.reporter.status(message)

    def _as_run(self, job: Job, state: WorkerState) -> workflows.Params:
        params = workflows.for_device(job.params, state.handle.device)
        if job.params.fast and not params.fast:
            self._once("fast-cpu", workflows.FAST_ON_CPU_NOTE)
        return params

    # --- one worker ---------------------------------------------------------------
    def _start(self, state: WorkerState) -> bool:
        try:
            handle = self.given.pop(state.slot, None) or \
                self.runtime.ensure(state.slot, on_status=self._status, mounts=self.mounts)
            state.handle = handle
            info = {**handle.info, **handle.client(request_timeout=10).worker_info()}
        except Exception as exc:  # noqa: BLE001 - any failure to start is reported, never a silent dead thread
            error = render.as_error(exc)
            if error.code == "internal_error":
                error = ImagegenError("worker_start_failed", f"worker {state.slot} could not start: {error.message}")
            state.status, state.handle = f"failed to start: {error.code}", None
            self.last_fault = error
            self._status(f"worker {state.slot} could not start: {error.message}")
            return False
        state.name, state.status, state.healthy = handle.name, "ready", True
        state.gpu = info.get("gpu")
        self.router.restore(state)
        if state.gpu and state.gpu.get("memory_total_mib"):
            state.memory_bytes = int(state.gpu["memory_total_mib"]) * 1024 * 1024
        elif handle.device == "cpu":
            state.memory_bytes = host_memory_bytes() or None
        if handle.started_here:
            with self.lock:
                self.started_here.append(state.slot)
        return True

    def _serve(self, state: WorkerState) -> None:
        """A worker's thread. Whatever goes wrong, its jobs are settled before the thread ends, and its
        end is said on the outbox, so the last outcome needs no poll to be noticed."""
        try:
            if state.handle is not None:
                self._serve_worker(state)
        except BaseException as exc:  # noqa: BLE001 - a bug or an unforeseen error: settle, never hang the run
            error = render.as_error(exc)
            self.last_fault = error
            state.status = f"failed: {error.code}"
            if isinstance(exc, FATAL):  # the call ends with this exception (a closed stdout: exit 141)
                self.fatal = exc
                self.cancel.set()
                for job in list(state.held):
                    self._settle(job, state)
                return
            self._settle_held(state, error, retry=error.code in WORKER_FAULTS)
        finally:
            self.outbox.put(None)

    def _serve_worker(self, state: WorkerState) -> None:
        while not self.cancel.is_set():
            fault = self._drive(state)
            if fault is None:
                state.status = "done"
                return
            self._worker_failed(state, fault)
            if not self._rejoin(state):
                state.status = f"left after {fault.code}"
                return

    def _worker_failed(self, state: WorkerState, fault: ImagegenError) -> None:
        """The worker died, hung or ran out of memory: explain it, stop it if it is ours, and hand its
        jobs back to the queue (or fail those that used up their attempts)."""
        owned = bool(getattr(self.runtime, "can_restart", False) and state.handle.started_here)
        fault = worker_fault(self.runtime, state.handle, fault, stop=owned)
        self.last_fault = fault
        state.healthy, state.status = False, "unhealthy"
        if len(self.workers) > 1:
            self._status(f"worker {state.name} failed ({fault.code}); its jobs go to other workers")
        self._settle_held(state, fault, retry=True)

    def _rejoin(self, state: WorkerState) -> bool:
        """Bring a failed worker back: start it again through the runtime (a bounded number of times;
        a worker someone else started was left running and is found again), or, for a runtime that
        cannot restart workers, wait until it answers its health check again, while there is work left."""
        restartable = bool(getattr(self.runtime, "can_restart", False))
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
        client = state.handle.client(request_timeout=render.request_timeout())
        progress = self.reporter.worker_progress(state) if hasattr(self.reporter, "worker_progress") else None
        with client.session(self.session_timeouts, progress, self.cancel) as session:
            while not self.cancel.is_set():
                fault = self._fill(state, client, session)
                if fault is not None or not state.inflight:
                    return fault
                fault = self._collect(state, client, session)
                if fault is not None:
                    return fault
        return None

    def _fill(self, state: WorkerState, client, session) -> ImagegenError | None:
        """Keep `depth` jobs queued on the worker. Returns a worker fault, if submitting hit one."""
        while len(state.inflight) < self.depth:
            job = self._take(state, block=not state.inflight)
            if job is None:
                return None
            try:
                prompt_id = self._submit(job, state, client, session)
            except Exception as exc:  # noqa: BLE001 - classified: the worker's fault, or this job's own
                fault = self._classify(job, state, exc)
                if fault is not None:
                    return fault
                continue
            state.inflight[prompt_id] = (job, time.monotonic())
            state.last_bundle = job.bundle.name
        return None

    def _submit(self, job: Job, state: WorkerState, client, session) -> str:
        params = self._as_run(job, state)
        uploaded = {key: self._upload(client, path) for key, path in job.inputs.items()}
        if job.workflow is not None:  # a user's own graph (imagegen run)
            graph = workflow_jobs.graph_for(job.workflow, uploaded)
        else:
            graph = workflows.build(job.bundle, workflows.with_inputs(params, uploaded) if uploaded else params)
        job.meta["log_marker"] = addons.log_marker(client, params)  # LoRA keys ComfyUI cannot apply: read after
        prompt_id = session.submit(graph, self.budgets(job, state))
        self.prompt_ids.add(prompt_id)
        return prompt_id

    @staticmethod
    def _upload(client, path) -> str:
        """One input file into the worker's input folder, named by its content (so jobs and funnels
        sharing a worker never collide, and a file already there is simply replaced by itself)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImagegenError("invalid_source_image", f"cannot read the input image {path}: {exc.strerror or exc}",
                                hint="The file moved or was deleted during the run; restore it and rerun.") from exc
        return client.upload_image(data, f"{hashlib.sha256(data).hexdigest()[:16]}-{path.name}")

    def _collect(self, state: WorkerState, client, session) -> ImagegenError | None:
        """Wait for the next of the worker's jobs to finish, and save it. Returns a worker fault, if any."""
        try:
            prompt_id, entry = session.next_finished()
        except ImagegenError as error:
            if error.code == "interrupted" and self.cancel.is_set():
                return None
            failed = None if error.code in WORKER_FAULTS else state.inflight.pop(error.details.get("prompt_id"), None)
            return error if failed is None else self._classify(failed[0], state, error)
        except Exception as exc:  # noqa: BLE001 - an answer we cannot read: the worker's fault
            message = render.as_error(exc).message
            return ImagegenError("worker_unreachable", f"the worker's answer could not be read: {message}")
        job, submitted = state.inflight.pop(prompt_id)
        try:
            params = self._as_run(job, state)
            compiling = self._compiling(state, params)
            if job.workflow is not None:  # a user's own graph: every output node's images
                records = workflow_jobs.save_outputs(client, entry, job, state.handle, self.overwrite,
                                                     self.hashes.get(job.bundle.name, {}), submitted)
            else:
                records = render.save_outputs(client, entry, job.bundle, params, job.targets, state.handle,
                                              self.overwrite, self.hashes.get(job.bundle.name, {}), submitted,
                                              learn=not compiling,
                                              warn=lambda message: self._once("blank", message, warning=True),
                                              extra=job.meta.get("record"))
                unapplied = addons.unapplied_warning(client, params, job.meta.get("log_marker"))
                if unapplied:
                    self._once(unapplied, unapplied, warning=True)
                    for record in records:
                        record.setdefault("warnings", []).append(unapplied)
        except Exception as exc:  # noqa: BLE001 - classified: a full disk, a lost worker, a bug
            return self._classify(job, state, exc)
        phases = entry.get("imagegen_phase_times", {})
        state.done += len(records)
        state.busy_seconds += sum(phases.get(p, 0.0) for p in ("loading", "sampling", "finishing"))
        self._settle(job, state)
        self._emit(Outcome(job, state.name, records=records))
        healthy = compiling or self.router.observe(state, job, phases)
        if not healthy and (len(self.workers) > 1 or self.max_restarts > 0):  # someone can act on the verdict
            return ImagegenError("worker_unhealthy",
                                 f"worker {state.name} ran more than 5x slower than its own history")
        return None

    @staticmethod
    def _compiling(state: WorkerState, params: workflows.Params) -> bool:
        """Whether this fast-mode job compiled its model (the first of its shape on this worker): its
        time is compile time, which says nothing about the worker's speed."""
        if not params.fast:
            return False
        shape = (params.width, params.height, params.batch_size)
        if shape in state.compiled:
            return False
        state.compiled.add(shape)
        return True

    def _classify(self, job: Job, state: WorkerState, exc: BaseException) -> ImagegenError | None:
        """A worker fault is returned (the worker's jobs go elsewhere); any other error fails this job."""
        if isinstance(exc, FATAL):
            raise exc
        error = render.as_error(exc)
        if error.code in WORKER_FAULTS:
            return error
        self._fail(job, state, error)
        return None

    # --- settling jobs ------------------------------------------------------------
    def _take(self, state: WorkerState, block: bool) -> Job | None:
        job = self.queue.take(state, block)
        if job is not None:
            job.attempts += 1
            state.held.append(job)
        return job

    def _settle(self, job: Job, state: WorkerState, requeue: bool = False) -> None:
        if job in state.held:
            state.held.remove(job)
        self.queue.settle(job, requeue)

    def _fail(self, job: Job, state: WorkerState, error: ImagegenError) -> None:
        self._settle(job, state)
        self._emit(Outcome(job, state.name or state.slot, error=error))

    def _settle_held(self, state: WorkerState, fault: ImagegenError, retry: bool) -> None:
        """Every job this worker holds goes back to the queue (retry), or fails once it used up its attempts."""
        jobs = list(state.held)
        state.inflight.clear()
        for job in jobs:
            if retry and job.attempts < self.max_attempts:
                self._settle(job, state, requeue=True)
            elif self.max_attempts == 1 or not retry:
                self._fail(job, state, fault)
            else:
                message = f"gave up after {job.attempts} attempts: {fault.message}"
                self._fail(job, state, ImagegenError(fault.code, message, hint=fault.hint))
