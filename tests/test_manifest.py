"""The batch manifest and the output-folder lock through the real CLI, over a simulated remote worker
(tests/sim_comfy.py): two batches on one folder, SIGKILL mid-batch, and a damaged manifest on rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, communicate, run_cli
from sim_comfy import SimWorker


@pytest.fixture
def sim():
    with SimWorker(gpu_name="NVIDIA L40S", memory_total_mib=46068, step_seconds=0.02) as worker:
        yield worker


def cli_env(sim, tmp_path) -> dict:
    return {"IMAGEGEN_HOME": str(tmp_path / "home"), "IMAGEGEN_RUNTIME": "remote", "IMAGEGEN_REMOTE_WORKERS": sim.entry}


def batch_args(out: Path, *extra: str) -> list[str]:
    return ["batch", "-o", str(out), "-m", "sd15", "--size", "64x64", "--pack", "1", *extra]


def prompts(count: int) -> bytes:
    return "\n".join(f"prompt number {i}" for i in range(count)).encode() + b"\n"


def start_batch(out: Path, env: dict, count: int, *extra: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(REPO / "generate_image.py"), *batch_args(out, *extra)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, **env})
    process.stdin.write(prompts(count))
    process.stdin.close()
    process.stdin = None  # communicate() must not flush it again
    return process


def wait_for(condition, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            _stdout, stderr = process.communicate()
            pytest.fail(f"the batch ended early ({process.returncode}): {stderr.decode()[-2000:]}")
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def done_lines(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(line["status"] == "done" for line in lines)
    return lines


def assert_each_image_once(out: Path, count: int) -> None:
    lines = done_lines(out)
    assert len(lines) == count and len({line["key"] for line in lines}) == count, lines
    assert all(Path(line["path"]).is_file() for line in lines)
    assert sorted(Path(line["path"]).name for line in lines) == sorted(p.name for p in out.glob("*.png"))


def test_a_second_batch_on_the_same_folder_stops_at_once_with_output_busy(sim, tmp_path):
    env, out = cli_env(sim, tmp_path), tmp_path / "out"
    first = start_batch(out, env, 6, "--steps", "30")
    try:
        wait_for(lambda: len(sim.records()) >= 1, first)  # the first batch is rendering: it holds the folder
        second = run_cli(*batch_args(out, "--steps", "30", "--json"), input=prompts(6), env=env, timeout=120)
        still_running = first.poll() is None
    finally:
        _stdout, stderr = communicate(first, 300)
    assert still_running, "the second batch must be refused while the first runs"
    assert second.returncode == 1 and second.stdout == b""
    error = json.loads(second.stderr.decode().strip().splitlines()[-1])
    assert error["code"] == "output_busy" and str(out) in error["message"] and "another -o" in error["hint"]
    assert first.returncode == 0, stderr.decode()
    assert_each_image_once(out, 6)
    assert len(sim.records()) == 6, "the refused batch rendered nothing"
    again = run_cli(*batch_args(out, "--steps", "30"), input=prompts(6), env=env, timeout=120)
    assert again.returncode == 0 and "6 of 6 image(s) already done" in again.stderr.decode(), \
        "the lock is released at the end"


def test_sigkill_mid_batch_then_a_rerun_has_every_image_exactly_once(sim, tmp_path):
    env, out = cli_env(sim, tmp_path), tmp_path / "out"
    first = start_batch(out, env, 8, "--steps", "25")
    wait_for(lambda: (out / "manifest.jsonl").exists() and (out / "manifest.jsonl").stat().st_size > 0, first)
    first.send_signal(signal.SIGKILL)
    communicate(first, 60)
    rerun = run_cli(*batch_args(out, "--steps", "25"), input=prompts(8), env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert_each_image_once(out, 8)


def test_a_damaged_manifest_is_repaired_on_rerun_with_one_warning(sim, tmp_path):
    env, out = cli_env(sim, tmp_path), tmp_path / "out"
    result = run_cli(*batch_args(out, "--steps", "2"), input=prompts(4), env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    lines = (out / "manifest.jsonl").read_text().splitlines()
    # line 2 lost (killed between the PNG and its line), a line without "key", garbage, a cut-off last line
    damaged = [lines[0], json.dumps({"status": "done", "path": "x.png"}), "%% not json", lines[2], lines[3][:25]]
    (out / "manifest.jsonl").write_text("\n".join(damaged))
    rendered = len(sim.records())
    rerun = run_cli(*batch_args(out, "--steps", "2", "--json"), input=prompts(4), env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    warnings = [line for line in rerun.stderr.decode().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "skipped 3 unreadable line(s) (first: line 2)" in warnings[0], rerun.stderr.decode()
    redone = [json.loads(line) for line in rerun.stdout.decode().splitlines()]
    assert sorted(r["key"] for r in redone) == sorted(json.loads(lines[i])["key"] for i in (1, 3)), \
        "the image whose line was lost and the one whose line was cut off are rendered again"
    assert len(sim.records()) == rendered + 2
    assert_each_image_once(out, 4)
