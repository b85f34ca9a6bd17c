"""Faults injected into a real ComfyUI worker mid-job: each is detected and reported with its phase,
nothing partial is left behind, no process lingers, and the next call works without cleanup."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, communicate, run_cli
from sim_comfy import run_graph

from imagegen.comfy import png
from imagegen.comfy.client import ComfyClient, Timeouts, output_images
from imagegen.comfy.workflows import Params, build
from imagegen.models.registry import local_bundle
from imagegen.runtimes.base import pid_alive

pytestmark = pytest.mark.comfyui

LONG_JOB = ["--size", "64x64", "--steps", "1500"]


@pytest.fixture
def env(comfyui_dir, tmp_path):
    values = {"IMAGEGEN_HOME": str(tmp_path / "home"), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir),
              "IMAGEGEN_RUNTIME": "local", "IMAGEGEN_TIMEOUT_REQUEST": "4", "IMAGEGEN_TIMEOUT_STALL": "8"}
    yield values
    run_cli("stop", "--all", env=values)


def worker_record(env) -> dict:
    return json.loads((Path(env["IMAGEGEN_HOME"]) / "state" / "workers" / "local-cpu.json").read_text())


def start_long_generate(env, tiny_sd15, out_dir):
    process = subprocess.Popen([sys.executable, str(REPO / "generate_image.py"), "generate", "a long job",
                                "--checkpoint", str(tiny_sd15), *LONG_JOB, "--json", "-o", str(out_dir) + "/"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})
    deadline = time.monotonic() + 300  # a cold worker start on a loaded machine
    while time.monotonic() < deadline:
        try:
            record = worker_record(env)
            client = ComfyClient(f"http://127.0.0.1:{record['port']}", record["token"], request_timeout=3)
            if client.queue()["queue_running"] and client.worker_info().get("it_per_s"):
                # the worker's proxy has relayed sampling progress to the CLI (it learns it/s from the
                # progress events it forwards): the CLI is in phase 'sampling', however loaded the machine
                return process, record, client
        except (OSError, ValueError, KeyError, Exception):  # noqa: BLE001 - not up yet
            pass
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.kill()
    pytest.fail("the long job never started running")


def finish(process, timeout=90):
    stdout, stderr = communicate(process, timeout)
    error = json.loads(stderr.decode().strip().splitlines()[-1]) if process.returncode else None
    return process.returncode, stdout.decode(), error, stderr.decode()


def assert_nothing_left(out_dir, record):
    assert not out_dir.exists() or list(out_dir.iterdir()) == [], "no partial or unfinished file may remain"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (pid_alive(record["pid"]) or pid_alive(record.get("comfy_pid") or -1)):
        time.sleep(0.2)
    assert not pid_alive(record["pid"]), "the failed worker must be stopped"


def assert_next_call_works(env, tiny_sd15, tmp_path):
    result = run_cli("generate", "after the fault", "--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "1",
                     "-o", str(tmp_path / "after.png"), env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert png.png_size((tmp_path / "after.png").read_bytes()) == (64, 64)


def comfy_pid(record) -> int:
    client = ComfyClient(f"http://127.0.0.1:{record['port']}", record["token"], request_timeout=3)
    return client._json("GET", "/imagegen/info")["comfy_pid"]


def test_worker_killed_mid_job(env, tiny_sd15, tmp_path):
    process, record, _client = start_long_generate(env, tiny_sd15, tmp_path / "out")
    record["comfy_pid"] = comfy_pid(record)
    os.killpg(record["pid"], signal.SIGKILL)
    code, stdout, error, stderr = finish(process)
    assert code == 1 and stdout == ""
    assert error["code"] in ("worker_died", "worker_unreachable"), stderr
    assert re.search(r"phase '(loading|sampling)'", error["message"]), error
    assert_nothing_left(tmp_path / "out", record)
    assert_next_call_works(env, tiny_sd15, tmp_path)


def test_comfyui_paused_with_sigstop_is_a_reported_stall(env, tiny_sd15, tmp_path):
    process, record, client = start_long_generate(env, tiny_sd15, tmp_path / "out")
    record["comfy_pid"] = comfy_pid(record)
    os.kill(record["comfy_pid"], signal.SIGSTOP)
    try:
        code, stdout, error, stderr = finish(process)
    finally:
        if pid_alive(record["comfy_pid"]):
            os.kill(record["comfy_pid"], signal.SIGCONT)
    assert code == 1 and stdout == ""
    assert error["code"] in ("timeout", "worker_unreachable"), stderr
    assert re.search(r"phase '(loading|sampling)'", error["message"]) and "fresh one" in error["message"], error
    assert_nothing_left(tmp_path / "out", record)
    assert not pid_alive(record["comfy_pid"])
    assert_next_call_works(env, tiny_sd15, tmp_path)


def test_port_that_stops_answering(env, tiny_sd15, tmp_path):
    process, record, _client = start_long_generate(env, tiny_sd15, tmp_path / "out")
    record["comfy_pid"] = comfy_pid(record)
    os.kill(record["pid"], signal.SIGSTOP)  # the proxy: the published port accepts but never answers
    try:
        code, stdout, error, stderr = finish(process)
    finally:
        if pid_alive(record["pid"]):
            os.kill(record["pid"], signal.SIGCONT)
    assert code == 1 and stdout == ""
    assert error["code"] in ("worker_unreachable", "timeout"), stderr
    assert "phase" in error["message"], error
    assert_nothing_left(tmp_path / "out", record)
    assert_next_call_works(env, tiny_sd15, tmp_path)


def test_dropped_websocket_loses_nothing(comfy_worker, session_home, tiny_sd15, monkeypatch):
    """The websocket dies mid-job: progress stops, but completion comes from /history."""
    from imagegen.models import cache

    bundle = local_bundle(tiny_sd15, "sd15")
    cache.link_local(bundle.files["checkpoint"], session_home / "models")
    client = comfy_worker.client()
    opened = []
    real_open = client.open_events

    def open_then_drop(client_id):
        ws = real_open(client_id)
        opened.append(ws)
        return ws

    monkeypatch.setattr(client, "open_events", open_then_drop)
    dropped = []

    def on_progress(state):
        if state.phase == "sampling" and not dropped:
            opened[0].sock.shutdown(2)  # a real socket torn down under the client
            dropped.append(state.step)

    graph = build(bundle, Params("a dropped socket", 64, 64, 30, 7.0, "euler", "normal", 3))
    entry = run_graph(client, graph, Timeouts(stall=30), on_progress)
    assert dropped, "the socket was never dropped: the test proved nothing"
    data = client.fetch_file(output_images(entry)[0])
    assert png.png_size(data) == (64, 64)

