"""Workers as Docker containers: one per GPU, pinned to that device, published on 127.0.0.1 only.

A container is found again by its labels, so any invocation reuses a warm worker. Its secret lives
in a 0600 file on the host, bind-mounted read-only, so it never shows in `docker inspect`.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Set as AbstractSet
from pathlib import Path

from imagegen.runtimes import docker_spec as spec
from imagegen.runtimes.base import (
    WorkerHandle,
    cpu_slots,
    default_keep_warm,
    default_start_timeout,
    healthy,
    is_cpu_slot,
    pid_alive,
    worker_keep_warm,
)
from imagegen.runtimes.docker_spec import CONTAINER_PORT, IMAGE, LABEL, memory_limit
from imagegen.util import cancel, gpus, paths
from imagegen.util.errors import ImagegenError
from imagegen.util.files import write_private


def connect():
    """A docker client, or a clear error naming what is wrong with the daemon."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=60)
        client.ping()
        return client
    except DockerException as exc:
        text = str(exc)
        if "Permission denied" in text or "PermissionError" in text:
            raise ImagegenError(
                "docker_permission",
                f"permission denied on the Docker socket ({os.environ.get('DOCKER_HOST', '/var/run/docker.sock')})",
            ) from exc
        raise ImagegenError(
            "docker_unavailable", f"the Docker daemon is not reachable: {text.splitlines()[0][:200]}"
        ) from exc


class DockerRuntime:
    name = "docker"
    uses_host_cache = True
    can_restart = True
    compiles_on_host = False  # the image brings its own compiler
    reads_local_files = True  # mounted into the container at the same path

    def __init__(
        self,
        keep_warm: float | None = None,
        start_timeout: float | None = None,
        image: str | None = None,
        shared_models: list[Path] | None = None,
    ):
        self.keep_warm = default_keep_warm() if keep_warm is None else keep_warm
        self.start_timeout = default_start_timeout() if start_timeout is None else start_timeout
        self.image = image or IMAGE
        self.shared_models = shared_models or []
        self.uid, self.gid = os.getuid(), os.getgid()
        self.dir = paths.ensure_private_dir(paths.workers_dir())
        self.key = "docker"  # names this engine's token and lock files
        self.client = self._connect()

    # --- what differs for an engine on another host (runtimes/docker_hosts.py) ------------
    def _connect(self):
        return connect()

    def _owner_labels(self) -> dict[str, str]:
        """Labels every container of this engine and owner carries, and the filter that finds them."""
        return {LABEL: "1", "imagegen.owner_uid": str(self.uid)}

    def _url(self, host_port: str) -> str:
        return f"http://127.0.0.1:{host_port}"

    def _user(self) -> str:
        return f"{self.uid}:{self.gid}"

    def _write_secret(self, slot: str, token: str) -> str:
        """Keep a worker's secret as a 0600 file; the path the engine bind-mounts it from."""
        write_private(self._token_path(slot), token)
        return str(self._token_path(slot))

    def _models_source(self) -> str:
        models_dir = paths.models_dir()
        models_dir.mkdir(parents=True, exist_ok=True)
        return str(models_dir)

    def _name(self, slot: str) -> str:
        return f"imagegen-{self.uid}-{slot[:16].lower().replace(':', '-')}-{secrets.token_hex(3)}"

    def _gpus(self) -> list:
        return gpus.list_gpus()

    where = ""  # " on HOST" for an engine on another host, in messages

    def _image_missing(self) -> ImagegenError:
        return ImagegenError(
            "image_missing",
            f"the Docker image {self.image} is not built",
            hint="Build it with ./build-image.sh (./build-image.sh --cpu-local offline), or use --runtime local.",
        )

    def image_present(self) -> bool:
        from docker.errors import ImageNotFound

        try:
            self.client.images.get(self.image)
            return True
        except ImageNotFound:
            return False

    # --- discovery ------------------------------------------------------------------
    def _containers(self, slot: str | None = None, all_states: bool = False):
        filters = {"label": [f"{key}={value}" for key, value in self._owner_labels().items()]}
        if slot is not None:
            filters["label"].append(f"imagegen.slot={slot}")
        return self.client.containers.list(all=all_states, filters=filters)

    def _token_path(self, slot: str) -> Path:
        return self.dir / f"{self.key}-{slot}.token"

    def _handle(self, container, slot: str, started_here: bool) -> WorkerHandle | None:
        container.reload()
        bindings = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(CONTAINER_PORT) or []
        if not bindings:
            return None
        url = self._url(bindings[0]["HostPort"])
        try:
            token = self._token_path(slot).read_text().strip()
        except OSError:
            return None
        return WorkerHandle(
            name=container.name,
            url=url,
            token=token,
            device=container.labels.get("imagegen.device", "cpu"),
            runtime=self.name,
            slot=slot,
            started_here=started_here,
            info={"container": container.id[:12], "image": self.image},
        )

    def find(self, slot: str, mounts: AbstractSet[str] = frozenset()) -> WorkerHandle | None:
        """A running worker of this slot that fits: this image and memory cap, and it sees every file
        in `mounts`. One that does not fit is left alone: someone may be using it (it idles out by
        itself), and the caller starts a separate container beside it."""
        for container in self._containers(slot):
            if not spec.fits(container, self.image, mounts):
                continue
            handle = self._handle(container, slot, started_here=False)
            if handle and healthy(handle.url):
                return handle
        return None

    def slots(self, choice: str | None = None, cpu_workers: int = 1) -> list[str]:
        found = gpus.select(self._gpus(), choice)
        return [g.uuid for g in found] or cpu_slots(cpu_workers)

    # --- lifecycle ------------------------------------------------------------------
    def ensure(self, slot: str | None = None, on_status=None, mounts: AbstractSet[str] = frozenset()) -> WorkerHandle:
        from filelock import FileLock

        slot = slot or self.slots()[0]
        self.reap()
        with FileLock(str(self.dir / f"{self.key}-{slot}.lock")):
            return self.find(slot, mounts) or self._adopt(slot, mounts) or self._start(slot, set(mounts), on_status)

    def _adopt(self, slot: str, mounts: AbstractSet[str]) -> WorkerHandle | None:
        """A fitting container still starting whose owner died (a command killed mid-start): we hold
        the slot lock, so nobody else is starting it. Wait for it instead of starting another beside it."""
        from docker.errors import DockerException

        for container in self._containers(slot):
            if not spec.fits(container, self.image, mounts):
                continue
            try:
                container.reload()  # a listed container's attrs lack its health
                owner = int(container.labels.get("imagegen.owner_pid", "0"))
            except (ValueError, DockerException):
                continue
            health = container.attrs.get("State", {}).get("Health", {}).get("Status")
            if health == "starting" and not pid_alive(owner):
                try:
                    return self._wait_ready(container, slot)
                except ImagegenError:
                    self._remove(container)  # it never came up: start a fresh one
        return None

    def _start(self, slot: str, mounts: set[str], on_status) -> WorkerHandle:
        from docker.errors import APIError
        from docker.types import DeviceRequest

        if not self.image_present():
            raise self._image_missing()
        gpu = not is_cpu_slot(slot)
        if gpu and "nvidia" not in (self.client.info().get("Runtimes") or {}):
            raise ImagegenError("nvidia_runtime_missing", f"GPU {slot} was requested but Docker has no NVIDIA runtime")
        running = []
        for container in self._containers(slot, all_states=True):
            if container.status in ("exited", "dead"):
                self._remove(container)  # we hold the slot lock: nobody is starting it
            elif container.status == "running":
                running.append(container)  # another mount set, image or memory cap: left alone
        token_path = self._token_path(slot)
        # the slot's containers share its secret: a running one keeps the secret it was started with
        token = token_path.read_text().strip() if running and token_path.is_file() else secrets.token_urlsafe(32)
        command, volumes = spec.serve_command(gpu, worker_keep_warm(self.keep_warm), self._models_source(),
                                              self._write_secret(slot, token), self.shared_models, mounts)
        labels = spec.worker_labels(self._owner_labels(), slot, gpu, self.image, mounts)
        if on_status:
            on_status(f"starting a Docker worker{self.where} ({'GPU ' + slot if gpu else 'CPU'}, image {self.image})")
        name = self._name(slot)
        try:
            container = self.client.containers.run(
                self.image,
                command,
                detach=True,
                init=True,
                user=self._user(),
                name=name,
                ports={CONTAINER_PORT: ("127.0.0.1", None)},
                volumes=volumes,
                labels=labels,
                environment={"IMAGEGEN_MODELS_DIR": "/models", "HOME": "/tmp"},
                mem_limit=memory_limit() or None,
                memswap_limit=memory_limit() or None,
                device_requests=[DeviceRequest(device_ids=[slot], capabilities=[["gpu"]])] if gpu else None,
            )
        except APIError as exc:
            self._remove_named(name)  # created but not started
            raise ImagegenError(
                "worker_start_failed", f"Docker refused to start the worker: {exc.explanation or exc}"
            ) from exc
        except BaseException:
            self._remove_named(name)  # Ctrl-C between create and start must not leave it behind
            raise
        try:
            return self._wait_ready(container, slot)
        except BaseException:
            self._remove(container)
            raise

    def _wait_ready(self, container, slot: str) -> WorkerHandle:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            container.reload()
            state = container.attrs["State"]
            if state["Status"] in ("exited", "dead"):
                raise spec.death(container, "during start-up")
            handle = self._handle(container, slot, started_here=True)
            if handle and healthy(handle.url):
                return handle
            cancel.check("the worker start")  # an MCP client gave up: the container is removed
            time.sleep(0.25)
        raise ImagegenError(
            "timeout",
            f"the Docker worker was not ready within {self.start_timeout:.0f}s. "
            f"Last log lines:\n{spec.logs(container)}",
            hint="Set IMAGEGEN_START_TIMEOUT higher on a slow machine.",
            phase="server_start",
        )

    def diagnose(self, worker: WorkerHandle, grace: float = 10.0) -> ImagegenError | None:
        """Why a worker failed a job: its container exited (killed for memory?), or it hangs.

        When ComfyUI is killed (the kernel's OOM killer picks it, not the container's init), the
        worker notices within a second and exits: wait for that before calling it a hang."""
        from docker.errors import DockerException, NotFound

        deadline = time.monotonic() + grace
        while True:
            try:
                container = self.client.containers.get(worker.info.get("container") or worker.name)
            except NotFound:
                return ImagegenError("worker_died", f"the worker container {worker.name} is gone")
            except DockerException:
                container = None
            if container is not None and container.attrs["State"]["Status"] in ("exited", "dead"):
                return spec.death(container, "while running a job")
            if healthy(worker.url):
                return None
            if time.monotonic() >= deadline:
                return ImagegenError("worker_unreachable", f"the worker container {worker.name} stopped answering")
            time.sleep(0.5)

    @staticmethod
    def _remove(container) -> None:
        try:
            container.remove(force=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _remove_named(self, name: str) -> None:
        try:
            self._remove(self.client.containers.get(name))
        except Exception:  # noqa: BLE001 - never created
            pass

    def reap(self) -> list[str]:
        """Remove exited workers, and workers stuck starting (or created, never started) whose owner
        process is gone and whose start timeout has passed. A slot another process holds the lock of
        (it is starting a worker there) is skipped: nothing it may still be starting is removed."""
        from filelock import FileLock, Timeout

        removed = []
        by_slot: dict[str, list] = {}
        for container in self._containers(all_states=True):
            by_slot.setdefault(container.labels.get("imagegen.slot", "?"), []).append(container)
        for slot, containers in by_slot.items():
            try:
                with FileLock(str(self.dir / f"{self.key}-{slot}.lock"), timeout=0):
                    removed += [c.name for c in containers if self._reap_one(c)]
            except (Timeout, OSError):
                continue  # another process is starting a worker on this slot
        return removed

    def _reap_one(self, container) -> bool:
        try:
            container.reload()
        except Exception:  # noqa: BLE001 - gone meanwhile
            return False
        status = container.status
        if status in ("exited", "dead"):
            self._remove(container)
            return True
        try:
            owner = int(container.labels.get("imagegen.owner_pid", "0"))
            started = int(container.labels.get("imagegen.started", "0"))
        except ValueError:
            owner, started = 0, 0
        abandoned = not pid_alive(owner) and time.time() - started > self.start_timeout
        starting = status == "created" or (
            status == "running" and container.attrs.get("State", {}).get("Health", {}).get("Status") == "starting"
        )
        if starting and abandoned:
            self._remove(container)
            return True
        return False

    def workers(self) -> list[dict]:
        self.reap()
        found = []
        for container in self._containers():
            slot = container.labels.get("imagegen.slot", "?")
            handle = self._handle(container, slot, started_here=False)
            info = {}
            if handle:
                try:
                    info = handle.client(request_timeout=5).worker_info()
                except ImagegenError:
                    pass
            found.append(
                {
                    "name": container.name,
                    "runtime": self.name,
                    "slot": slot,
                    "device": container.labels.get("imagegen.device"),
                    "url": handle.url if handle else None,
                    "container": container.id[:12],
                    "healthy": bool(handle and healthy(handle.url)),
                    **{
                        k: info.get(k)
                        for k in (
                            "gpu",
                            "it_per_s",
                            "last_model",
                            "idle_seconds",
                            "jobs_done",
                            "keep_warm",
                            "imagegen_version",
                        )
                    },
                }
            )
        return found

    def stop(self, slot: str | None = None) -> list[str]:
        stopped = []
        for container in self._containers(slot, all_states=True):
            self._remove(container)
            stopped.append(container.name)
        return stopped
