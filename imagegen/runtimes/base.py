"""What every runtime shares: the Runtime protocol, the worker handle, and small process/health helpers.

A runtime places workers and hands the engine WorkerHandles. The engine never asks which runtime
it has: what differs between them is said by the capability flags of `Runtime`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import requests

from imagegen.comfy.client import ComfyClient
from imagegen.util.env import env_float
from imagegen.util.errors import ImagegenError


def default_keep_warm() -> float:
    """IMAGEGEN_KEEP_WARM, checked when a runtime is made (a bad value is invalid_argument, not a crash on import)."""
    return env_float("IMAGEGEN_KEEP_WARM", 300.0, minimum=0.0)


STOPPED_BY_COMMAND = 0.0     # --keep-warm 0: the command that starts a worker stops it when it ends
UNATTENDED_KEEP_WARM = 300.0  # ...and the worker's own idle limit, should that command be killed before it can


def worker_keep_warm(keep_warm: float) -> float:
    """The idle seconds a worker is started with: keep_warm, or for --keep-warm 0 a safety net (never a
    0-second watchdog, which could end a worker before its first job arrives)."""
    return UNATTENDED_KEEP_WARM if keep_warm <= STOPPED_BY_COMMAND else keep_warm


def default_start_timeout() -> float:
    return env_float("IMAGEGEN_START_TIMEOUT", 300.0, minimum=1.0)


@dataclass
class WorkerHandle:
    name: str
    url: str
    token: str
    device: str
    runtime: str
    slot: str                      # "cpu" or a GPU index / UUID
    started_here: bool = False
    info: dict = field(default_factory=dict)

    def client(self, request_timeout: float = 30.0) -> ComfyClient:
        return ComfyClient(self.url, self.token, request_timeout=request_timeout)


StatusCallback = Callable[[str], None]


@runtime_checkable
class Runtime(Protocol):
    """Places workers (one per slot: a GPU, or a CPU share) and finds them again.

    Capability flags say what the engine may rely on; it never branches on a runtime's name.
    """

    name: ClassVar[str]
    uses_host_cache: ClassVar[bool]      # workers read this machine's model cache: fetch and link files here first
    can_restart: ClassVar[bool]          # a failed worker can be stopped and started again by us
    compiles_on_host: ClassVar[bool]     # fast mode compiles with this machine's toolchain (check it up front)
    reads_local_files: ClassVar[bool]    # a bundle may name a file on this machine (--checkpoint FILE)

    def slots(self, choice: str | None = None, cpu_workers: int = 1) -> list[str]: ...
    def ensure(self, slot: str | None = None, on_status: StatusCallback | None = None,
               mounts: AbstractSet[str] = frozenset()) -> WorkerHandle: ...
    def diagnose(self, worker: WorkerHandle) -> ImagegenError | None: ...
    def workers(self) -> list[dict]: ...
    def stop(self, slot: str | None = None) -> list[str]: ...


def healthy(url: str, timeout: float = 5.0) -> bool:
    try:
        return requests.get(f"{url}/imagegen/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_slots(count: int) -> list[str]:
    """Names of CPU worker slots: cpu, cpu-2, cpu-3, ..."""
    return ["cpu"] + [f"cpu-{n}" for n in range(2, count + 1)]


def is_cpu_slot(slot: str) -> bool:
    slot = slot.rpartition("/")[2]  # "HOST/cpu" with --hosts
    return slot == "cpu" or slot.startswith("cpu-")


def default_slot() -> str:
    """The first GPU when this machine has one, else the CPU."""
    from imagegen.util.gpus import (
        detect_device,  # not .worker: that imports asyncio, which the CLI never needs
    )

    return "0" if detect_device() == "cuda" else "cpu"
