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
from pathlib import Path

from imagegen.runtimes.base import (
    DEFAULT_KEEP_WARM,
    DEFAULT_START_TIMEOUT,
    WorkerHandle,
    cpu_slots,
    default_slot,
    healthy,
    is_cpu_slot,
    log_tail,
    pid_alive,
)
from imagegen.util import paths
from imagegen.util.errors import ImagegenError


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

    def __init__(self, keep_warm: float = DEFAULT_KEEP_WARM, start_timeout: float = DEFAULT_START_TIMEOUT,
                 python: str | None = None, shared_models: list[Path] | None = None):
        self.keep_warm = keep_warm
        self.start_timeout = start_timeout
        self.python = python or os.environ.get("IMAGEGEN_WORKER_PYTHON") or sys.executable
        self.shared_models = shared_models or []
        self.cpu_workers = 1
        self.dir = paths.ensure_private_dir(paths.workers_dir())

    def _files(self, slot: str) -> tuple[Path, Path, Path, Path]:
        base = self.dir / f"local-{slot}"
        return base.with_suffix(".json"), base.with_suffix(".token"), base.with_suffix(".log"), base.with_suffix(".lock")

    def _handle(self, slot: str, record: dict, started_here: bool) -> WorkerHandle:
        return WorkerHandle(name=f"local-{slot}", url=f"http://127.0.0.1:{record['port']}", token=record["token"],
                            device=record.get("device", "cpu"), runtime=self.name, slot=slot,
                            started_here=started_here, info=record)

    def find(self, slot: str) -> WorkerHandle | None:
        record_path = self._files(slot)[0]
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            return None
        if pid_alive(record.get("pid", -1)) and healthy(f"http://127.0.0.1:{record['port']}"):
            return self._handle(slot, record, started_here=False)
        return None

    def slots(self, choice: str | None = None, cpu_workers: int = 1) -> list[str]:
        from imagegen.util import gpus

        found = [str(g.index) for g in gpus.select(gpus.list_gpus(), choice)]
        if not found:
            self.cpu_workers = cpu_workers
        return found or cpu_slots(cpu_workers)

    def ensure(self, slot: str | None = None, on_status=None, mounts: set[str] = frozenset()) -> WorkerHandle:
        """Find or start the worker for a slot; `mounts` matter only to containers."""
        from filelock import FileLock

        slot = slot or default_slot()
        record_path, token_path, log_path, lock_path = self._files(slot)
        with FileLock(str(lock_path)):
            found = self.find(slot)
            if found:
                return found
            self._forget(slot)
            return self._start(slot, record_path, token_path, log_path, on_status)

    def _start(self, slot: str, record_path: Path, token_path: Path, log_path: Path, on_status) -> WorkerHandle:
        comfyui_dir = find_comfyui_dir()
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
        env = dict(os.environ)
        on_cpu = is_cpu_slot(slot)
        env["CUDA_VISIBLE_DEVICES"] = "" if on_cpu else slot
        if on_cpu and "OMP_NUM_THREADS" not in env:
            # torch takes a thread per core; CPU workers side by side would fight over the cores
            # (spinning OpenMP threads make that many times slower), so they share them out.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.cpu_workers))
        command = [self.python, "-m", "imagegen.entry", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--comfyui-dir", str(comfyui_dir), "--models-dir", str(paths.models_dir()),
                   "--token-file", str(token_path), "--keep-warm", str(self.keep_warm),
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
                                        f"the local worker exited with code {process.returncode} during start-up. Last lines of {log_path}:\n{log_tail(log_path)}")
                if record_path.exists():
                    record = json.loads(record_path.read_text())
                    if record.get("pid") == process.pid:
                        return self._handle(slot, record, started_here=True)
                time.sleep(0.1)
            raise ImagegenError("timeout", f"the local worker was not ready within {self.start_timeout:.0f}s. Last lines of {log_path}:\n{log_tail(log_path)}",
                                hint="Set IMAGEGEN_START_TIMEOUT higher on a slow machine.", phase="server_start")
        except BaseException:
            _terminate(process.pid)
            record_path.unlink(missing_ok=True)
            raise

    def _forget(self, slot: str) -> None:
        record_path = self._files(slot)[0]
        try:
            record = json.loads(record_path.read_text())
            if pid_alive(record.get("pid", -1)):
                _terminate(record["pid"])
        except (OSError, ValueError, KeyError):
            pass
        record_path.unlink(missing_ok=True)

    def diagnose(self, worker: WorkerHandle) -> ImagegenError | None:
        """Why a worker failed a job: it died, or it hangs (None: it still answers)."""
        pid = worker.info.get("pid", -1)
        log = self._files(worker.slot)[2]
        if not pid_alive(pid):
            return ImagegenError("worker_died", f"the local worker (pid {pid}) exited while running the job. Last lines of {log}:\n{log_tail(log, 10)}")
        if not healthy(worker.url):
            return ImagegenError("worker_unreachable", f"the local worker (pid {pid}) stopped answering")
        return None

    def workers(self) -> list[dict]:
        found = []
        for record_path in sorted(self.dir.glob("local-*.json")):
            slot = record_path.stem[len("local-"):]
            handle = self.find(slot)
            if handle is None:
                self._forget(slot)  # reap: its process is gone or not answering
                continue
            try:
                info = handle.client(request_timeout=5).worker_info()
            except ImagegenError:
                info = {}
            found.append({"name": handle.name, "runtime": self.name, "slot": slot, "device": handle.device,
                          "url": handle.url, "pid": handle.info.get("pid"), "healthy": True, **{k: info.get(k) for k in
                          ("comfy_pid", "gpu", "it_per_s", "last_model", "idle_seconds", "jobs_done", "keep_warm", "imagegen_version")}})
        return found

    def stop(self, slot: str | None = None) -> list[str]:
        stopped = []
        for record_path in sorted(self.dir.glob("local-*.json")):
            this_slot = record_path.stem[len("local-"):]
            if slot is None or slot == this_slot:
                self._forget(this_slot)
                stopped.append(f"local-{this_slot}")
        return stopped


def _terminate(pid: int, grace: float = 10.0) -> None:
    """Stop a worker and its ComfyUI child (they share a process group)."""
    try:
        os.killpg(pid, signal.SIGTERM)
        os.killpg(pid, signal.SIGCONT)  # a paused (SIGSTOP) worker must run to act on SIGTERM
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        _reap(pid)
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
