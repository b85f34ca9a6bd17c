"""What runs on a Ray node: the worker actor (one per GPU) and the per-node tasks (inventory, model fetch).

The actor starts the same worker the local runtime starts (ComfyUI and the token proxy, bound to
127.0.0.1 on its node) and relays to it: graphs in, progress and PNG bytes out. Errors come back as
plain dicts, never pickled exceptions, so the driver raises the very ImagegenError the worker raised.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from imagegen.comfy.client import ComfyClient, JobSession, Timeouts, output_images
from imagegen.util.errors import ImagegenError

MEMORY_LABEL = "imagegen.gpu_memory_mib"   # a node label (or env IMAGEGEN_GPU_MEMORY_MIB) declaring each GPU's memory
PREFETCHED = "imagegen_prefetched"          # a finished entry's PNG bytes, sent with it (one call less per image)


def file_key(ref: dict) -> tuple:
    return ref["filename"], ref.get("subfolder", ""), ref.get("type", "output")


def as_failure(error: ImagegenError) -> dict:
    return {"error": {"code": error.code, "message": error.message, "hint": error.hint, "details": error.details}}


def raise_failure(answer):
    """The driver's side of as_failure: the worker's own error, raised here."""
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        failure = answer["error"]
        raise ImagegenError(failure["code"], failure["message"], hint=failure.get("hint"),
                            **(failure.get("details") or {}))
    return answer


def _relayed(method):
    """An actor method whose ImagegenError travels back as a dict (see raise_failure)."""
    def call(self, *args, **kwargs):
        try:
            return {"ok": method(self, *args, **kwargs)}
        except ImagegenError as error:
            return as_failure(error)
    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


def _node_labels() -> dict:
    import ray

    try:
        return dict(ray.get_runtime_context().get_node_labels() or {})
    except Exception:  # noqa: BLE001 - an older Ray without labels: the environment still declares memory
        return {}


def declared_memory_mib() -> int | None:
    """Each GPU's memory as the node declares it (a label or IMAGEGEN_GPU_MEMORY_MIB), for GPUs that
    cannot say it themselves (logical GPUs in tests, or a card nvidia-smi does not see)."""
    value = _node_labels().get(MEMORY_LABEL) or os.environ.get("IMAGEGEN_GPU_MEMORY_MIB")
    try:
        return int(value) if value else None
    except ValueError:
        return None


class _Until:
    """A cancel flag for JobSession that is set once a deadline passes (or the session was closed)."""

    def __init__(self, seconds: float, closed: bool = False):
        self.deadline, self.closed = time.monotonic() + seconds, closed

    def is_set(self) -> bool:
        return self.closed or time.monotonic() >= self.deadline


class NodeWorker:
    """One GPU's worker on its node (made a Ray actor by runtimes/ray.py with num_gpus=1)."""

    def __init__(self, keep_warm: float, start_timeout: float, gpus_on_node: int = 1):
        self.keep_warm, self.start_timeout, self.gpus_on_node = keep_warm, start_timeout, gpus_on_node
        self.local: Any = None    # the runtime that started our worker (ray_node.runtime_for)
        self.mode = ""            # docker, local or attached
        self.handle: Any = None
        self.client: ComfyClient | None = None
        self.sessions: dict[str, JobSession] = {}

    # --- start and facts ----------------------------------------------------------
    @_relayed
    def where(self) -> dict:
        """The node Ray placed this actor on (a replacement goes wherever a GPU was free) and its GPU ids."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    @_relayed
    def start(self, gpus_on_node: int | None = None) -> dict:
        """Find this node's warm worker for our GPU, or start one (the imagegen container, a local process,
        or a worker the node runs itself: runtimes/ray_node.py); returns its handle's facts."""
        import ray

        from imagegen.runtimes import ray_node
        from imagegen.util.gpus import detect_device

        self.gpus_on_node = gpus_on_node or self.gpus_on_node
        node_id = ray.get_runtime_context().get_node_id()
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        index = gpu_ids[0] if gpu_ids else "0"
        self.local, self.mode = ray_node.runtime_for(node_id, self.keep_warm, self.start_timeout, self.gpus_on_node)
        slot = ray_node.slot_for(self.mode, self.local, index, detect_device() == "cuda" and bool(gpu_ids))
        self.handle = self.local.ensure(slot)
        self.client = self.handle.client(request_timeout=30.0)
        return {"local_slot": slot, "device": self.handle.device, "started_here": self.handle.started_here,
                "node_id": node_id, "gpu_index": index, "worker_mode": self.mode,
                "container": self.handle.info.get("container"), "info": self._info()}

    def _info(self) -> dict:
        assert self.client is not None
        info = dict(self.client.worker_info())
        declared = declared_memory_mib()
        if declared:
            import ray

            gpu = dict(info.get("gpu") or {})
            node = ray.get_runtime_context().get_node_id()
            gpu.setdefault("name", "GPU (declared)")
            gpu["memory_total_mib"] = declared
            gpu["uuid"] = gpu.get("uuid") or f"ray-{node[:12]}-{self.handle.slot if self.handle else ''}"
            info["gpu"] = gpu
        return info

    @_relayed
    def worker_info(self) -> dict:
        return self._info()

    @_relayed
    def comfyui_version(self) -> str | None:
        assert self.client is not None
        return self.client.comfyui_version()

    @_relayed
    def choices(self):
        assert self.client is not None
        return self.client.choices()

    @_relayed
    def object_info(self, node_class: str | None = None) -> dict:
        assert self.client is not None
        return self.client.object_info(node_class)

    @_relayed
    def log_entries(self) -> list[dict] | None:
        assert self.client is not None
        return self.client.log_entries()

    @_relayed
    def system_stats(self) -> dict:
        assert self.client is not None
        return self.client.system_stats()

    @_relayed
    def queue(self) -> dict:
        assert self.client is not None
        return self.client.queue()

    @_relayed
    def health(self) -> dict:
        """Whether the worker process is alive and answers (the local runtime's own diagnosis)."""
        if self.local is None or self.handle is None:
            return {"started": False}
        problem = self.local.diagnose(self.handle)
        return {"started": True, "problem": None if problem is None else as_failure(problem)["error"]}

    # --- files --------------------------------------------------------------------
    @_relayed
    def fetch_file(self, ref: dict) -> bytes:
        assert self.client is not None
        return self.client.fetch_file(ref)

    @_relayed
    def upload_image(self, data: bytes, name: str, subfolder: str = "imagegen") -> str:
        assert self.client is not None
        return self.client.upload_image(data, name, subfolder)

    @_relayed
    def cancel(self, prompt_ids: list[str]) -> None:
        assert self.client is not None
        self.client.cancel(prompt_ids)

    # --- jobs ---------------------------------------------------------------------
    @_relayed
    def open_session(self, timeouts: Timeouts) -> str:
        assert self.client is not None
        key = uuid.uuid4().hex
        session = self.client.session(timeouts)
        session.__enter__()
        self.sessions[key] = session
        return key

    @_relayed
    def submit(self, key: str, graph: dict, timeouts: Timeouts | None = None) -> str:
        return self.sessions[key].submit(graph, timeouts)

    @_relayed
    def next_finished(self, key: str, wait: float) -> dict:
        """The next finished prompt within `wait` seconds ({"done": [prompt_id, entry]}), or the
        progress of those still pending ({"progress": {prompt_id: Progress}})."""
        session, until = self.sessions[key], _Until(wait)
        session.cancel = until
        try:
            prompt_id, entry = session.next_finished()
        except ImagegenError as error:
            if error.code == "interrupted" and "prompt_id" not in error.details and until.is_set():
                return {"progress": {pid: session.states[pid] for pid in session.pending}}
            raise
        assert self.client is not None
        entry[PREFETCHED] = {file_key(ref): self.client.fetch_file(ref) for ref in output_images(entry)}
        return {"done": [prompt_id, entry]}

    @_relayed
    def close_session(self, key: str) -> None:
        session = self.sessions.pop(key, None)
        if session is not None:
            session.__exit__(None, None, None)  # interrupts whatever of ours is still pending

    @_relayed
    def stop_worker(self) -> bool:
        """Stop the worker process, when this actor started it (a warm one it found is left running)."""
        for key in list(self.sessions):
            self.close_session(key)
        if self.local is not None and self.handle is not None and self.handle.started_here:
            return bool(self.local.stop(self.handle.slot))
        return False


# --- per-node tasks (run with NodeAffinitySchedulingStrategy on the node they describe) -------
def node_facts(bundles: list | None = None) -> dict:
    """This node's view: token auth in force, the model files it holds (of `bundles`), which worker its actors
    start (the container or a local process: ray_node.mode)."""
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    from imagegen.models import cache
    from imagegen.runtimes import ray_node
    from imagegen.util import paths

    holds = {}
    for bundle in bundles or []:
        holds[bundle.name] = not cache.missing_files(bundle)
    node_id = ray.get_runtime_context().get_node_id()
    return {"node_id": node_id, "auth": bool(is_token_auth_enabled()), "worker_mode": ray_node.mode(node_id),
            "holds": holds, "models_dir": str(paths.models_dir()), "shared_models": [str(t) for t in
                                                                                 cache.shared_trees()],
            "declared_memory_mib": declared_memory_mib()}


def node_fetch(bundle) -> dict:
    """Fetch a bundle's missing files into this node's model cache (verified, resumable, file-locked:
    a second fetch on the same node waits and then finds the file)."""
    from imagegen.models import cache
    from imagegen.models.fetch import make_fetcher

    events: list[dict] = []
    try:
        missing = [f.key for f in cache.missing_files(bundle)]
        cache.ensure_bundle(bundle, fetch=make_fetcher(events.append))
    except ImagegenError as error:
        return as_failure(error)
    return {"ok": {"fetched": missing, "events": len(events)}}


def node_workers() -> list[dict]:
    import ray

    from imagegen.runtimes import ray_node

    return ray_node.workers(ray.get_runtime_context().get_node_id())


def node_stop() -> list[str]:
    import ray

    from imagegen.runtimes import ray_node

    return ray_node.stop(ray.get_runtime_context().get_node_id())
