"""The MCP tools' handling of results and failures, with a stand-in runner (no ComfyUI)."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from imagegen.mcp.server import ImagegenTools, ImageSpec
from imagegen.util.errors import ImagegenError


def fake_runner(png_path, fail_item=None):
    """A runner as the scheduler will be one: plans in, (item, record or error) out."""

    def run(plans, runtime, reporter):
        for index, planned in plans.items():
            if index == fail_item:
                yield index, ImagegenError("worker_died", "the worker stopped")
                continue
            for params in planned.jobs:
                yield index, {"schema": "imagegen.result/1", "path": str(png_path), "seed": params.seed}
    return run


def render(tools, specs, batch):
    tools.runtime = lambda: None
    return tools._render(specs, ctx=None, batch=batch, cancelled=threading.Event())


def test_generate_image_fails_as_a_whole_but_lists_the_images_it_wrote(tmp_path):
    png = tmp_path / "a.png"
    Image.new("RGB", (300, 200)).save(png)
    spec = ImageSpec(prompt="x", model="sd15", count=2, seed=5, output_dir=str(tmp_path))
    tools = ImagegenTools(runner=fake_runner(png))
    ok = render(tools, [spec], batch=False)
    assert not ok.is_error and [r["seed"] for r in ok.structured_content["results"]] == [5, 6]
    assert [block.type for block in ok.content] == ["text", "image", "text", "image"]

    def dies_after_one(plans, runtime, reporter):
        yield from list(fake_runner(png)(plans, runtime, reporter))[:1]
        yield 0, ImagegenError("worker_died", "the worker stopped")

    failed = render(ImagegenTools(runner=dies_after_one), [spec], batch=False)
    assert failed.is_error and failed.structured_content["code"] == "worker_died"
    assert [block.type for block in failed.content] == ["text", "text", "image"]  # the error, then what was written


def test_batch_reports_bad_items_and_runs_the_rest(tmp_path):
    png = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(png)
    specs = [ImageSpec(prompt="a", model="sd15", seed=1, output_dir=str(tmp_path)),
             ImageSpec(prompt="b", model="sd15", size="65x64"),
             ImageSpec(prompt="c", model="sd15", seed=3, output_dir=str(tmp_path))]
    result = render(ImagegenTools(runner=fake_runner(png, fail_item=2)), specs, batch=True)
    assert not result.is_error
    assert [(r["item"], r["seed"]) for r in result.structured_content["results"]] == [(0, 1)]
    assert [(e["item"], e["code"]) for e in result.structured_content["errors"]] == [(1, "invalid_size"),
                                                                                     (2, "worker_died")]
    nothing = render(ImagegenTools(runner=fake_runner(png)), specs[1:2], batch=True)
    assert nothing.is_error


def test_relative_paths_in_any_argument_are_refused(tmp_path):
    """The server's working folder means nothing to its client: every path must be absolute."""
    for extra in ({"image": "in.png"}, {"output_dir": "out"}, {"checkpoint": "model.safetensors"},
                  {"loras": ["style.safetensors:0.5"]}, {"controls": ["canny-sd15:edges.png"]},
                  {"controls": [{"model": "canny-sd15", "image": "edges.png"}]}):
        with pytest.raises(ImagegenError, match="absolute path"):
            ImageSpec(prompt="a fox", **extra).request()
    assert ImageSpec(prompt="a fox", loras=["style:0.5"], output_dir=str(tmp_path)).request().loras == ["style:0.5"]
