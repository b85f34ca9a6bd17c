"""Pick the runtime for `--runtime`: docker, local, remote, or auto."""

from __future__ import annotations

from imagegen.util.errors import ImagegenError


def make_runtime(name: str = "auto", keep_warm: float | None = None):
    """`docker`, `local`, `remote` (workers already running elsewhere, from IMAGEGEN_REMOTE_WORKERS),
    or `auto` (Docker when its daemon answers and the image is built, else local). A runtime that
    cannot run here is refused now, before any worker starts."""
    if name not in ("auto", "docker", "local", "remote"):
        raise ImagegenError("invalid_argument", f"--runtime {name!r}: choose auto, docker, local or remote")
    if name == "remote":
        from imagegen.runtimes.remote import RemoteRuntime

        return RemoteRuntime()
    from imagegen.models.cache import shared_trees

    shared = shared_trees()
    docker_problem = None
    if name in ("docker", "auto"):
        from imagegen.runtimes import docker as docker_runtime

        try:
            runtime = docker_runtime.DockerRuntime(keep_warm=keep_warm, shared_models=shared)
            if runtime.image_present() or name == "docker":
                return runtime
            docker_problem = f"the image {runtime.image} is not built"
        except ImagegenError as error:
            if name == "docker":
                raise  # docker_unavailable or docker_permission: the specific code, before anything starts
            docker_problem = error.message
    from imagegen.runtimes.local import LocalRuntime, find_comfyui_dir

    try:
        find_comfyui_dir()
    except ImagegenError as error:
        why = f"{error.message}; Docker: {docker_problem}" if docker_problem else error.message
        raise ImagegenError("runtime_unavailable", f"no runtime can start a worker: {why}",
                            hint="Build the Docker image (./build-image.sh) or install the local runtime "
                            "(scripts/setup-dev.sh).") from None
    return LocalRuntime(keep_warm=keep_warm, shared_models=shared)


def runtimes_here(name: str = "auto", keep_warm: float | None = None) -> list:
    """Every runtime that may have workers here, for `workers` and `stop`: with `auto`, the local
    runtime (its records), Docker when its daemon answers, and the remote workers when some are
    configured. A named runtime is just that one, refused as make_runtime refuses it."""
    if name != "auto":
        return [make_runtime(name, keep_warm)]
    import os

    from imagegen.models.cache import shared_trees
    from imagegen.runtimes.local import LocalRuntime

    found: list = [LocalRuntime(keep_warm=keep_warm, shared_models=shared_trees())]
    try:
        from imagegen.runtimes.docker import DockerRuntime

        found.append(DockerRuntime(keep_warm=keep_warm, shared_models=shared_trees()))
    except (ImagegenError, ImportError):
        pass  # no daemon, or no permission: it can have no workers we could list or stop
    if os.environ.get("IMAGEGEN_REMOTE_WORKERS", "").strip():
        from imagegen.runtimes.remote import RemoteRuntime

        found.append(RemoteRuntime())
    return found
