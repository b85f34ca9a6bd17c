"""`imagegen mcp` driven by the real MCP client over stdio, rendering with real ComfyUI on CPU."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import anyio
import pytest
from conftest import REPO, run_cli
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from PIL import Image

from imagegen.comfy import png

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def env(comfyui_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("mcp-home")
    values = {"IMAGEGEN_HOME": str(home), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir), "IMAGEGEN_RUNTIME": "local",
              "IMAGEGEN_KEEP_WARM": "300"}
    yield values
    run_cli("stop", "--all", env=values)


def call_server(env: dict, tmp_path, scenario):
    """Start `generate_image.py mcp`, run `scenario(session)` against it, return what it returns."""
    params = StdioServerParameters(command=sys.executable, args=[str(REPO / "generate_image.py"), "mcp"],
                                   env={**os.environ, **env}, cwd=str(tmp_path))
    log_path = tmp_path / "server-stderr.log"

    async def main():
        with open(log_path, "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    with anyio.fail_after(300):
                        return await scenario(session)

    try:
        return anyio.run(main)
    except BaseException:
        print(log_path.read_text(), file=sys.stderr)  # the server's stderr, shown with the failure
        raise


def texts(result) -> list[dict]:
    return [json.loads(block.text) for block in result.content if block.type == "text"]


def images(result) -> list[bytes]:
    return [base64.b64decode(block.data) for block in result.content if block.type == "image"]


def test_tools_and_list_models(env, tmp_path):
    async def scenario(session):
        tools = await session.list_tools()
        return tools, await session.call_tool("list_models", {})

    tools, result = call_server(env, tmp_path, scenario)
    by_name = {tool.name: tool for tool in tools.tools}
    assert set(by_name) == {"generate_image", "batch", "run_workflow", "list_models", "funnel_start", "funnel_show",
                            "funnel_pick", "upscale_image"}
    options = set(by_name["generate_image"].input_schema["properties"])
    assert {"prompt", "checkpoint", "size", "steps", "seed", "count", "fast", "output_dir"} <= options
    assert not result.is_error
    (models,) = texts(result)
    assert {m["schema"] for m in models} == {"imagegen.model/1"}
    assert "sd15" in {m["name"] for m in models}


def test_generate_image_returns_path_parameters_thumbnail_and_progress(env, tiny_sd15, tmp_path):
    progress = []

    async def on_progress(value, total, message):
        progress.append((value, total, message))

    async def scenario(session):
        return await session.call_tool("generate_image", {
            "prompt": "a friendly robot", "checkpoint": str(tiny_sd15), "size": "64x64", "steps": 1, "seed": 11,
            "output_dir": str(tmp_path / "out")}, progress_callback=on_progress)

    result = call_server(env, tmp_path, scenario)
    assert not result.is_error, result.content
    (record,) = texts(result)
    assert record["schema"] == "imagegen.result/1" and record["seed"] == 11 and record["steps"] == 1
    assert record["path"].startswith(str(tmp_path / "out"))
    assert png.png_size(open(record["path"], "rb").read()) == (64, 64)
    (thumb,) = images(result)
    assert thumb.startswith(png.PNG_SIGNATURE) and max(Image.open(io.BytesIO(thumb)).size) <= 128
    assert result.structured_content["results"][0]["path"] == record["path"]
    assert progress, "no progress notification arrived"
    values = [value for value, _total, _message in progress]
    assert values == sorted(set(values)), "progress must increase with every notification"
    assert progress[-1][:2] == (1, 1) and "saved" in progress[-1][2]


def test_bad_input_is_a_tool_error_with_the_error_json(env, tmp_path):
    async def scenario(session):
        return [await session.call_tool("generate_image", {"prompt": "x", "model": "sd15", **extra})
                for extra in ({"size": "65x64"}, {"output_dir": "-"})]

    bad_size, stdout_dir = call_server(env, tmp_path, scenario)
    assert bad_size.is_error
    (error,) = texts(bad_size)
    assert error["schema"] == "imagegen.error/1" and error["code"] == "invalid_size"
    assert error["message"] and error["hint"] and error["exit_code"] == 2
    assert stdout_dir.is_error and texts(stdout_dir)[0]["code"] == "invalid_argument"  # stdout is the protocol


def test_batch_runs_every_item_and_reports_the_failed_one(env, tiny_sd15, tmp_path):
    common = {"checkpoint": str(tiny_sd15), "size": "64x64", "steps": 1, "output_dir": str(tmp_path / "out")}

    async def scenario(session):
        return await session.call_tool("batch", {"items": [
            {"prompt": "a red fox", "seed": 1, "count": 2, **common},
            {"prompt": "a bad size", **common, "size": "64x65"},
            {"prompt": "a blue bird", "seed": 3, **common}]})

    result = call_server(env, tmp_path, scenario)
    assert not result.is_error, result.content
    records = texts(result)
    done = [r for r in records if r["schema"] == "imagegen.result/1"]
    assert [(r["item"], r["seed"]) for r in done] == [(0, 1), (0, 2), (2, 3)]
    assert [(r["item"], r["code"]) for r in records if r["schema"] == "imagegen.error/1"] == [(1, "invalid_size")]
    assert len(images(result)) == 3
    assert all(os.path.isfile(r["path"]) for r in done)


def test_schema_errors_and_unknown_arguments_are_the_error_json(env, tmp_path):
    """Wrong types, a missing prompt and unknown arguments used to come back as the SDK's plain text, or
    (unknown arguments) be dropped silently."""
    calls = [("generate_image", {"prompt": "x", "steps": "abc"}, ["steps"]),
             ("generate_image", {"size": "64x64"}, ["prompt is required"]),
             ("generate_image", {"prompt": "x", "stepz": 3}, ["stepz", "did you mean steps"]),
             ("generate_image", {"prompt": "x", "count": [1]}, ["count"]),
             ("batch", {"items": [{"prompt": "x", "sizee": "64x64"}]}, ["items.0.sizee is not an option"]),
             ("batch", {"items": "a fox"}, ["items"]),
             ("batch", {"items": [{"seed": 1}]}, ["items.0.prompt is required"]),
             ("list_models", {"verbose": True}, ["verbose"])]

    async def scenario(session):
        return [await session.call_tool(name, arguments) for name, arguments, _ in calls]

    results = call_server(env, tmp_path, scenario)
    for (name, arguments, fragments), result in zip(calls, results, strict=True):
        assert result.is_error, (name, arguments)
        (error,) = texts(result)
        assert error["schema"] == "imagegen.error/1" and error["code"] == "invalid_argument", error
        assert error["exit_code"] == 2 and error["hint"] and error["message"].startswith(name)
        assert all(fragment in error["message"] for fragment in fragments), error["message"]
        assert result.structured_content == error


def _cancel_when(env: dict, tmp_path, arguments: dict, ready, after, progress_seen: list | None = None):
    """Call generate_image and cancel the call (the client sends notifications/cancelled) once `ready()`
    is true; then, with the server still running, wait until `after()` holds and return list_models'
    answer on the same session: the server must still serve."""
    async def scenario(session):
        async def on_progress(value, total, message):
            if progress_seen is not None:
                progress_seen.append(message or "")

        async with anyio.create_task_group() as group:
            group.start_soon(lambda: session.call_tool("generate_image", arguments, progress_callback=on_progress))
            with anyio.fail_after(120):
                while not ready():
                    await anyio.sleep(0.05)
            group.cancel_scope.cancel()
        with anyio.fail_after(120):
            while not after():
                await anyio.sleep(0.1)
        return await session.call_tool("list_models", {})

    return call_server(env, tmp_path, scenario)


def test_cancelling_stops_a_download_in_progress(env, tmp_path):
    """A cancelled call used to go on downloading (gigabytes) after the client gave up."""
    import time

    from hub_server import HubServer

    home = tmp_path / "home"
    home.mkdir()
    size = 24 * 1024 * 1024
    with HubServer() as hub:
        hub.delay = 0.02  # 64 KiB per 20 ms: the whole file takes several seconds
        sha = hub.add("org/slow", "slow.safetensors", os.urandom(size))
        (home / "models.yaml").write_text(
            "schema: 1\nmodels:\n  slow:\n    family: sd15\n    files:\n      checkpoint: {repo: org/slow, "
            f"file: slow.safetensors, size: {size}, sha256: {sha}}}\n")
        values = {**env, "IMAGEGEN_HOME": str(home), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
                  "HF_TOKEN_PATH": str(tmp_path / "no-token")}
        final = home / "models" / "checkpoints" / "slow.safetensors"
        parts = lambda: sorted((home / "models").rglob("*.part"))  # noqa: E731
        sizes: list[tuple[float, int]] = []

        def settled() -> bool:  # the partial file has not grown for a while: the transfer stopped
            now = time.monotonic()
            sizes.append((now, sum(p.stat().st_size for p in parts()) if not final.exists() else size))
            earlier = [s for t, s in sizes if now - t >= 8]
            return final.exists() or (bool(earlier) and earlier[-1] == sizes[-1][1])

        answer = _cancel_when(values, tmp_path, {"prompt": "a fox", "model": "slow", "size": "64x64", "steps": 1},
                              ready=lambda: bool(hub.gets()), after=settled)
        assert not answer.is_error  # the server still answers after the cancellation
        assert not final.exists() and sizes[-1][1] < size, "the download went on after the call was cancelled"
        assert parts(), "the partial file stays, so the next call resumes"


def test_cancelling_stops_a_worker_start_in_progress(env, tmp_path):
    """A cancelled call used to leave the worker it was starting running."""
    from safetensors_util import write_safetensors

    home = tmp_path / "home"
    pid_file = tmp_path / "worker.pid"
    slow_python = tmp_path / "slow-python"
    slow_python.write_text(f'#!/bin/sh\necho $$ > "{pid_file}"\nexec sleep 600\n')  # a worker that never gets ready
    slow_python.chmod(0o755)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    checkpoint = write_safetensors(tmp_path / "tiny.safetensors", {key: ("F16", [4, 768])})
    values = {**env, "IMAGEGEN_HOME": str(home), "IMAGEGEN_WORKER_PYTHON": str(slow_python),
              "IMAGEGEN_START_TIMEOUT": "600"}
    seen: list[str] = []
    def gone() -> bool:
        pid = int(pid_file.read_text())
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith(("Z", "X"))
        except (FileNotFoundError, IndexError):
            return True

    answer = _cancel_when(values, tmp_path, {"prompt": "a fox", "checkpoint": str(checkpoint), "size": "64x64"},
                          ready=lambda: pid_file.exists() and any("starting a local worker" in m for m in seen),
                          after=gone, progress_seen=seen)  # fails after 120 s when the worker is left running
    assert not answer.is_error
    assert not list((home / "state" / "workers").glob("*.json"))


def test_generate_image_and_batch_take_an_input_image_and_mask(env, tiny_sd15_clear, tmp_path):
    import numpy as np

    rng = np.random.default_rng(1)
    source = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)).save(source)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[0:32, :] = 255  # repaint the top half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = {"checkpoint": str(tiny_sd15_clear), "steps": 1, "output_dir": str(tmp_path / "out")}

    async def scenario(session):
        inpainted = await session.call_tool("generate_image", {"prompt": "a sky", "image": str(source),
                                                               "mask": str(tmp_path / "mask.png"), **common})
        relative = await session.call_tool("generate_image", {"prompt": "a sky", "image": "photo.png", **common})
        listed = await session.call_tool("batch", {"items": [
            {"prompt": "kept", "image": str(source), "denoise": 0.0, "seed": 2, **common},
            {"prompt": "mismatch", "image": str(source), "mask": str(REPO / "tests" / "missing.png"), **common}]})
        return inpainted, relative, listed

    inpainted, relative, listed = call_server(env, tmp_path, scenario)
    assert not inpainted.is_error, inpainted.content
    (record,) = texts(inpainted)
    assert set(record["inputs"]) == {"image", "mask"} and record["denoise"] == 1.0
    made = np.asarray(Image.open(record["path"]).convert("RGB"), dtype=float)
    kept = np.asarray(Image.open(source).convert("RGB"), dtype=float)
    assert abs(made - kept)[40:].mean() < 1.0, "the unmasked bottom half keeps the input's pixels"
    assert relative.is_error and texts(relative)[0]["code"] == "invalid_argument"
    assert "absolute" in texts(relative)[0]["message"]
    records = texts(listed)
    done = [r for r in records if r["schema"] == "imagegen.result/1"]
    assert [r["item"] for r in done] == [0] and done[0]["denoise"] == 0.0
    assert abs(np.asarray(Image.open(done[0]["path"]).convert("RGB"), dtype=float) - kept).mean() < 1.0
    failed = [r for r in records if r["schema"] == "imagegen.error/1"]
    assert [(r["item"], r["code"]) for r in failed] == [(1, "invalid_source_image")]
