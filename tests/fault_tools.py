"""Helpers for tests/test_fault_suite.py: the real CLI as a killable process group, manifest and PNG
checks, worker records, CPU hogs and a /proc scan for processes that belong to a test's IMAGEGEN_HOME."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll until predicate() is truthy; fail the test (not hang) after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Cli:
    """The real CLI (`python generate_image.py`) in its own session, so a test can signal its whole
    process group the way a terminal does (Ctrl-C) or the way the OOM killer or a crash does."""

    def __init__(self, env: dict, prefix: list[str] | None = None, python: str | None = None,
                 cwd: Path | None = None):
        self.env = env
        self.prefix = prefix or []
        self.python = python or sys.executable
        self.cwd = cwd

    def command(self, args) -> list[str]:
        return [*self.prefix, self.python, str(REPO / "generate_image.py"), *args]

    def start(self, *args: str, input: bytes | None = None) -> subprocess.Popen:
        env = self.env if self.prefix else {**os.environ, **self.env}
        process = subprocess.Popen(self.command(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env, start_new_session=True, cwd=self.cwd)
        if input is not None:
            process.stdin.write(input)
        process.stdin.close()
        process.stdin = None  # communicate() must not flush it again
        return process

    def run(self, *args: str, input: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return finish(self.start(*args, input=input), timeout, " ".join(args[:1]))


def finish(process: subprocess.Popen, timeout: float, what: str = "the CLI") -> subprocess.CompletedProcess:
    """Wait for a CLI process; past the deadline kill its process group and fail: that is a hang."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"HANG: `{what}` did not end within {timeout:.0f}s; stderr tail:\n{stderr.decode()[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def last_error(result: subprocess.CompletedProcess) -> dict:
    """The JSON error object (--json) on the last stderr line."""
    lines = result.stderr.decode().strip().splitlines()
    assert lines, "no error on stderr"
    try:
        return json.loads(lines[-1])
    except ValueError:
        pytest.fail(f"the last stderr line is not a JSON error object: {lines[-1]!r}")


# --- manifests and images -----------------------------------------------------------------
def manifest(out: Path) -> list[dict]:
    """Every line of manifest.jsonl; each one must be a valid JSON object with a key and a status."""
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"{path} line {number} is not valid JSON: {line[:200]!r}")
        assert isinstance(record, dict) and "key" in record and "status" in record and "path" in record, record
        records.append(record)
    return records


def manifest_count(out: Path) -> int:
    try:
        return len((out / "manifest.jsonl").read_text().splitlines())
    except OSError:
        return 0


def complete_png(path: Path) -> bool:
    """A whole PNG: the signature, every chunk's CRC right, ending in IEND."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not data.startswith(PNG_SIGNATURE):
        return False
    offset, kinds = len(PNG_SIGNATURE), []
    while offset + 12 <= len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        if len(body) != length or offset + 12 + length > len(data):
            return False
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        if crc != zlib.crc32(kind + body) & 0xFFFFFFFF:
            return False
        kinds.append(kind)
        offset += 12 + length
    return bool(kinds) and kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and offset == len(data)


def leftovers(out: Path) -> list[str]:
    """Files a batch must not leave behind: partial or temporary files (anything not an image,
    the manifest or a lock file)."""
    if not out.exists():
        return []
    found = []
    for path in out.rglob("*"):
        name = path.name
        if path.is_dir() or name == "manifest.jsonl" or "lock" in name.lower():
            continue
        if not name.endswith(".png") or ".partial" in name or name.startswith((".", "tmp")):
            found.append(name)
    return sorted(found)


def assert_manifest_sound(out: Path) -> list[dict]:
    """Every line valid; every `done` image exists and is a complete PNG; no image done twice."""
    records = manifest(out)
    done = [r for r in records if r["status"] == "done"]
    paths = [r["path"] for r in done]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    assert not twice, f"images recorded as done more than once: {twice}"
    broken = [p for p in paths if not complete_png(Path(p))]
    assert not broken, f"manifest entries whose file is missing or not a complete PNG: {broken}"
    assert not leftovers(out), f"partial or temporary files left in {out}: {leftovers(out)}"
    return records


def assert_nothing_lost(out: Path, expected: int) -> None:
    """The batch is complete: `expected` images, each done exactly once in the manifest, and every
    PNG in the folder is one of them (a finished image the manifest does not know is lost too)."""
    records = assert_manifest_sound(out)
    done = {(r["key"], r.get("index", 0)): r["path"] for r in records if r["status"] == "done"}
    assert len(done) == expected, f"{len(done)} of {expected} images done; manifest: {records}"
    on_disk = {str(p) for p in out.glob("*.png")}
    assert on_disk == set(done.values()), f"PNGs not in the manifest: {sorted(on_disk - set(done.values()))}"


# --- workers and processes --------------------------------------------------------------
def records(home: Path) -> dict[str, dict]:
    found = {}
    for path in sorted((home / "state" / "workers").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            found[path.stem] = json.loads(path.read_text())
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def comfy_queue(record: dict) -> dict:
    """The worker's ComfyUI queue ({} while it does not answer)."""
    from imagegen.comfy.client import ComfyClient

    try:
        return ComfyClient(f"http://127.0.0.1:{record['port']}", record["token"], request_timeout=5).queue()
    except Exception:  # noqa: BLE001 - not up, or busy
        return {}


def _proc_text(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    stat = _proc_text(pid, "stat")
    try:
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (ValueError, IndexError):
        return -1


def our_processes(home: Path) -> dict[int, str]:
    """Live processes that belong to this IMAGEGEN_HOME: its workers (the home is on their command
    line or in their environment) and their ComfyUI children (whose model-paths config points into
    the home's model cache, even when the worker hands them a trimmed environment)."""
    marker, found = str(home), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (os.getpid(), os.getppid()):
            continue
        pid = int(entry.name)
        cmdline = _proc_text(pid, "cmdline")
        if not cmdline or _zombie(pid):
            continue
        mine = marker in cmdline or f"IMAGEGEN_HOME={marker} " in _proc_text(pid, "environ") + " "
        if not mine and "--extra-model-paths-config" in cmdline:
            args = cmdline.split()
            with contextlib.suppress(ValueError, IndexError, OSError):
                config = Path(args[args.index("--extra-model-paths-config") + 1])
                mine = marker in config.read_text()
        if mine:
            found[pid] = cmdline[:300]
    return found


def orphans(home: Path) -> dict[int, str]:
    """Our processes that no worker record accounts for (a recorded worker and its children are fine)."""
    live = our_processes(home)
    recorded = {r.get("pid") for r in records(home).values()}
    return {pid: cmd for pid, cmd in live.items() if pid not in recorded and _ppid(pid) not in recorded}


def assert_no_orphans(home: Path, timeout: float = 40) -> None:
    """Wait (a worker may be exiting) until no process of this home lacks a record."""
    deadline = time.monotonic() + timeout
    while orphans(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = orphans(home)
    assert not left, f"orphaned processes (no worker record points to them): {left}"


def assert_no_processes(home: Path, timeout: float = 40) -> None:
    """After `stop --all`: nothing of this home runs any more."""
    deadline = time.monotonic() + timeout
    while our_processes(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = our_processes(home)
    assert not left, f"processes still running after `stop --all`: {left}"


def kill_our_processes(home: Path) -> None:
    """Last-resort cleanup in a finally: only processes proven to be this test home's."""
    for pid in our_processes(home):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def cpu_hogs(count: int):
    """`count` busy-loop processes beside the test, killed (and reaped) however the test ends."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(count)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait(30)


def alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Dead but not yet reaped by its parent (a killed child of this test shows up so)."""
    states = [line.split()[1:2] for line in _proc_text(pid, "status").splitlines() if line.startswith("State:")]
    return ["Z"] in states
