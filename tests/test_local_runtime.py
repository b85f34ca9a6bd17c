"""The local runtime touches only what is provably its own: a stale record naming a reused pid
signals nothing, ComfyUI dies with its worker (even SIGKILLed), a worker that is ours but slow to
answer is reported and never reaped, and ComfyUI never receives the caller's secrets."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import run_cli

from imagegen.runtimes.base import pid_alive
from imagegen.runtimes.local import LocalRuntime
from imagegen.util import procs


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"not within {timeout:.0f}s: {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def bystander():
    """An unrelated process that leads its own process group, as a user's shell or browser does."""
    process = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def write_record(home: Path, pid: int, **fields) -> Path:
    workers = home / "state" / "workers"
    workers.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = workers / "local-cpu.json"
    record.write_text(json.dumps({"event": "ready", "port": free_port(), "pid": pid, "device": "cpu",
                                  "token": "old-token", **fields}))
    return record


@pytest.fixture
def other_server():
    """Someone else's HTTP server on the port a stale record names: it answers 400 to everything."""
    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(400)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.parametrize("runtime", ["local", "auto"])
@pytest.mark.parametrize("kind", ["reused pid", "older record without a start time", "older record, another server"])
def test_a_stale_record_naming_a_reused_pid_signals_nothing(isolated_home, bystander, other_server, runtime, kind):
    # after a reboot the recorded pid belongs to someone else: a different start time, or (an older
    # record) no proof at all, since no imagegen worker answers /imagegen/info on the recorded port
    fields = {"pid_start": procs.start_time(bystander.pid) - 1, "cmdline": ["python", "-m", "imagegen.entry", "serve"]}
    if kind != "reused pid":
        fields = {"port": other_server} if "another server" in kind else {}
    record = write_record(isolated_home, bystander.pid, **fields)
    env = {"IMAGEGEN_RUNTIME": runtime}

    listed = run_cli("workers", "--json", env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr.decode()
    assert listed.stdout.decode().strip() == "", "a stale record is not a worker"
    assert bystander.poll() is None and pid_alive(bystander.pid), "`imagegen workers` signalled an unrelated process"
    assert not record.exists(), "the stale record is deleted"

    write_record(isolated_home, bystander.pid, **fields)
    stopped = run_cli("stop", "--all", "--json", env=env, timeout=120)
    assert stopped.returncode == 0, stopped.stderr.decode()
    assert json.loads(stopped.stdout)["stopped"] == []
    time.sleep(0.5)  # a SIGTERM would have landed by now; the check below is what matters
    assert bystander.poll() is None, "`imagegen stop --all` signalled an unrelated process"
    assert not record.exists()


def test_same_process_needs_the_same_start_time_and_command_line(bystander):
    me = procs.identity(bystander.pid)
    assert procs.same_process(bystander.pid, me["pid_start"], me["cmdline"])
    assert not procs.same_process(bystander.pid, me["pid_start"] + 1, me["cmdline"])
    assert not procs.same_process(bystander.pid, me["pid_start"], ["something", "else"])
    assert not procs.same_process(bystander.pid, None, None), "no start time recorded: no proof"
    bystander.kill()
    wait_until(lambda: bystander.poll() is not None, 30, "the bystander exits")
    assert not procs.same_process(bystander.pid, me["pid_start"], me["cmdline"])


def start_worker(monkeypatch, **env) -> tuple[LocalRuntime, dict]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runtime = LocalRuntime(keep_warm=600)
    handle = runtime.ensure("cpu")
    return runtime, handle.info


@pytest.mark.comfyui
def test_comfyui_dies_with_its_worker_even_when_the_worker_is_sigkilled(comfyui_dir, monkeypatch):
    runtime, record = start_worker(monkeypatch)
    comfy = record["comfy_pid"]
    assert procs.same_process(comfy, record["comfy_start"], record["comfy_cmdline"])
    os.kill(record["pid"], signal.SIGKILL)  # no finally, no signal handler: only the parent-death signal helps
    wait_until(lambda: procs.start_time(comfy) != record["comfy_start"], 60, "ComfyUI exits after its worker's SIGKILL")
    assert runtime.workers() == [], "the dead worker's record is dropped"
    assert not runtime._files("cpu")[0].exists()


@pytest.mark.comfyui
def test_comfyui_gets_no_tokens_and_the_worker_deletes_its_record_on_sigterm(comfyui_dir, monkeypatch, tmp_path):
    secrets_env = {"HF_TOKEN": "hf_secret_value", "HUGGING_FACE_HUB_TOKEN": "hf_other_secret",
                   "IMAGEGEN_REMOTE_WORKERS": "http://127.0.0.1:9#remote-secret", "MY_SERVICE_API_KEY": "key-secret",
                   "SOME_CLIENT_SECRET": "client-secret", "UNRELATED_SETTING": "not-needed"}
    runtime, record = start_worker(monkeypatch, **secrets_env)
    for pid in (record["pid"], record["comfy_pid"]):
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        names = {item.split(b"=", 1)[0].decode() for item in raw.split(b"\0") if item}
        for name, value in secrets_env.items():
            assert name not in names and value.encode() not in raw, f"{name} reached pid {pid}"
        assert {"PATH", "IMAGEGEN_HOME"} <= names, names

    record_path = runtime._files("cpu")[0]
    assert record_path.stat().st_mode & 0o777 == 0o600
    os.kill(record["pid"], signal.SIGTERM)
    wait_until(lambda: not record_path.exists(), 60, "the worker deletes its own record when it exits")
    wait_until(lambda: procs.start_time(record["comfy_pid"]) != record["comfy_start"], 60, "ComfyUI stops with it")


@pytest.mark.comfyui
def test_a_worker_that_is_ours_but_slow_to_answer_is_reported_not_reaped(comfyui_dir, monkeypatch):
    runtime, record = start_worker(monkeypatch)
    try:
        os.kill(record["pid"], signal.SIGSTOP)  # its proxy accepts but does not answer: a probe times out
        listed = LocalRuntime(keep_warm=600).workers()  # another command's view
        assert [(w["name"], w["healthy"]) for w in listed] == [("local-cpu", False)], listed
        assert procs.same_process(record["pid"], record["pid_start"], record["cmdline"]), "the busy worker was stopped"
        assert runtime._files("cpu")[0].exists(), "the busy worker's record was deleted"
    finally:
        os.kill(record["pid"], signal.SIGCONT)
    listed = wait_until(lambda: [w for w in LocalRuntime(keep_warm=600).workers() if w["healthy"]], 60,
                        "the worker answers again once it runs")
    assert listed[0]["pid"] == record["pid"]
    again = LocalRuntime(keep_warm=600).ensure("cpu")
    assert again.info["pid"] == record["pid"], "the warm worker is reused"
    runtime.stop()
    wait_until(lambda: procs.start_time(record["pid"]) is None, 30, "stop ends the worker")


@pytest.mark.comfyui
def test_workers_and_stop_under_auto_cover_local_workers(comfyui_dir, monkeypatch):
    _runtime, record = start_worker(monkeypatch)
    env = {"IMAGEGEN_RUNTIME": "auto"}  # with the Docker image built, auto alone would mean Docker
    listed = run_cli("workers", "--json", env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr.decode()
    names = [json.loads(line)["name"] for line in listed.stdout.decode().splitlines()]
    assert "local-cpu" in names, listed.stdout.decode()
    stopped = run_cli("stop", "--all", "--json", env=env, timeout=120)
    assert stopped.returncode == 0, stopped.stderr.decode()
    assert "local-cpu" in json.loads(stopped.stdout)["stopped"]
    wait_until(lambda: procs.start_time(record["pid"]) is None, 30, "the local worker is stopped")


def _ready_record(log: Path) -> dict:
    """The worker's last ready line in its log: its pid and port outlive its deleted record."""
    lines = [json.loads(line) for line in log.read_text(errors="replace").splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "ready"][-1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.comfyui
def test_keep_warm_0_stops_the_worker_it_started_and_leaves_a_reused_one(comfyui_dir, tiny_sd15, tmp_path,
                                                                         monkeypatch):
    record_path, _token, log, _lock = LocalRuntime()._files("cpu")
    draw = ("--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "1", "--runtime", "local", "--json", "-q")
    started = run_cli("generate", "a lighthouse", *draw, "--keep-warm", "0", "-o", str(tmp_path / "a.png"))
    assert started.returncode == 0, started.stderr.decode()
    assert (tmp_path / "a.png").is_file()
    ready = _ready_record(log)
    assert not record_path.exists(), "the worker it started left its state entry"
    assert procs.start_time(ready["pid"]) is None, "the worker it started is still running"
    assert not _listening(ready["port"]), "the port of the worker it started is still open"

    runtime, record = start_worker(monkeypatch)  # another command's worker, warm
    try:
        reused = run_cli("generate", "a lighthouse", *draw, "--keep-warm", "0", "-o", str(tmp_path / "b.png"))
        assert reused.returncode == 0, reused.stderr.decode()
        assert procs.same_process(record["pid"], record["pid_start"], record["cmdline"]), "a reused worker was stopped"
        assert record_path.exists() and _listening(record["port"])
        assert (tmp_path / "b.png").is_file()
    finally:
        runtime.stop()


@pytest.mark.comfyui
def test_an_mcp_server_with_keep_warm_0_stops_the_workers_it_started_when_it_ends(comfyui_dir):
    from imagegen.mcp.server import ImagegenTools

    tools = ImagegenTools("local", keep_warm=0)
    handle = tools.runtime().ensure("cpu")
    assert handle.started_here and tools.runtime().ensure("cpu").info["pid"] == handle.info["pid"], "kept between calls"
    tools.close()
    assert procs.start_time(handle.info["pid"]) is None and not LocalRuntime()._files("cpu")[0].exists()
