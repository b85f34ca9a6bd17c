"""Which worker a Ray node's actors start (IMAGEGEN_RAY_NODE_WORKERS in the environment of its `ray start`):
the imagegen container when the node's Docker engine answers and holds the image, else a local process;
or workers the node runs itself (URL#TOKEN, one per GPU index).

Values: `auto` (the default: the container where it can, else a local process), `docker` (the container,
or an error saying why not), `local` (a local process), or `URL#TOKEN,...`.
"""

from __future__ import annotations

import os

from imagegen.util.errors import ImagegenError

WORKERS_ENV = "IMAGEGEN_RAY_NODE_WORKERS"
NODE_LABEL = "imagegen.ray_node"   # a container worker's label: the Ray node that started it (only it stops it)


def setting() -> str:
    return os.environ.get(WORKERS_ENV, "").strip() or "auto"


def _docker(node_id: str):
    """This node's Docker engine as a runtime whose workers carry the node's label, or an ImagegenError."""
    from imagegen.models.cache import shared_trees
    from imagegen.runtimes.docker import DockerRuntime

    class NodeDocker(DockerRuntime):
        def _owner_labels(self) -> dict[str, str]:
            return {**super()._owner_labels(), NODE_LABEL: node_id}

    runtime = NodeDocker(shared_models=shared_trees())
    runtime.key = f"ray-docker-{node_id[:12]}"  # its secrets and locks, apart from `--runtime docker`'s
    if not runtime.image_present():
        raise runtime._image_missing()
    return runtime


def mode(node_id: str) -> dict:
    """What this node's actors start: {"mode": "docker", "image": ...}, {"mode": "local"} (with "why" when
    auto found no usable Docker), {"mode": "attached", "workers": N}, or {"mode": ..., "error": ...}."""
    chosen = setting()
    if chosen not in ("auto", "docker", "local"):
        return {"mode": "attached", "workers": len([p for p in chosen.split(",") if p.strip()])}
    if chosen == "local":
        return {"mode": "local"}
    try:
        runtime = _docker(node_id)
    except (ImagegenError, ImportError) as error:
        why = error.message if isinstance(error, ImagegenError) else "the docker package is not installed"
        return {"mode": "local", "why": why} if chosen == "auto" else {"mode": "docker", "error": why}
    return {"mode": "docker", "image": runtime.image}


def runtime_for(node_id: str, keep_warm: float, start_timeout: float, gpus_on_node: int):
    """(the runtime that starts this node's worker, its mode): a container engine, a LocalRuntime, or a
    RemoteRuntime for attached workers. `docker` that cannot be honoured raises its error."""
    from imagegen.models.cache import shared_trees
    from imagegen.runtimes.local import LocalRuntime

    chosen = setting()
    if chosen not in ("auto", "docker", "local"):
        from imagegen.runtimes.remote import RemoteRuntime

        return RemoteRuntime(chosen), "attached"
    if chosen != "local":
        try:
            docker = _docker(node_id)
            docker.keep_warm, docker.start_timeout = keep_warm, start_timeout
            return docker, "docker"
        except (ImagegenError, ImportError) as error:
            if chosen == "docker":
                if isinstance(error, ImagegenError):
                    raise
                raise ImagegenError("docker_unavailable", f"{WORKERS_ENV}=docker, but this node's Python has no "
                                    "docker package", hint="pip install docker on the node, or set auto.") from None
    local = LocalRuntime(keep_warm=keep_warm, start_timeout=start_timeout, shared_models=shared_trees())
    local.cpu_workers = max(1, gpus_on_node)
    return local, "local"


def slot_for(kind: str, runtime, index: str, on_gpu: bool) -> str:
    """The runtime's slot for Ray's GPU `index` on this node."""
    if kind == "attached":
        slots = runtime.slots()
        return slots[int(index) % len(slots)]
    if not on_gpu:
        return "cpu" if index == "0" else f"cpu-{int(index) + 1}"
    if kind == "docker":  # a container is pinned by the GPU's UUID
        from imagegen.util import gpus

        found = [g.uuid for g in gpus.list_gpus() if str(g.index) == index]
        return found[0] if found else index
    return index


def workers(node_id: str) -> list[dict]:
    """Every imagegen worker on this node: local processes, and the containers this node's actors started."""
    from imagegen.runtimes.local import LocalRuntime

    return LocalRuntime().workers() + _on_docker(node_id, lambda docker: docker.workers())


def stop(node_id: str) -> list[str]:
    from imagegen.runtimes.local import LocalRuntime

    return LocalRuntime().stop() + _on_docker(node_id, lambda docker: docker.stop())


def _on_docker(node_id: str, call) -> list:
    """call(this node's Docker runtime) where its setting may start containers, else (or with no engine) []."""
    if setting() not in ("auto", "docker"):
        return []
    try:
        return call(_docker(node_id))
    except (ImagegenError, ImportError):
        return []
