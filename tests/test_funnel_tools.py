"""The MCP funnel and upscale tools (mcp/funnel_tools.py) driven by the real MCP client over stdio, with
real ComfyUI on CPU and tiny random-weight models: start a funnel, look, pick with variations, finish,
upscale the result."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image
from test_addons import tiny_lora  # noqa: F401  (a fixture)
from test_mcp import call_server, images, texts

from imagegen.comfy import png
from imagegen.mcp.funnel_tools import absolute
from imagegen.util.errors import ImagegenError


def test_path_arguments_must_be_absolute():
    assert absolute("/tmp/x", "dir") == Path("/tmp/x")
    for bad in ("relative/dir", "", "/tmp/\0x"):
        with pytest.raises(ImagegenError) as caught:
            absolute(bad, "dir")
        assert caught.value.code == "invalid_argument" and "absolute path" in caught.value.message


@pytest.fixture(scope="module")
def env(comfyui_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("mcp-funnel-home")
    values = {"IMAGEGEN_HOME": str(home), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir), "IMAGEGEN_RUNTIME": "local",
              "IMAGEGEN_KEEP_WARM": "120"}
    yield values
    run_cli("stop", "--all", env=values)


@pytest.mark.comfyui
def test_a_funnel_from_start_to_upscale_over_mcp(env, tiny_sd15, tiny_esrgan, tiny_lora, tmp_path):  # noqa: F811
    out = tmp_path / "fox"

    async def scenario(session):
        listed = {tool.name for tool in (await session.list_tools()).tools}
        started = await session.call_tool("funnel_start", {
            "prompt": "a red fox", "output_dir": str(out), "checkpoint": str(tiny_sd15), "drafts": 2, "keep": "1",
            "size": "64x64", "steps": "1", "seed": 40, "polish_model": "none", "upscale_model": str(tiny_esrgan),
            "loras": [f"{tiny_lora}:0.6"]})
        relative_lora = await session.call_tool("funnel_start", {"prompt": "a fox", "output_dir": str(tmp_path / "x"),
                                                                 "loras": ["mine.safetensors"]})
        shown = await session.call_tool("funnel_show", {"dir": str(out)})
        relative = await session.call_tool("funnel_show", {"dir": "fox"})
        bad_pick = await session.call_tool("funnel_pick", {"dir": str(out), "picks": [9]})
        varied = await session.call_tool("funnel_pick", {"dir": str(out), "picks": [2], "vary": 1})
        finished = await session.call_tool("funnel_pick", {"dir": str(out), "picks": [2]})
        final = finished.structured_content["status"]["final"][0] if not finished.is_error else None
        upscaled = await session.call_tool("upscale_image", {"images": [final], "model": str(tiny_esrgan),
                                                             "output_dir": str(tmp_path / "big")})
        return listed, started, shown, relative, bad_pick, varied, finished, upscaled, relative_lora

    listed, started, shown, relative, bad_pick, varied, finished, upscaled, relative_lora = call_server(
        env, tmp_path, scenario)
    assert {"funnel_start", "funnel_show", "funnel_pick", "upscale_image"} <= listed
    assert not started.is_error, texts(started)
    status = texts(started)[0]
    assert status["schema"] == "imagegen.funnel_status/1" and status["status"] == "awaiting_pick"
    assert status["choices"] == [1, 2] and status["stage"] == 1
    sheet, *thumbnails = images(started)
    assert len(thumbnails) == 2 and len(started.structured_content["results"]) == 2, "each draft's record"
    assert Image.open(io.BytesIO(sheet)).size[0] > 64, "the contact sheet, to pick from"
    assert all(r["loras"][0]["strength"] == 0.6 for r in started.structured_content["results"]), "the sd15 LoRA"
    assert relative_lora.is_error and "not an absolute path" in texts(relative_lora)[0]["message"]

    assert not shown.is_error and shown.structured_content["funnel"]["prompt"] == "a red fox"
    assert "stage 1 drafts" in shown.content[1].text, "funnel show's summary"
    assert relative.is_error and "must be an absolute path" in texts(relative)[0]["message"]
    assert bad_pick.is_error and "9 not on the sheet" in texts(bad_pick)[0]["message"]

    assert not varied.is_error, texts(varied)
    status = varied.structured_content["status"]
    assert status["status"] == "awaiting_pick" and status["stage"] == 2 and status["choices"] == [1, 2]
    assert [r["seed"] for r in varied.structured_content["results"]] == [42], "the pick's seed + 1"

    assert not finished.is_error, texts(finished)
    status = finished.structured_content["status"]
    assert status["status"] == "done"
    assert png.png_size(Path(status["final"][0]).read_bytes()) == (128, 128)

    assert not upscaled.is_error, texts(upscaled)
    (record,) = upscaled.structured_content["results"]
    assert record["path"] == str(tmp_path / "big" / (Path(status["final"][0]).stem + "-x2.png"))
    assert (record["width"], record["height"]) == (256, 256)
    assert record["upscale"]["scale"] == 2.0 and len(images(upscaled)) == 1
    assert json.loads(png.read_text_chunks(Path(record["path"]).read_bytes())["imagegen"])["family"] == "upscale"
