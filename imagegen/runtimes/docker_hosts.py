"""Docker on other hosts over SSH (--hosts): one engine per host, its workers reached through SSH forwards.

A host's engine is reached through a unix socket on this machine that ssh forwards to the host's
Docker socket; each worker, published on 127.0.0.1 of its own host, through a local port forward.
Secrets are made here and written to the host as 0600 files over ssh's stdin. Containers carry the
host's id and this controller's name in their labels (and names), so two hosts sharing one engine,
or two controllers sharing one host, never see each other's workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import socket
import threading
from pathlib import Path

from imagegen.runtimes import ssh_forward
from imagegen.runtimes.docker import LABEL, DockerRuntime
from imagegen.runtimes.ssh_forward import Forward, Target
from imagegen.util import gpus
from imagegen.util.errors import ImagegenError
from imagegen.util.files import write_private

LOCAL = "local"
CONTAINER_UID = 65532            # the workers' user on a host we log in to as root (never root in the container)
DOCKER_SOCKET = "/var/run/docker.sock"
PROBE = ('printf "uid=%s\\ngid=%s\\nhome=%s\\n" "$(id -u)" "$(id -g)" "$HOME"; '
         'command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.free '
         '--format=csv,noheader,nounits 2>/dev/null | sed "s/^/gpu=/"; true')


def host_names(text: str | None) -> list[str]:
    """`--hosts box2,me@box3:2222` (or IMAGEGEN_DOCKER_HOSTS): the names, in order, each once."""
    value = text if text is not None else os.environ.get("IMAGEGEN_DOCKER_HOSTS", "")
    return list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))


def controller_id() -> str:
    """Who started a container on a host: this machine and user (the owner of its workers there)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{socket.gethostname()}-{os.getuid()}")[:63]


def _context_host(name: str) -> str | None:
    """The Docker endpoint of a `docker context` of this name, if one exists."""
    base = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "contexts" / "meta"
    meta = base / hashlib.sha256(name.encode()).hexdigest() / "meta.json"
    try:
        return json.loads(meta.read_text())["Endpoints"]["docker"]["Host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve(name: str) -> Target | None:
    """A host name as given: None for this machine (`local`), else its SSH target (a context's too)."""
    if name == LOCAL:
        return None
    endpoint = _context_host(name) if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name) else None
    if endpoint is not None:
        if endpoint.startswith("ssh://"):
            return Target.parse(endpoint)
        if endpoint.startswith("unix://"):
            return None
        raise ImagegenError("invalid_argument", f"--hosts {name}: the Docker context points at {endpoint}, "
                            "which is neither this machine nor an SSH host",
                            hint="Use an ssh:// context (docker context create NAME --docker host=ssh://me@box).")
    return Target.parse(name)


class HostDocker(DockerRuntime):
    """One Docker engine on another host, reached over SSH. Its workers, secrets and cache live there."""

    def __init__(self, name: str, target: Target, keep_warm: float | None = None, image: str | None = None):
        self.host_name, self.target = name, target
        self.host_id = hashlib.sha256(str(target).encode()).hexdigest()[:8]
        self.where = f" on {name}"
        self.forwards: dict[str, Forward] = {}
        self.docker_forward: Forward | None = None
        self._lock = threading.Lock()
        super().__init__(keep_warm=keep_warm, image=image)
        self.key = f"ssh-{self.host_id}"

    # --- the connection ---------------------------------------------------------------
    def _connect(self):
        import docker
        from docker.errors import DockerException

        facts: dict[str, str] = {}
        found = []
        for line in ssh_forward.run(self.target, PROBE, timeout=60).splitlines():
            key, _, value = line.partition("=")
            if key == "gpu":
                found.append(gpus.parse_line(value))
            elif key:
                facts[key] = value.strip()
        self.remote_uid, self.remote_gid = int(facts.get("uid", "0")), int(facts.get("gid", "0"))
        self.remote_home = facts.get("home") or "/tmp"
        self.remote_gpus = found
        self.docker_forward = Forward(self.target, DOCKER_SOCKET, unix=True).open()
        try:
            client = docker.DockerClient(base_url=f"unix://{self.docker_forward.local}", timeout=60)
            client.ping()
        except DockerException as exc:
            self.docker_forward.close()
            raise ImagegenError("docker_unavailable", f"the Docker engine on {self.host_name} does not answer: "
                                f"{str(exc).splitlines()[0][:200]}",
                                hint=f"Check `{self.target.login()} docker info` (the login user needs the docker "
                                     "group), then `imagegen doctor --hosts " + self.host_name + "`.") from exc
        return client

    def reconnect_if_dropped(self) -> None:
        """After the SSH connection was cut: connect again (or say the host is unreachable)."""
        with self._lock:
            if self.docker_forward is None or not self.docker_forward.alive():
                for forward in self.forwards.values():
                    forward.close()
                self.forwards.clear()
                self.client = self._connect()

    def close(self) -> None:
        for forward in [*self.forwards.values(), self.docker_forward]:
            if forward is not None:
                forward.close()

    # --- the hooks of DockerRuntime ---------------------------------------------------------
    def _owner_labels(self) -> dict[str, str]:
        return {LABEL: "ssh", "imagegen.owner_uid": str(self.uid), "imagegen.controller": controller_id(),
                "imagegen.host": self.host_id}

    def _url(self, host_port: str) -> str:
        with self._lock:
            forward = self.forwards.get(host_port)
            if forward is None or not forward.alive():
                forward = self.forwards[host_port] = Forward(self.target, f"127.0.0.1:{host_port}").open()
        return f"http://127.0.0.1:{forward.port}"

    def _user(self) -> str:
        return f"{self.remote_uid}:{self.remote_gid}" if self.remote_uid else f"{CONTAINER_UID}:{CONTAINER_UID}"

    def _chown(self) -> str:
        return f" && chown {CONTAINER_UID}:{CONTAINER_UID}" if self.remote_uid == 0 else " && true"

    def _put_private(self, remote: str, data: bytes) -> str:
        """A 0600 file on the host, readable by the workers' user; the data goes over ssh's stdin."""
        folder = shlex.quote(str(Path(remote).parent))
        temp, final = shlex.quote(remote + ".tmp"), shlex.quote(remote)
        ssh_forward.run(self.target, f"umask 077 && mkdir -p {folder} && cat > {temp}{self._chown()} {temp} "
                                     f"&& mv -f {temp} {final}", data=data)
        return remote

    def _base_dir(self) -> str:
        """imagegen's folder on the host: IMAGEGEN_HOSTS_DIR (a path there), else ~/.cache/imagegen."""
        return os.environ.get("IMAGEGEN_HOSTS_DIR") or f"{self.remote_home}/.cache/imagegen"

    def _state_dir(self) -> str:
        return f"{self._base_dir()}/secrets/{controller_id()}"

    def _write_secret(self, slot: str, token: str) -> str:
        write_private(self._token_path(slot), token)  # this machine's copy: the client's half
        return self._put_private(f"{self._state_dir()}/{slot}.token", token.encode())

    def _models_source(self) -> str:
        folder = f"{self._base_dir()}/models"
        if not getattr(self, "_models_ready", False):
            quoted = shlex.quote(folder)
            ssh_forward.run(self.target, f"mkdir -p {quoted}{self._chown()} {quoted}")
            self._models_ready = True
        return folder

    def _name(self, slot: str) -> str:
        import secrets

        return f"imagegen-ssh-{self.host_id}-{slot[:16].lower().replace(':', '-')}-{secrets.token_hex(3)}"

    def _gpus(self) -> list:
        return self.remote_gpus

    def _image_missing(self) -> ImagegenError:
        return ImagegenError("image_missing", f"the Docker image {self.image} is not on {self.host_name}",
                             hint=f"Copy it there: imagegen image push {self.host_name}")

    def ensure(self, slot=None, on_status=None, mounts=frozenset()):
        self.reconnect_if_dropped()
        return super().ensure(slot, on_status, mounts)

    def workers(self) -> list[dict]:
        return [{**item, "host": self.host_name} for item in super().workers()]

    def reap(self) -> list[str]:
        """Also a one-off fetch container whose command (on this machine) is gone."""
        from imagegen.runtimes.base import pid_alive

        removed = super().reap()
        labels = {k: v for k, v in self._owner_labels().items() if k != LABEL}
        filters = {"label": ["imagegen.fetch=1", *(f"{k}={v}" for k, v in labels.items())]}
        for container in self.client.containers.list(all=True, filters=filters):
            try:
                owner = int(container.labels.get("imagegen.owner_pid", "0"))
            except ValueError:
                owner = 0
            if not pid_alive(owner):
                self._remove(container)
                removed.append(container.name)
        return removed


def split_slot(slot: str) -> tuple[str, str]:
    """"box2/GPU-3f2a..." -> ("box2", "GPU-3f2a..."); host names hold no "/" (nor do GPU UUIDs)."""
    host, _, inner = slot.rpartition("/")
    return host, inner


class HostsRuntime:
    """Workers on every host of --hosts: `local` (this machine's Docker) and SSH hosts, in one pool.

    A slot is "HOST/SLOT". A host that does not answer keeps one slot whose start fails with the
    reason, so a batch goes on with the others and says why; when no host answers, nothing starts."""

    name = "docker"
    can_restart = True
    compiles_on_host = False

    def __init__(self, names: list[str], keep_warm: float | None = None, shared_models: list[Path] | None = None):
        if not names:
            raise ImagegenError("invalid_argument", "--hosts names no host", hint="e.g. --hosts local,box2")
        targets = {name: resolve(name) for name in names}
        self.engines: dict[str, DockerRuntime] = {}
        self.problems: dict[str, ImagegenError] = {}

        def connect(name: str) -> None:
            target = targets[name]
            try:
                self.engines[name] = (DockerRuntime(keep_warm=keep_warm, shared_models=shared_models)
                                      if target is None else HostDocker(name, target, keep_warm=keep_warm))
            except ImagegenError as error:
                self.problems[name] = error

        threads = [threading.Thread(target=connect, args=(name,), daemon=True) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.names = names
        self.needed: dict = {}                      # bundle name -> Bundle, for the hosts to fetch
        self.fetched: set[tuple[str, str]] = set()  # (host, bundle name) fetched or found there
        self.renderer = None
        self._fetch_lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}
        self.uses_host_cache = any(targets[name] is None for name in self.engines)
        self.reads_local_files = all(target is None for target in targets.values())

    def require_some(self) -> None:
        """Refuse now when no host answers (the first host's reason, every host named)."""
        if not self.engines:
            first = self.problems[self.names[0]]
            raise ImagegenError(first.code, "no host of --hosts answers: " +
                                "; ".join(f"{name}: {error.message}" for name, error in self.problems.items()),
                                hint=first.hint)

    def _engine(self, slot: str) -> tuple[DockerRuntime, str]:
        host, inner = split_slot(slot)
        if host in self.problems:
            raise self.problems[host]
        if host not in self.engines:
            raise ImagegenError("invalid_argument", f"no host {host!r} in --hosts (slot {slot})")
        return self.engines[host], inner

    def image_present(self) -> bool:
        return all(engine.image_present() for engine in self.engines.values())

    def slots(self, choice: str | None = None, cpu_workers: int = 1) -> list[str]:
        found = []
        for name in self.names:
            if name in self.engines:
                found += [f"{name}/{slot}" for slot in self.engines[name].slots(choice, cpu_workers)]
            else:
                found.append(f"{name}/unreachable")
        return found

    def ensure(self, slot: str | None = None, on_status=None, mounts=frozenset()):
        self.require_some()
        if slot is None:  # one worker (generate): a warm one, else one on a host holding the model, else any
            slot = (self._warm_slot(mounts) or self._holding_slot()
                    or next(s for s in self.slots() if split_slot(s)[0] in self.engines))
        engine, inner = self._engine(slot)
        self._fetch_needed(split_slot(slot)[0], engine)
        handle = engine.ensure(inner, on_status, mounts)
        handle.slot = slot
        handle.info["host"] = split_slot(slot)[0]
        return handle

    def _warm_slot(self, mounts) -> str | None:
        for name, engine in self.engines.items():
            for inner in engine.slots():
                try:
                    if engine.find(inner, mounts) is not None:
                        return f"{name}/{inner}"
                except Exception:  # noqa: BLE001 - a host that dropped: try the next
                    break
        return None

    def diagnose(self, worker):
        engine, _ = self._engine(worker.slot)
        return engine.diagnose(worker)

    def workers(self) -> list[dict]:
        found = []
        for name, engine in self.engines.items():
            try:
                found += [{**item, "host": name, "slot": f"{name}/{item['slot']}"} for item in engine.workers()]
            except ImagegenError:
                continue  # the host dropped since we connected: it is reported by doctor, not here
        return found

    def stop(self, slot: str | None = None) -> list[str]:
        if slot is not None:
            engine, inner = self._engine(slot)
            try:
                return engine.stop(inner)
            except Exception:  # noqa: BLE001 - a host that dropped: its workers idle out there by themselves
                return []
        stopped = []
        for engine in self.engines.values():
            try:
                stopped += engine.stop()
            except Exception:  # noqa: BLE001 - likewise
                continue
        return stopped

    def fetch_on_hosts(self, bundle, renderer=None) -> None:
        """A bundle the coming jobs need: each SSH host fetches its missing files when a worker of it
        starts (ensure), once per host, so hosts that hold the model start rendering first."""
        with self._fetch_lock:
            self.needed[bundle.name] = bundle
            self.renderer = renderer or self.renderer

    def _fetch_needed(self, name: str, engine) -> None:
        from imagegen.runtimes.host_fetch import fetch_on_host

        if not isinstance(engine, HostDocker):
            return  # this machine's cache was filled by the engine (uses_host_cache)
        with self._fetch_lock:
            lock = self._host_locks.setdefault(name, threading.Lock())
        with lock:  # one fetch per host, however many of its workers start at once
            for bundle in list(self.needed.values()):
                if (name, bundle.name) not in self.fetched:
                    fetch_on_host(engine, bundle, self.renderer)
                    self.fetched.add((name, bundle.name))

    def _holding_slot(self) -> str | None:
        holding = self._holding_hosts()
        return f"{holding[0]}/{self.engines[holding[0]].slots()[0]}" if holding else None

    def holding_first(self, slots: list[str]) -> list[str]:
        """The slots of hosts holding every needed model first: a batch with fewer jobs than GPUs uses
        those and fetches nothing."""
        holding = set(self._holding_hosts()) if len(self.engines) > 1 else set()
        return sorted(slots, key=lambda slot: split_slot(slot)[0] not in holding)

    def _holding_hosts(self) -> list[str]:
        """The hosts that hold every needed model: this machine first (its cache was filled already),
        then SSH hosts whose caches have the files."""
        from imagegen.runtimes.host_fetch import missing_on_host

        found = []
        for name, engine in sorted(self.engines.items(), key=lambda item: isinstance(item[1], HostDocker)):
            try:
                if not isinstance(engine, HostDocker) or not any(
                        missing_on_host(engine, bundle, engine._models_source()) for bundle in self.needed.values()):
                    found.append(name)
            except ImagegenError:
                continue
        return found
