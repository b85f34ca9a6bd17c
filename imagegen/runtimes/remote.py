"""RemoteRuntime: workers that already run elsewhere, reached by URL.

Each entry is `URL[#TOKEN]` or `URL#@PATH` (the token read from a file), comma-separated in
IMAGEGEN_REMOTE_WORKERS; entries without a token use the file named by IMAGEGEN_REMOTE_TOKEN_FILE
when it is set. An entry is either an imagegen worker (its proxy answers /imagegen/health and
/imagegen/info) or a plain ComfyUI server (found through /system_stats). One slot per entry:
remote-1, remote-2, ... This runtime never starts or stops anything: `stop` is a no-op, and a
worker that does not answer is reported, not restarted. Model files are not sent: a remote worker
must already hold every file a job names, under the same name, in its own models folders.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

from imagegen.comfy.client import TOKEN_HEADER
from imagegen.runtimes.base import WorkerHandle
from imagegen.util.env import env_float
from imagegen.util.errors import ImagegenError

ENV = "IMAGEGEN_REMOTE_WORKERS"
TOKEN_FILE_ENV = "IMAGEGEN_REMOTE_TOKEN_FILE"
INSECURE_ENV = "IMAGEGEN_REMOTE_INSECURE"  # =1: allow a token over plain http:// to another host
ENTRY_HINT = f"Set {ENV} to comma-separated URL[#TOKEN] entries, e.g. http://gpu-box:8188#s3cret or http://gpu-box:8188#@/path/to/token."


@dataclass(frozen=True)
class Remote:
    slot: str
    url: str
    token: str = field(default="", repr=False)

    @property
    def name(self) -> str:
        return f"{self.slot}@{urlsplit(self.url).netloc}"


def _loopback(host: str) -> bool:
    """This machine: localhost or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_token(path: str, where: str) -> str:
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ImagegenError("invalid_argument", f"{where}: cannot read the token file {path}: {exc.strerror}",
                            hint=ENTRY_HINT) from None
    if not token:
        raise ImagegenError("invalid_argument", f"{where}: the token file {path} is empty", hint=ENTRY_HINT)
    return token


def parse_entries(entries: list[str] | str | None = None) -> list[Remote]:
    """`URL[#TOKEN]` / `URL#@PATH` entries (a list, or one comma-separated string; None: the environment)."""
    if entries is None:
        entries = os.environ.get(ENV, "")
    if isinstance(entries, str):
        entries = entries.split(",")
    default_token_file = os.environ.get(TOKEN_FILE_ENV)
    remotes: list[Remote] = []
    for raw in (e.strip() for e in entries):
        if not raw:
            continue
        where = f"remote worker {len(remotes) + 1}"
        url, _, token = raw.partition("#")
        url = url.strip().rstrip("/")
        parts = urlsplit(url)
        if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.username
                or parts.password):
            raise ImagegenError("invalid_argument", f"{where}: {url!r} is not an http(s)://HOST[:PORT][/PATH] URL",
                                hint=ENTRY_HINT)
        try:
            _ = parts.port  # urlsplit checks the port only when asked for it
        except ValueError:
            raise ImagegenError("invalid_argument", f"{where}: {url!r} has a bad port", hint=ENTRY_HINT) from None
        token = token.strip()
        if token.startswith("@"):
            token = _read_token(token[1:], where)
        elif not token and default_token_file:
            token = _read_token(default_token_file, where)
        if re.search(r"\s", token):
            raise ImagegenError("invalid_argument", f"{where}: the token contains whitespace", hint=ENTRY_HINT)
        if token and parts.scheme == "http" and not _loopback(parts.hostname) and os.environ.get(INSECURE_ENV) != "1":
            raise ImagegenError("invalid_argument",
                                f"{where}: {url} would send its token unencrypted (plain http:// to "
                                f"{parts.hostname}, not this machine)",
                                hint=f"Use https://, reach the worker through an SSH tunnel (http://127.0.0.1:PORT), "
                                     f"or set {INSECURE_ENV}=1 on a network you trust.")
        if any(r.url == url for r in remotes):
            raise ImagegenError("invalid_argument", f"{where}: {url} is listed twice", hint=ENTRY_HINT)
        remotes.append(Remote(slot=f"remote-{len(remotes) + 1}", url=url, token=token))
    return remotes


def _gpu_from_stats(device: dict) -> dict | None:
    """A ComfyUI /system_stats device as the GPU record imagegen workers report."""
    if not device or device.get("type") in (None, "cpu"):
        return None
    name = re.sub(r"^\w+:\d+\s+", "", str(device.get("name", ""))).split(" : ")[0].strip()
    return {"name": name or device.get("type"), "uuid": None,
            "memory_total_mib": int(device.get("vram_total") or 0) // 2 ** 20,
            "memory_free_mib": int(device.get("vram_free") or 0) // 2 ** 20}


class RemoteRuntime:
    """Workers that already run elsewhere: an imagegen worker's URL, or a plain ComfyUI URL."""

    name = "remote"
    uses_host_cache = False    # remote workers have their own models folders
    can_restart = False        # we did not start them: wait until they answer again
    compiles_on_host = False
    reads_local_files = False

    def __init__(self, entries: list[str] | str | None = None, ready_timeout: float | None = None,
                 request_timeout: float | None = None):
        self.remotes = parse_entries(entries)
        if not self.remotes:
            raise ImagegenError("runtime_unavailable", f"no remote workers are configured ({ENV} is empty)",
                                hint=ENTRY_HINT)
        self.ready_timeout = (env_float("IMAGEGEN_REMOTE_READY_TIMEOUT", 30.0) if ready_timeout is None
                              else ready_timeout)
        self.request_timeout = env_float("IMAGEGEN_REMOTE_TIMEOUT", 5.0, minimum=0.1) if request_timeout is None \
            else request_timeout
        self.kinds: dict[str, str] = {}   # slot -> "imagegen" or "comfyui", as last seen

    # --- plain HTTP -------------------------------------------------------------------
    def _get(self, remote: Remote, path: str, auth: bool = True) -> requests.Response:
        headers = {TOKEN_HEADER: f"Bearer {remote.token}"} if auth and remote.token else {}
        try:
            return requests.get(remote.url + path, headers=headers, timeout=self.request_timeout)
        except requests.ConnectionError:
            raise ImagegenError("worker_unreachable",
                                f"cannot reach the remote worker {remote.name} ({remote.url}): connection refused or "
                                "no route",
                                hint="imagegen does not start remote workers: check that the server runs and its URL "
                                f"in {ENV}.") from None
        except requests.Timeout:
            raise ImagegenError("worker_unreachable",
                                f"the remote worker {remote.name} ({remote.url}) did not answer {path} within "
                                f"{self.request_timeout:.0f}s: it may hang",
                                hint="Check the server (its log, its GPU); imagegen does not restart remote "
                                "workers.") from None

    def _json(self, remote: Remote, path: str) -> dict:
        response = self._get(remote, path)
        if response.status_code in (401, 403):
            raise ImagegenError("worker_unreachable",
                                f"the remote worker {remote.name} refused our credentials ({response.status_code} on "
                                f"{path})",
                                hint=f"Give its token in {ENV} as URL#TOKEN or URL#@TOKEN_FILE.")
        if response.status_code != 200:
            raise ImagegenError("worker_unreachable",
                                f"the remote worker {remote.name} answered {response.status_code} on {path}")
        try:
            return response.json()
        except ValueError:
            raise ImagegenError("worker_unreachable",
                                f"the remote worker {remote.name} answered {path} with something other than JSON: is "
                                "it ComfyUI?") from None

    # --- the runtime API ------------------------------------------------------------
    def _remote(self, slot: str | None) -> Remote:
        if slot is None:
            return self.remotes[0]
        for remote in self.remotes:
            if slot in (remote.slot, remote.url):
                return remote
        raise ImagegenError("invalid_argument",
                            f"no remote worker {slot!r} (known: {', '.join(r.slot for r in self.remotes)})")

    def slots(self, choice: str | None = None, cpu_workers: int = 1) -> list[str]:
        """One slot per URL. `choice` (--gpus): all, N (the first N), or slots, URLs and GPU UUIDs, comma-separated."""
        choice = (choice or "all").strip()
        if choice == "all":
            return [r.slot for r in self.remotes]
        if choice.isdigit():
            if not 1 <= int(choice) <= len(self.remotes):
                raise ImagegenError("invalid_argument",
                                    f"--gpus {choice}: {len(self.remotes)} remote worker(s) are configured")
            return [r.slot for r in self.remotes[: int(choice)]]
        chosen: list[str] = []
        uuids: dict[str, str] | None = None
        for part in (p.strip().rstrip("/") for p in choice.removeprefix("device=").split(",") if p.strip()):
            match = [r.slot for r in self.remotes if part in (r.slot, r.url)]
            if not match and part.startswith("GPU-"):
                if uuids is None:
                    uuids = {item["slot"]: ((item.get("gpu") or {}).get("uuid") or "") for item in self.workers()}
                match = [slot for slot, found in uuids.items() if found and found.startswith(part)]
            if not match:
                known = ", ".join(f"{r.slot} ({r.url})" for r in self.remotes)
                raise ImagegenError("invalid_argument",
                                    f"--gpus {choice}: no remote worker {part!r} (workers: {known})")
            chosen += [slot for slot in match if slot not in chosen]
        return chosen

    def _probe(self, remote: Remote, wait: float, on_status=None) -> WorkerHandle:
        deadline = time.monotonic() + wait
        said = False
        while True:
            health = self._get(remote, "/imagegen/health", auth=False)
            if health.status_code == 200:
                kind, info = "imagegen", self._json(remote, "/imagegen/info")
                device, gpu = str(info.get("device") or "unknown"), info.get("gpu")
                break
            if health.status_code != 503:  # no imagegen proxy there: a plain ComfyUI, or nothing we know
                stats = self._json(remote, "/system_stats")
                if not isinstance(stats.get("devices"), list) or not isinstance(stats.get("system"), dict):
                    raise ImagegenError("worker_unreachable",
                                        f"{remote.url} is neither an imagegen worker nor a ComfyUI server (no "
                                        "/system_stats)")
                first = (stats["devices"] or [{}])[0]
                kind, device, gpu = "comfyui", str(first.get("type") or "unknown"), _gpu_from_stats(first)
                info = {"comfyui_version": stats["system"].get("comfyui_version"), "last_model": None,
                        "jobs_done": None, "idle_seconds": None, "keep_warm": None, "imagegen_version": None}
                break
            if time.monotonic() >= deadline:
                raise ImagegenError("worker_unreachable",
                                    f"the remote worker {remote.name} is not ready: its ComfyUI does not answer (503 "
                                    "on /imagegen/health)",
                                    hint="Check the server's log; imagegen does not restart remote workers.")
            if on_status and not said:
                on_status(f"waiting for the remote worker {remote.name} to become ready")
                said = True
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        self.kinds[remote.slot] = kind
        info = {**info, "kind": kind, "gpu": gpu, "url": remote.url}
        return WorkerHandle(name=remote.name, url=remote.url, token=remote.token, device=device, runtime=self.name,
                            slot=remote.slot, started_here=False, info=info)

    def ensure(self, slot: str | None = None, on_status=None, mounts: AbstractSet[str] = frozenset()) -> WorkerHandle:
        """The worker for a slot, when it answers; never starts one. `mounts` cannot apply to a remote
        worker: it must hold the model files itself."""
        return self._probe(self._remote(slot), self.ready_timeout, on_status)

    def find(self, slot: str, mounts: AbstractSet[str] = frozenset()) -> WorkerHandle | None:
        try:
            return self._probe(self._remote(slot), 0.0)
        except ImagegenError:
            return None

    def diagnose(self, worker: WorkerHandle) -> ImagegenError | None:
        """Why a worker failed a job: it does not answer (None: it still answers)."""
        remote = self._remote(worker.slot)
        kind = self.kinds.get(remote.slot, worker.info.get("kind"))
        path = "/imagegen/health" if kind == "imagegen" else "/system_stats"
        try:
            response = self._get(remote, path, auth=path != "/imagegen/health")
        except ImagegenError as error:
            return error
        if response.status_code != 200:
            return ImagegenError("worker_unreachable",
                                 f"the remote worker {remote.name} answers {response.status_code} on {path}: its "
                                 "ComfyUI is not answering")
        return None

    def workers(self) -> list[dict]:
        """Every configured worker, answering or not, with its device, GPU and state."""
        def describe(remote: Remote) -> dict:
            base = {"name": remote.name, "runtime": self.name, "slot": remote.slot, "url": remote.url, "pid": None}
            try:
                handle = self._probe(remote, 0.0)
            except ImagegenError as error:
                return {**base, "device": "unknown", "healthy": False, "error": error.message, "kind": None,
                        "gpu": None,
                        **{k: None
                           for k in ("last_model", "idle_seconds", "jobs_done", "keep_warm", "imagegen_version",
                                     "comfyui_version")}}
            info = handle.info
            return {**base, "device": handle.device, "healthy": True, "kind": info["kind"], "gpu": info.get("gpu"),
                    **{k: info.get(k)
                       for k in ("last_model", "idle_seconds", "jobs_done", "keep_warm", "imagegen_version",
                                 "comfyui_version")}}

        with ThreadPoolExecutor(max_workers=min(16, len(self.remotes))) as pool:
            return list(pool.map(describe, self.remotes))

    def stop(self, slot: str | None = None) -> list[str]:
        """Remote workers are not ours to stop: nothing is stopped."""
        return []
