"""The real CLI, real ComfyUI on CPU, a tiny real SD1.5-architecture checkpoint."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from jsonschema import Draft202012Validator

from imagegen.comfy import png
from imagegen.engine.schema import RESULT

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def env(comfyui_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e-home")
    values = {"IMAGEGEN_HOME": str(home), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir), "IMAGEGEN_KEEP_WARM": "300",
              "IMAGEGEN_RUNTIME": "local"}
    yield values
    run_cli("stop", "--all", env=values)


def workers(env):
    result = run_cli("workers", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def test_cold_then_warm_generate_with_a_local_checkpoint(env, tiny_sd15, tmp_path):
    started = time.monotonic()
    cold = run_cli("generate", "a friendly robot", "--checkpoint", str(tiny_sd15), "--size", "64x96", "--steps", "2",
                   "--seed", "7", "-o", str(tmp_path / "cold.png"), env=env)
    cold_seconds = time.monotonic() - started
    assert cold.returncode == 0, cold.stderr.decode()
    assert cold.stdout.decode() == f"{tmp_path / 'cold.png'}\n"  # stdout is data: one absolute path
    assert "CPU" in cold.stderr.decode()
    data = (tmp_path / "cold.png").read_bytes()
    assert png.png_size(data) == (64, 96)
    chunks = png.read_text_chunks(data)
    assert {"prompt", "parameters", "imagegen"} <= set(chunks)
    assert json.loads(chunks["imagegen"])["seed"] == 7
    first_pid = workers(env)[0]["pid"]

    started = time.monotonic()
    warm = run_cli("generate", "a friendly robot", "--checkpoint", str(tiny_sd15), "--size", "64x96", "--steps", "2",
                   "--seed", "8", "-o", str(tmp_path / "warm.png"), env=env)
    warm_seconds = time.monotonic() - started
    assert warm.returncode == 0, warm.stderr.decode()
    assert workers(env)[0]["pid"] == first_pid, "the second call must reuse the warm worker"
    assert "starting a local worker" not in warm.stderr.decode()
    assert warm_seconds < cold_seconds * 0.6, (cold_seconds, warm_seconds)


def test_json_and_count(env, tiny_sd15, tmp_path):
    result = run_cli("generate", "two lighthouses", "--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "1",
                     "--count", "2", "--seed", "100", "--json", "-o", str(tmp_path) + "/", env=env)
    assert result.returncode == 0, result.stderr.decode()
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [r["seed"] for r in records] == [100, 101]
    for record in records:
        assert record["schema"] == "imagegen.result/1" and record["width"] == 64
        assert png.png_size(open(record["path"], "rb").read()) == (64, 64)
        assert {"sampling", "since_submit"} <= set(record["timings"])


def test_png_bytes_on_stdout(env, tiny_sd15):
    result = run_cli("generate", "a cat", "--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "1", "-o", "-",
                     env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(png.PNG_SIGNATURE)
    assert png.png_size(result.stdout) == (64, 64)
    assert result.stdout.endswith(b"IEND\xaeB`\x82")  # nothing but the PNG


def test_registered_local_model_by_name(env, tiny_sd15, tmp_path):
    added = run_cli("models", "add", "tiny", "--file", str(tiny_sd15), env=env)
    assert added.returncode == 0, added.stderr.decode()
    listed = {json.loads(line)["name"]: json.loads(line)
              for line in run_cli("models", "list", "--json", env=env).stdout.decode().splitlines()}
    assert listed["tiny"]["installed"] and listed["tiny"]["family"] == "sd15"
    result = run_cli("generate", "a tiny model", "-m", "tiny", "--size", "64x64", "--steps", "1", "-o",
                     str(tmp_path / "t.png"), env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert png.png_size((tmp_path / "t.png").read_bytes()) == (64, 64)


def test_bad_input_exits_2_before_any_worker_starts(env, tiny_sd15, tmp_path):
    home = {**env, "IMAGEGEN_HOME": str(tmp_path / "fresh")}
    for args, code in ((["--size", "65x64"], "invalid_size"), (["--steps", "0"], "invalid_argument"),
                       (["-m", "sdxx"], "unknown_model")):
        extra = [] if "-m" in args else ["--checkpoint", str(tiny_sd15)]
        result = run_cli("generate", "x", *extra, *args, "--json", env=home)
        assert result.returncode == 2, result.stderr.decode()
        assert json.loads(result.stderr.decode().splitlines()[-1])["code"] == code
    workers_dir = tmp_path / "fresh" / "state" / "workers"
    assert not workers_dir.exists() or not list(workers_dir.glob("*.json"))


def idat(path) -> bytes:
    return b"".join(body for kind, body, _ in png.iter_chunks(open(path, "rb").read()) if kind == b"IDAT")


def test_same_parameters_same_pixels_and_from_reproduces(env, tiny_sd15, tmp_path):
    common = ["--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "3", "--cfg", "5.5", "--sampler", "euler"]
    first = run_cli("generate", "a reproducible fox", *common, "--seed", "4242", "--negative", "blur", "-o",
                    str(tmp_path / "a.png"), env=env)
    second = run_cli("generate", "a reproducible fox", *common, "--seed", "4242", "--negative", "blur", "-o",
                     str(tmp_path / "b.png"), env=env)
    other = run_cli("generate", "a reproducible fox", *common, "--seed", "4243", "--negative", "blur", "-o",
                    str(tmp_path / "c.png"), env=env)
    assert first.returncode == second.returncode == other.returncode == 0, \
        first.stderr.decode() + second.stderr.decode()
    assert idat(tmp_path / "a.png") == idat(tmp_path / "b.png"), \
        "same parameters on the same worker must give the same pixels"
    assert idat(tmp_path / "a.png") != idat(tmp_path / "c.png"), "a different seed must change the pixels"
    again = run_cli("generate", "--from", str(tmp_path / "a.png"), "--checkpoint", str(tiny_sd15), "-o",
                    str(tmp_path / "d.png"),
                    "--json", env=env)
    assert again.returncode == 0, again.stderr.decode()
    record = json.loads(again.stdout)
    assert (record["prompt"], record["negative"], record["seed"], record["steps"],
            record["cfg"]) == ("a reproducible fox", "blur", 4242, 3, 5.5)
    assert idat(tmp_path / "d.png") == idat(tmp_path / "a.png"), "--from must reproduce the image"
    assert record["files"]["checkpoint"]["sha256"] and record["model_hash"] == record["files"]["checkpoint"]["sha256"]
    varied = run_cli("generate", "--from", str(tmp_path / "a.png"), "--checkpoint", str(tiny_sd15), "--seed", "4243",
                     "-o", str(tmp_path / "e.png"), env=env)
    assert varied.returncode == 0 and idat(tmp_path / "e.png") == idat(tmp_path / "c.png"), "flags override the source"


def test_fast_mode_is_plain_on_a_cpu_worker_unless_asked(env, tiny_sd15, tmp_path):
    result = run_cli("generate", "a fox", "--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "2", "--fast",
                     "--json",
                     "-o", str(tmp_path / "fox.png"), env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert "fast" not in json.loads(result.stdout) and "IMAGEGEN_FAST_ON_CPU=1" in result.stderr.decode()


def test_fast_mode_without_a_compiler_fails_before_any_worker_starts(tiny_sd15, tmp_path):
    env = {"IMAGEGEN_HOME": str(tmp_path / "home"), "IMAGEGEN_RUNTIME": "local", "IMAGEGEN_FAST_ON_CPU": "1",
           "PATH": "/nonexistent"}
    result = run_cli("generate", "a fox", "--checkpoint", str(tiny_sd15), "--fast", "--json", "-o",
                     str(tmp_path / "fox.png"), env=env)
    error = json.loads(result.stderr.decode().splitlines()[-1])
    assert result.returncode == 2 and error["code"] == "fast_unavailable", result.stderr.decode()
    workers_dir = tmp_path / "home" / "state" / "workers"
    assert not workers_dir.exists() or not any(workers_dir.glob("*.json"))


def test_fast_mode_keeps_the_pixels_and_caches_compiled_kernels_in_the_model_cache(env, tiny_sd15, tmp_path):
    import numpy
    from PIL import Image

    common = ["a fast fox", "--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "3", "--seed", "77", "--json"]
    plain = run_cli("generate", *common, "-o", str(tmp_path / "plain.png"), env=env)
    fast = run_cli("generate", *common, "-o", str(tmp_path / "fast.png"),
                   env={**env, "IMAGEGEN_FAST": "1", "IMAGEGEN_FAST_ON_CPU": "1"})
    assert plain.returncode == fast.returncode == 0, plain.stderr.decode() + fast.stderr.decode()
    assert "fast" not in json.loads(plain.stdout) and json.loads(fast.stdout)["fast"] is True
    Draft202012Validator(RESULT).validate(json.loads(fast.stdout))
    pixels = [numpy.asarray(Image.open(tmp_path / name), dtype=float) for name in ("plain.png", "fast.png")]
    assert numpy.abs(pixels[0] - pixels[1]).mean() < 1.0, "compiling must not change what the model draws"
    cache = Path(env["IMAGEGEN_HOME"]) / "models" / ".compile-cache" / "inductor"
    assert cache.is_dir() and any(path.is_file() for path in cache.rglob("*")), \
        "inductor's cache belongs in the model cache"


def test_png_bytes_to_a_closed_pipe_exit_141(env, tiny_sd15):
    """`generate -o - | head -c 10`: the reader left; the CLI says so with exit 141, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before the CLI starts, so the first write fails whatever the timing
    try:
        result = subprocess.run([sys.executable, str(REPO / "generate_image.py"), "generate", "a cat", "--checkpoint",
                                 str(tiny_sd15), "--size", "64x64", "--steps", "1", "-o", "-"], stdout=write_end,
                                stderr=subprocess.PIPE, env={**os.environ, **env}, timeout=600)
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr.decode()
    assert "Traceback" not in result.stderr.decode() and "Exception ignored" not in result.stderr.decode()


def test_stop_by_name_stops_that_worker(env):
    running = workers(env)
    assert running
    refused = run_cli("stop", "no-such-worker", "--json", env=env)
    assert refused.returncode == 2
    assert json.loads(refused.stderr.decode().splitlines()[-1])["code"] == "invalid_argument"
    assert [w["pid"] for w in workers(env)] == [w["pid"] for w in running], "a refused stop stops nothing"
    result = run_cli("stop", running[0]["name"], env=env)
    assert result.returncode == 0 and f"stopped 1 worker(s): {running[0]['name']}" in result.stderr.decode()
    assert workers(env) == []
