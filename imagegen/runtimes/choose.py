"""Pick the runtime for `--runtime`: docker, local, remote, ray, or auto."""

from __future__ import annotations

from imagegen.util.errors import ImagegenError


def hosts_runtime(name: str, keep_warm: float | None, hosts: str | None):
    """Docker on the hosts of --hosts (or IMAGEGEN_DOCKER_HOSTS), or None when none are named."""
    from imagegen.runtimes.docker_hosts import HostsRuntime, host_names

    names = host_names(hosts)
    if not names:
        return None
    if name not in ("auto", "docker"):
        raise ImagegenError("invalid_argument", f"--hosts runs Docker workers: it cannot go with --runtime {name}",
                            hint="Drop --runtime (or pass --runtime docker) with --hosts.")
    from imagegen.models.cache import shared_trees

    return HostsRuntime(names, keep_warm=keep_warm, shared_models=shared_trees())


def make_runtime(name: str = "auto", keep_warm: float | None = None, hosts: str | None = None):
    """`docker`, `local`, `remote` (workers already running elsewhere, from IMAGEGEN_REMOTE_WORKERS),
    or `auto` (Docker when its daemon answers and the image is built, else local). A runtime that
    cannot run here is refused now, before any worker starts. `hosts`: Docker on those hosts over SSH."""
    on_hosts = hosts_runtime(name, keep_warm, hosts)
    if on_hosts is not None:
        on_hosts.require_some()
        return on_hosts
    if name not in ("auto", "docker", "local", "remote", "ray"):
        raise ImagegenError("invalid_argument", f"--runtime {name!r}: choose auto, docker, local, remote or ray")
    if name == "ray":  # the cluster at RAY_ADDRESS (--ray-address sets it)
        from imagegen.runtimes.ray import RayRuntime

        return RayRuntime(keep_warm=keep_warm)
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


def runtimes_here(name: str = "auto", keep_warm: float | None = None, hosts: str | None = None) -> list:
    """Every runtime that may have workers here, for `workers` and `stop`: with `auto`, the local
    runtime (its records), Docker when its daemon answers, and the remote workers when some are
    configured. A named runtime is just that one, refused as make_runtime refuses it. With `hosts`:
    the Docker engines of those hosts (a host that does not answer has nothing listed or stopped)."""
    on_hosts = hosts_runtime(name, keep_warm, hosts)
    if on_hosts is not None:
        return [on_hosts]
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
