"""`imagegen batch` through the real CLI over two real local ComfyUI workers on CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, communicate, run_cli
from safetensors_util import write_safetensors

from imagegen.comfy import png

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def env(comfyui_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("batch-home")
    values = {"IMAGEGEN_HOME": str(home), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir), "IMAGEGEN_RUNTIME": "local"}
    yield values
    run_cli("stop", "--all", env=values)


def batch_args(tiny, out, *extra):
    return ["batch", "-o", str(out), "--checkpoint", str(tiny), "--size", "64x64", "--workers", "2", *extra]


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def worker_pid(env, slot) -> int:
    return json.loads((Path(env["IMAGEGEN_HOME"]) / "state" / "workers" / f"local-{slot}.json").read_text())["pid"]


def test_prompts_from_stdin_over_two_workers(env, tiny_sd15, tmp_path):
    warm = run_cli(*batch_args(tiny_sd15, tmp_path / "warm", "--steps", "1"), input=b"one\ntwo\n", env=env)
    assert warm.returncode == 0, warm.stderr.decode()
    named = '{"prompt": "named", "output": "named", "seed": 9}'
    prompts = "\n".join(f"prompt number {i}" for i in range(8)) + f"\n{named}\n"
    out = tmp_path / "out"
    result = run_cli(*batch_args(tiny_sd15, out, "--steps", "30", "--json"), input=prompts.encode(), env=env)
    assert result.returncode == 0, result.stderr.decode()
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(lines) == 9 and all(line["status"] == "done" for line in lines)
    assert lines == sorted(manifest(out), key=lambda line: [x["key"] for x in lines].index(line["key"]))
    assert {line["worker"] for line in lines} == {"local-cpu", "local-cpu-2"}, "both workers must take jobs"
    assert (out / "named.png").is_file()
    assert next(line for line in lines if line["path"].endswith("named.png"))["seed"] == 9
    for line in lines:
        assert png.png_size(Path(line["path"]).read_bytes()) == (64, 64)
    # a rerun of the same command skips everything and starts nothing
    again = run_cli(*batch_args(tiny_sd15, out, "--steps", "30", "--json"), input=prompts.encode(), env=env)
    assert again.returncode == 0 and again.stdout == b""
    assert "9 of 9 image(s) already done" in again.stderr.decode()
    assert len(manifest(out)) == 9


def test_a_killed_workers_jobs_finish_elsewhere(env, tiny_sd15, tmp_path):
    out = tmp_path / "out"
    prompts = "\n".join(f"long prompt {i}" for i in range(8)).encode()
    args = batch_args(tiny_sd15, out, "--steps", "150")
    process = subprocess.Popen([sys.executable, str(REPO / "generate_image.py"), *args], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})
    process.stdin.write(prompts)
    process.stdin.close()
    process.stdin = None  # communicate() must not flush it again
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (out / "manifest.jsonl").exists():
        time.sleep(0.2)  # both workers up and the first image done: cpu-2 is busy now
    os.killpg(worker_pid(env, "cpu-2"), signal.SIGKILL)
    stdout, stderr = communicate(process, 400)
    assert process.returncode == 0, stderr.decode()
    lines = manifest(out)
    assert len(lines) == 8 and all(line["status"] == "done" for line in lines), stderr.decode()
    assert max(line["attempts"] for line in lines) >= 2, "the killed worker's jobs must have been retried"
    assert len(stdout.decode().splitlines()) == 8
    assert "failed (worker_" in stderr.decode() and "is back" in stderr.decode(), stderr.decode()


def test_a_job_failing_for_its_own_reason_is_recorded_and_the_rest_go_on(env, tiny_sd15, tmp_path):
    broken = write_safetensors(tmp_path / "broken.safetensors", {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ("F16", [320, 768])})
    items = ["good one", json.dumps({"prompt": "bad one", "checkpoint": str(broken)}), "good two"]
    out = tmp_path / "out"
    result = run_cli(*batch_args(tiny_sd15, out, "--steps", "2", "--json"), input="\n".join(items).encode(), env=env)
    assert result.returncode == 1
    error = json.loads(result.stderr.decode().strip().splitlines()[-1])
    assert error["code"] == "jobs_failed" and "line 2" in error["message"]
    lines = {line["line"]: line for line in manifest(out)}
    assert lines[1]["status"] == lines[3]["status"] == "done"
    assert lines[2]["status"] == "failed" and lines[2]["error"]["code"] in ("execution_failed", "graph_rejected")
    assert not Path(lines[2]["path"]).exists()


def test_ctrl_c_leaves_a_valid_manifest_and_a_rerun_finishes(env, tiny_sd15, tmp_path):
    out = tmp_path / "out"
    prompts = "\n".join(f"interrupted {i}" for i in range(10)).encode()
    args = batch_args(tiny_sd15, out, "--steps", "60")
    process = subprocess.Popen([sys.executable, str(REPO / "generate_image.py"), *args], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})
    process.stdin.write(prompts)
    process.stdin.close()
    process.stdin = None  # communicate() must not flush it again
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "manifest.jsonl").exists():
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _stdout, stderr = communicate(process, 60)
    assert process.returncode == 130, stderr.decode()
    before = manifest(out)  # every line parses
    assert 1 <= len(before) < 10
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    for line in before:
        assert Path(line["path"]).is_file()
    rerun = run_cli(*args, input=prompts, env=env)
    assert rerun.returncode == 0, rerun.stderr.decode()
    after = manifest(out)
    assert len({line["key"] for line in after if line["status"] == "done"}) == 10
    assert len(rerun.stdout.decode().splitlines()) == 10 - len(before)


def test_image_and_mask_items_over_two_workers_and_a_changed_input_reruns(env, tiny_sd15_clear, tmp_path):
    import numpy as np
    from PIL import Image

    from imagegen.engine import inputs

    warm = run_cli(*batch_args(tiny_sd15_clear, tmp_path / "warm", "--steps", "1"), input=b"one\ntwo\n", env=env)
    assert warm.returncode == 0, warm.stderr.decode()
    folder = tmp_path / "prompts"
    (folder / "in").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small.repeat(8, 0).repeat(8, 1)).save(folder / "in" / f"{i}.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(folder / "in" / "mask.png")
    items = [{"prompt": f"item {i}", "image": f"in/{i}.png", "output": f"item{i}",
              **({"mask": "in/mask.png", "mask_grow": 2} if i % 2 else {"denoise": 0.5})} for i in range(8)]
    (folder / "items.jsonl").write_text("\n".join(json.dumps(item) for item in items) + "\n")
    out = tmp_path / "out"
    args = ["batch", str(folder / "items.jsonl"), "-o", str(out), "--checkpoint", str(tiny_sd15_clear), "--workers",
            "2", "--steps", "30", "--json"]
    result = run_cli(*args, env=env, cwd=tmp_path)  # paths are relative to the prompts file, not to the cwd
    assert result.returncode == 0, result.stderr.decode()
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(lines) == 8 and all(line["status"] == "done" for line in lines)
    assert {line["worker"] for line in lines} == {"local-cpu", "local-cpu-2"}, "both workers must take jobs"
    for line in lines:
        i = int(Path(line["path"]).stem[len("item"):])
        source = folder / "in" / f"{i}.png"
        assert line["inputs"]["image"]["sha256"] == inputs.prepare(source).image.sha256
        assert png.png_size(Path(line["path"]).read_bytes()) == (64, 64)
        if i % 2:
            assert line["mask_grow"] == 2 and line["denoise"] == 1.0
            made = np.asarray(Image.open(line["path"]).convert("RGB"), dtype=float)
            kept = np.asarray(Image.open(source).convert("RGB"), dtype=float)
            outside = np.ones((64, 64), dtype=bool)
            outside[14:50, 14:50] = False
            assert abs(made - kept)[outside].mean() < 1.0
        else:
            assert line["denoise"] == 0.5 and "mask" not in line["inputs"]
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(folder / "in" / "3.png")  # one input changes
    again = run_cli(*args, env=env)
    assert again.returncode == 0, again.stderr.decode()
    rerun = [json.loads(line) for line in again.stdout.decode().splitlines()]
    assert [Path(line["path"]).name for line in rerun] == ["item3.png"], "only the item whose input changed reruns"
