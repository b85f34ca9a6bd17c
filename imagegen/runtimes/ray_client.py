"""The driver's side of a Ray worker: ComfyClient's interface, forwarded to the worker's actor.

The scheduler and render.save_outputs talk to it exactly as to an HTTP worker (session, submit,
next_finished, fetch_file, upload_image, worker_info, ...). A lost actor or node raises the same
worker-fault codes an HTTP client raises (worker_died, worker_unreachable), so retries elsewhere
are the scheduler's own.
"""

from __future__ import annotations

import threading
import time

from imagegen.comfy.client import Progress, Timeouts
from imagegen.runtimes.ray_actor import PREFETCHED, file_key, raise_failure
from imagegen.util.errors import ImagegenError

NAMESPACE = "imagegen"          # the Ray namespace of every actor imagegen starts
HEAD_LOST = threading.Event()   # set by RayRuntime's watch on the head: every call then fails at once
HEAD_HINT = "Start the head again (and the nodes), then rerun the same command: batch resumes from its manifest."
POLL_WAIT = 1.0     # seconds one next_finished call waits on the node before it reports progress


def call(actor, name: str, method: str, *args, timeout: float = 60.0):
    """One actor method, its relayed ImagegenError raised here, a lost actor as a worker fault."""
    import ray
    from ray import exceptions as rx

    lost = ImagegenError("worker_unreachable", f"the Ray cluster's head node is gone: {name} is given up",
                         hint=HEAD_HINT)
    if HEAD_LOST.is_set():
        raise lost
    try:
        ref = getattr(actor, method).remote(*args)
        deadline = time.monotonic() + timeout
        while not ray.wait([ref], timeout=min(1.0, max(0.0, deadline - time.monotonic())))[0]:
            if HEAD_LOST.is_set():
                raise lost
            if time.monotonic() >= deadline:
                raise rx.GetTimeoutError()
        answer = ray.get(ref)
    except rx.GetTimeoutError:
        raise ImagegenError("worker_unreachable", f"the Ray worker {name} did not answer {method} within "
                                                  f"{timeout:.0f}s", waited=timeout) from None
    except (rx.ActorDiedError, rx.ActorUnavailableError, rx.RayActorError) as exc:
        raise ImagegenError("worker_died", f"the Ray worker {name} is gone (its node left the cluster, or its "
                                           f"actor died): {type(exc).__name__}") from None
    except rx.RayTaskError as exc:  # a bug in the actor's method: say what it was
        cause = getattr(exc, "cause", None) or exc
        first = str(cause).splitlines()[0][:300] if str(cause) else ""
        raise ImagegenError("worker_unreachable",
                            f"the Ray worker {name} failed in {method}: {type(cause).__name__}: {first}") from None
    except (rx.RaySystemError, rx.RayError, ConnectionError) as exc:
        raise ImagegenError("worker_unreachable", f"Ray could not reach the worker {name}: "
                                                  f"{type(exc).__name__}") from None
    answer = raise_failure(answer)
    return answer["ok"] if isinstance(answer, dict) and "ok" in answer else answer


def without_files(info: dict) -> dict:
    """/object_info with every choice list emptied that the pinned definitions leave empty (lists of files)."""
    from imagegen.comfy import node_info

    pinned = node_info.pinned()
    for name, schema in info.items():
        for section, specs in ((schema or {}).get("input") or {}).items():
            for key, spec in (specs or {}).items() if isinstance(specs, dict) else ():
                known = (((pinned.get(name) or {}).get("input") or {}).get(section) or {}).get(key)
                if not known or _choices(known) is None or _choices(known) or _choices(spec) is None:
                    continue
                if isinstance(spec[0], list):
                    spec[0] = []
                else:
                    spec[1]["options"] = []
    return info


def _choices(spec) -> list | None:
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return list(spec[1].get("options") or [])
    return None


class RayClient:
    """What the engine calls a worker's client, for a worker behind a Ray actor."""

    def __init__(self, actor, name: str, request_timeout: float = 30.0):
        self.actor, self.name, self.request_timeout = actor, name, request_timeout
        self.facts: dict = {}
        self.prefetched: dict[tuple, bytes] = {}   # PNG bytes that came back with their finished prompt

    def _call(self, method: str, *args, timeout: float | None = None):
        return call(self.actor, self.name, method, *args, timeout=timeout or self.request_timeout)

    def worker_info(self) -> dict:
        return self._call("worker_info")

    def comfyui_version(self) -> str | None:
        if "version" not in self.facts:
            try:
                self.facts["version"] = self._call("comfyui_version")
            except ImagegenError:
                return None
        return self.facts["version"]

    def choices(self):
        return self._call("choices")

    def queue(self) -> dict:
        return self._call("queue")

    def object_info(self, node_class: str | None = None) -> dict:
        """The node's definitions, its lists of files emptied where the pinned ComfyUI's are: which model files
        a run may name is no one node's to say (each node has its own cache, and fetches what it lacks)."""
        return without_files(self._call("object_info", node_class))

    def system_stats(self) -> dict:
        return self._call("system_stats")

    def log_entries(self) -> list[dict] | None:
        """ComfyUI's recent log lines on the node (unapplied LoRA keys are read from them); None when unknown."""
        try:
            return self._call("log_entries")
        except ImagegenError:
            return None

    def cancel(self, prompt_ids: list[str], timeout: float = 2.0) -> None:
        try:
            self._call("cancel", list(prompt_ids), timeout=timeout + 3)
        except ImagegenError:
            pass

    def fetch_file(self, ref: dict) -> bytes:
        data = self.prefetched.pop(file_key(ref), None)
        return data if data is not None else self._call("fetch_file", ref, timeout=max(self.request_timeout, 120))

    def upload_image(self, data: bytes, name: str, subfolder: str = "imagegen") -> str:
        return self._call("upload_image", data, name, subfolder, timeout=max(self.request_timeout, 120))

    def session(self, timeouts: Timeouts | None = None, on_progress=None, cancel=None) -> RaySession:
        return RaySession(self, timeouts or Timeouts(), on_progress, cancel)


class RaySession:
    """JobSession's interface: submit at any time, collect prompts as they finish on the node."""

    def __init__(self, client: RayClient, timeouts: Timeouts, on_progress, cancel):
        self.client, self.timeouts, self.on_progress, self.cancel = client, timeouts, on_progress, cancel
        self.key: str | None = None
        self.pending: list[str] = []
        self.seen: dict[str, tuple] = {}

    def __enter__(self) -> RaySession:
        self.key = self.client._call("open_session", self.timeouts)
        return self

    def __exit__(self, *_exc) -> None:
        if self.key is not None:
            try:
                self.client._call("close_session", self.key, timeout=10)
            except ImagegenError:
                pass  # the actor is gone: its node took our prompts with it

    def submit(self, graph: dict, timeouts: Timeouts | None = None) -> str:
        prompt_id = self.client._call("submit", self.key, graph, timeouts)
        self.pending.append(prompt_id)
        return prompt_id

    def _report(self, states: dict[str, Progress]) -> None:
        for prompt_id, state in states.items():
            mark = (state.phase, state.step, state.total, state.node)
            if self.on_progress is not None and self.seen.get(prompt_id) != mark:
                self.seen[prompt_id] = mark
                self.on_progress(state)

    def next_finished(self) -> tuple[str, dict]:
        """Block until a pending prompt finishes on the node; the worker's errors are raised as it raised them."""
        while True:
            if self.cancel is not None and self.cancel.is_set():
                raise ImagegenError("interrupted", "stopped before the job finished")
            started = time.monotonic()
            try:
                answer = self.client._call("next_finished", self.key, POLL_WAIT,
                                           timeout=POLL_WAIT + self.client.request_timeout)
            except ImagegenError as error:
                if error.details.get("prompt_id") in self.pending:  # that prompt's own failure
                    self.pending.remove(error.details["prompt_id"])
                raise
            if "done" in answer:
                prompt_id, entry = answer["done"]
                for key, data in (entry.pop(PREFETCHED, None) or {}).items():
                    self.client.prefetched[key] = data
                if prompt_id in self.pending:
                    self.pending.remove(prompt_id)
                self.seen.pop(prompt_id, None)
                return prompt_id, entry
            self._report(answer.get("progress") or {})
            if time.monotonic() - started < POLL_WAIT / 10:
                time.sleep(POLL_WAIT / 10)  # the node answered at once (nothing pending): do not spin
