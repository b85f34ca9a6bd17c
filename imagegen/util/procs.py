"""Proving a process is ours before signalling it, parent-death signals, and the environment a worker passes on.

PIDs are reused (after a reboot, or after enough processes): a worker record names a pid, its
start time (/proc/PID/stat field 22, in clock ticks since boot) and its command line, and a
process is ours only when all three still match.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
from collections.abc import Mapping
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3 onwards of /proc/PID/stat (None: no such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')': split after the last ')'
    return stat[stat.rfind(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None when there is no such live process
    (a zombie has exited: it counts as gone)."""
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def identity(pid: int) -> dict:
    """What a record keeps to recognise a process later: its start time and command line."""
    return {"pid": pid, "pid_start": start_time(pid), "cmdline": cmdline(pid)}


def same_process(pid: int | None, start: int | None, command: list[str] | None) -> bool:
    """True only when `pid` is alive and is the process recorded (same start time and command line)."""
    if not isinstance(pid, int) or pid <= 0 or start is None:
        return False
    now = start_time(pid)
    if now is None or now != start:
        return False
    return command is None or cmdline(pid) == list(command)


def die_with_parent(parent: int, sig: int = signal.SIGKILL):
    """A Popen preexec_fn: the child gets `sig` when `parent` (the pid that forks it) dies, even by
    SIGKILL (Linux; elsewhere None: nothing to set). If the parent died before it ran (the child was
    re-parented already), the child exits at once. libc is loaded here, in the parent: the child,
    forked from a process with threads, only makes the one system call."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return set_signal


# What a worker and its ComfyUI need from the caller's environment; nothing else is passed on.
_ALLOWED_NAMES = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "LANG", "LANGUAGE", "TMPDIR", "TEMP", "TMP",
                  "LD_LIBRARY_PATH", "VIRTUAL_ENV", "HF_HUB_OFFLINE", "CC", "CXX", "CPATH", "C_INCLUDE_PATH",
                  "CPLUS_INCLUDE_PATH", "LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR", "MPLCONFIGDIR"}
_ALLOWED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "PYTHON", "IMAGEGEN_", "TORCH",
                     "PYTORCH_", "TRITON_", "XDG_", "CONDA_", "COVERAGE_")
_SECRET = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
_DENIED = {"IMAGEGEN_REMOTE_WORKERS", "IMAGEGEN_REMOTE_TOKEN_FILE", "IMAGEGEN_WORKER_TOKEN", "IMAGEGEN_UPSTREAM_SECRET"}


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment less everything a worker does not need: tokens, keys and secrets
    (HF_TOKEN, remote worker tokens, *_TOKEN/*_KEY/*_SECRET) never reach ComfyUI."""
    environ = dict(os.environ if environ is None else environ)
    return {name: value for name, value in environ.items()
            if (name in _ALLOWED_NAMES or name.startswith(_ALLOWED_PREFIXES))
            and name not in _DENIED and not _SECRET.search(name)}
