"""LocalRuntime: workers as local processes running `entrypoint.py serve` against a ComfyUI checkout.

A worker is found again by its record (workers dir, mode 0600: it holds the secret), so the
second `imagegen generate` reuses a warm worker instead of starting ComfyUI again.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

import requests

from imagegen.comfy.client import ComfyClient
from imagegen.runtimes.base import (
    WorkerHandle,
    cpu_slots,
    default_keep_warm,
    default_slot,
    default_start_timeout,
    healthy,
    is_cpu_slot,
    log_tail,
    pid_alive,
    worker_keep_warm,
)
from imagegen.util import cancel, paths, procs
from imagegen.util.env import env_float
from imagegen.util.errors import ImagegenError
from imagegen.util.files import write_private

# how long a worker that is ours and alive may not answer before it counts as hung


def find_comfyui_dir() -> Path:
    for candidate in paths.comfyui_dir_candidates():
        if (candidate / "main.py").is_file():
            return candidate
    tried = ", ".join(str(c) for c in paths.comfyui_dir_candidates())
    raise ImagegenError("comfyui_not_found", f"no ComfyUI checkout found (looked in {tried})")



class LocalRuntime:
    """Workers as local processes: for machines without Docker, and for the test suite."""

    name = "local"
    uses_host_cache = True
    can_restart = True
    compiles_on_host = True
    reads_local_files = True

    def __init__(self, keep_warm: float | None = None, start_timeout: float | None = None,
                 python: str | None = None, shared_models: list[Path] | None = None):
        self.keep_warm = default_keep_warm() if keep_warm is None else keep_warm
        self.start_timeout = default_start_timeout() if start_timeout is None else start_timeout
        self.busy_wait = env_float("IMAGEGEN_BUSY_WAIT", 60.0)  # checked up front, used when a worker is busy
        self.python = python or os.environ.get("IMAGEGEN_WORKER_PYTHON") or sys.executable
        self.shared_models = shared_models or []
        self.cpu_workers = 1
        self.dir = paths.ensure_private_dir(paths.workers_dir())

    def _files(self, slot: str) -> tuple[Path, Path, Path, Path]:
        base = self.dir / f"local-{slot}"
        return (base.with_suffix(".json"), base.with_suffix(".token"), base.with_suffix(".log"),
                base.with_suffix(".lock"))

    def _handle(self, slot: str, record: dict, started_here: bool) -> WorkerHandle:
        return WorkerHandle(name=f"local-{slot}", url=f"http://127.0.0.1:{record['port']}", token=record["token"],
                            device=record.get("device", "cpu"), runtime=self.name, slot=slot,
                            started_here=started_here, info=record)

    def _read(self, slot: str) -> dict | None:
        try:
            record = json.loads(self._files(slot)[0].read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _ours(self, record: dict) -> bool:
        """The recorded pid is still this worker: same start time and command line (pids are reused,
        after a reboot most of all). A record without them (an older worker) must prove itself with
        an authenticated /imagegen/info that names the same pid."""
        pid = record.get("pid")
        if record.get("pid_start") is not None:
            return procs.same_process(pid, record.get("pid_start"), record.get("cmdline"))
        if not isinstance(pid, int) or not pid_alive(pid) or "port" not in record:
            return False
        info = _info(record, timeout=5)
        return info is not None and info.get("pid") == pid

    def _drop_record(self, slot: str, record: dict) -> None:
        """Delete a stale record (nothing is signalled), unless a new worker has replaced it meanwhile."""
        path = self._files(slot)[0]
        current = self._read(slot)
        same = (current or {}).get("pid"), (current or {}).get("pid_start")
        if current is None or same == (record.get("pid"), record.get("pid_start")):
            path.unlink(missing_ok=True)

    def _state(self, slot: str, probe_timeout: float = 5.0) -> tuple[dict | None, str]:
        """(record, "healthy" | "busy" | "gone"). Busy: proven ours and alive, but its health probe
        failed (a loaded machine, a long job): it is reported, never stopped for that."""
        record = self._read(slot)
        if record is None:
            return None, "gone"
        if not self._ours(record):
            return record, "gone"
        if healthy(f"http://127.0.0.1:{record['port']}", timeout=probe_timeout):
            return record, "healthy"
        return record, "busy"

    def find(self, slot: str) -> WorkerHandle | None:
        """The warm worker of a slot when it answers. A record whose process is gone or is not ours
        (a reused pid) is deleted; nothing is signalled."""
        record, state = self._state(slot)
        if state == "gone" and record is not None:
            self._drop_record(slot, record)
            _kill_orphan_comfy(record)
        return self._handle(slot, record, started_here=False) if state == "healthy" and record is not None else None

    def slots(self, choice: str | None = None, cpu_workers: int = 1) -> list[str]:
        from imagegen.util import gpus

        found = [str(g.index) for g in gpus.select(gpus.list_gpus(), choice)]
        if not found:
            self.cpu_workers = cpu_workers
        return found or cpu_slots(cpu_workers)

    def ensure(self, slot: str | None = None, on_status=None, mounts: AbstractSet[str] = frozenset()) -> WorkerHandle:
        """Find or start the worker for a slot; `mounts` matter only to containers."""
        from filelock import FileLock

        slot = slot or default_slot()
        record_path, token_path, log_path, lock_path = self._files(slot)
        with FileLock(str(lock_path)):
            record, state = self._state(slot)
            if state == "healthy" and record is not None:
                return self._handle(slot, record, started_here=False)
            if state == "busy" and record is not None:
                busy = self._busy_handle(slot, record)
                if busy:
                    return busy  # its own proxy answers: a loaded or busy worker, not a dead one
                self._forget(slot)  # ours, alive, and silent for IMAGEGEN_BUSY_WAIT seconds: hung
            elif record is not None:
                self._drop_record(slot, record)  # its process is gone or is not ours: nothing is signalled
                _kill_orphan_comfy(record)
            return self._start(slot, record_path, token_path, log_path, on_status)

    def _busy_handle(self, slot: str, record: dict) -> WorkerHandle | None:
        """A worker that fails its 5 s health probe but is ours: its handle when its proxy answers an
        authenticated /imagegen/info (with a generous timeout) and its ComfyUI is still alive."""
        deadline = time.monotonic() + self.busy_wait
        while time.monotonic() < deadline:
            if not self._ours(record):
                return None
            info = _info(record, timeout=30)
            if info is None:
                cancel.check("the wait for a busy worker")
                time.sleep(1.0)
                continue
            if info.get("pid") == record.get("pid") and info.get("comfy_pid") and _comfy_ours(record):
                return self._handle(slot, record, started_here=False)
            return None
        return None

    def _start(self, slot: str, record_path: Path, token_path: Path, log_path: Path, on_status) -> WorkerHandle:
        comfyui_dir = find_comfyui_dir()
        write_private(token_path, secrets.token_urlsafe(32))
        env = procs.child_env(os.environ)  # never HF_TOKEN, remote workers' tokens or other secrets
        on_cpu = is_cpu_slot(slot)
        env["CUDA_VISIBLE_DEVICES"] = "" if on_cpu else slot
        if on_cpu and "OMP_NUM_THREADS" not in env:
            # torch takes a thread per core; CPU workers side by side would fight over the cores
            # (spinning OpenMP threads make that many times slower), so they share them out.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.cpu_workers))
        command = [self.python, "-m", "imagegen.entry", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--comfyui-dir", str(comfyui_dir), "--models-dir", str(paths.models_dir()),
                   "--token-file", str(token_path), "--keep-warm", str(worker_keep_warm(self.keep_warm)),
                   "--state-file", str(record_path), "--device", "cpu" if on_cpu else "cuda"]
        for tree in self.shared_models:
            command += ["--shared-models", str(tree)]
        if on_status:
            on_status(f"starting a local worker ({slot if on_cpu else 'GPU ' + slot}); log: {log_path}")
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=env, cwd=str(paths.SOURCE_ROOT), start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise ImagegenError("worker_start_failed",
                                        f"the local worker exited with code {process.returncode} during start-up. "
                                        f"Last lines of {log_path}:\n{log_tail(log_path)}")
                if record_path.exists():
                    record = json.loads(record_path.read_text())
                    if record.get("pid") == process.pid:
                        return self._handle(slot, record, started_here=True)
                cancel.check("the worker start")  # an MCP client gave up: stop the worker it was waiting for
                time.sleep(0.1)
            raise ImagegenError("timeout", f"the local worker was not ready within {self.start_timeout:.0f}s. "
                                f"Last lines of {log_path}:\n{log_tail(log_path)}",
                                hint="Set IMAGEGEN_START_TIMEOUT higher on a slow machine.", phase="server_start")
        except BaseException:
            _terminate(process.pid)
            record_path.unlink(missing_ok=True)
            raise

    def _forget(self, slot: str) -> bool:
        """Stop a slot's worker and its ComfyUI when they are proven ours, and delete the record.
        True when something of ours was stopped."""
        record = self._read(slot)
        if record is None:
            return False
        stopped = False
        if self._ours(record):
            _terminate(record["pid"], members=[_comfy_identity(record)])
            stopped = True
        else:
            stopped = _kill_orphan_comfy(record)
        self._drop_record(slot, record)
        return stopped

    def diagnose(self, worker: WorkerHandle) -> ImagegenError | None:
        """Why a worker failed a job: it died, or it hangs (None: it still answers)."""
        pid = worker.info.get("pid", -1)
        log = self._files(worker.slot)[2]
        if not (pid_alive(pid) and self._ours(worker.info)):
            return ImagegenError("worker_died", f"the local worker (pid {pid}) exited while running the job. "
                                                 f"Last lines of {log}:\n{log_tail(log, 10)}")
        if not healthy(worker.url):
            return ImagegenError("worker_unreachable", f"the local worker (pid {pid}) stopped answering")
        return None

    def workers(self) -> list[dict]:
        """Every worker of ours with a record. A record whose process is gone (or is not ours) is
        deleted; a worker that is ours but fails its health probe is listed unhealthy, never stopped."""
        found = []
        for record_path in sorted(self.dir.glob("local-*.json")):
            slot = record_path.stem[len("local-"):]
            record, state = self._state(slot)
            if state == "gone":
                if record is not None:
                    self._drop_record(slot, record)
                    _kill_orphan_comfy(record)
                continue
            assert record is not None  # "healthy" and "busy" always carry the record
            handle = self._handle(slot, record, started_here=False)
            info = _info(record, timeout=5) or {}
            keys = ("comfy_pid", "gpu", "it_per_s", "last_model", "idle_seconds", "jobs_done", "keep_warm",
                    "imagegen_version")
            found.append({"name": handle.name, "runtime": self.name, "slot": slot, "device": handle.device,
                          "url": handle.url, "pid": record.get("pid"), "healthy": state == "healthy",
                          "state": "ready" if state == "healthy" else "busy or not answering",
                          **{k: info.get(k) for k in keys}})
        return found

    def stop(self, slot: str | None = None) -> list[str]:
        """Stop this runtime's workers (those proven ours); stale records are deleted, nothing else is signalled."""
        stopped = []
        for record_path in sorted(self.dir.glob("local-*.json")):
            this_slot = record_path.stem[len("local-"):]
            if (slot is None or slot == this_slot) and self._forget(this_slot):
                stopped.append(f"local-{this_slot}")
        return stopped


def _info(record: dict, timeout: float) -> dict | None:
    """The worker's authenticated /imagegen/info, or None when whatever listens there does not give it."""
    try:
        url = f"http://127.0.0.1:{record['port']}"
        info = ComfyClient(url, str(record.get("token", "")), request_timeout=timeout).worker_info()
    except (ImagegenError, requests.RequestException, ValueError, KeyError):
        return None
    return info if isinstance(info, dict) and info else None


def _comfy_identity(record: dict) -> tuple:
    return record.get("comfy_pid"), record.get("comfy_start"), record.get("comfy_cmdline")


def _comfy_ours(record: dict) -> bool:
    pid, start, command = _comfy_identity(record)
    return start is None or procs.same_process(pid, start, command)  # older records: no way to tell


def _kill_orphan_comfy(record: dict) -> bool:
    """A ComfyUI whose worker is gone (one that outlived it before parent-death signals): stop it,
    only when its start time and command line prove it is the one recorded."""
    pid, start, command = _comfy_identity(record)
    if start is None or not procs.same_process(pid, start, command):
        return False
    _terminate(pid, members=[(pid, start, command)], group=False)
    return True


def _terminate(pid: int, grace: float = 10.0, members: Sequence[tuple] = (), group: bool = True) -> None:
    """Stop a worker and its ComfyUI child (they share a process group led by the worker). Call it
    only for a pid proven ours. `members` ((pid, start, cmdline) of children) are killed one by one
    when they outlive the leader, and only while they are still the processes recorded."""
    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def alive_members() -> list[int]:
        return [m[0] for m in members if m[1] is not None and procs.same_process(*m)]

    send(signal.SIGTERM)
    send(signal.SIGCONT)  # a paused (SIGSTOP) worker must run to act on SIGTERM
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid) and not alive_members():
            return
        time.sleep(0.1)
    if pid_alive(pid):
        send(signal.SIGKILL)
    for member in alive_members():
        try:
            os.kill(member, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
