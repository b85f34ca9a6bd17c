"""`funnel resume DIR --vary N` ("more like this", funnel/vary.py): a variations stage goes in after the
picks; checked without workers, and run once through the real CLI on a local ComfyUI worker (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from jsonschema import Draft202012Validator
from safetensors_util import write_safetensors

from imagegen.comfy import png
from imagegen.engine.schema import FUNNEL_STATUS, FUNNEL_STATUS_SCHEMA, RESULT
from imagegen.funnel import vary
from imagegen.funnel.pipeline import STATUS_SCHEMA, Funnel
from imagegen.funnel.stages import Stage
from imagegen.util.errors import ImagegenError

SD15_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture
def funnel(tmp_path, isolated_home) -> Funnel:
    checkpoint = write_safetensors(tmp_path / "ckpt.safetensors", {SD15_KEY: ("F16", [320, 768])})
    upscaler = write_safetensors(tmp_path / "up.safetensors", {"conv_first.weight": ("F32", [8, 3, 3, 3]),
                                                              "body.0.rdb1.conv1.weight": ("F32", [8, 8, 3, 3])})
    stages = [Stage("drafts", str(checkpoint), count=3, keep=1, size="64x64", steps=1),
              Stage("big", str(upscaler), keep=1, scale=2), Stage("refine", str(checkpoint), size="64x64", steps=1)]
    return Funnel.create(tmp_path / "fox", "a fox", None, 100, stages)


def _done(funnel: Funnel, number: int, picks: list[int] | None) -> None:
    """Stage `number` as if rendered: planned images with files, and the picks made."""
    funnel.plan_images(number)
    for image in funnel.record(number)["images"]:
        funnel.path(image).parent.mkdir(parents=True, exist_ok=True)
        funnel.path(image).write_bytes(b"png of " + str(image["seed"]).encode())
        image.update(status="done", width=64, height=64)
    funnel.record(number)["picks"] = picks
    funnel.save()


def test_a_variations_stage_shows_each_pick_then_redraws_seeded_after_it(funnel):
    _done(funnel, 1, [2, 3])
    added = vary.insert(funnel, 1, 2)
    assert added == 2 and [r["name"] for r in funnel.data["stages"]] == ["drafts", "drafts-vary", "big", "refine"]
    record = funnel.record(2)
    assert (record["count"], record["keep"], record["denoise"], record["size"]) == (2, 2, 0.35, "64x64")
    assert record["dir"] == "stage-2-drafts-vary" and record["vary"] is True
    images = vary.plan(funnel, 2)
    seeds = [image["seed"] for image in images]
    assert seeds == [101, 102, 103, 102, 103, 104], "the pick's own seed, then seed+1, seed+2"
    assert [image["source"] for image in images] == [2, 2, 2, 3, 3, 3]
    assert [bool(image.get("copy")) for image in images] == [True, False, False] * 2
    record["images"] = images
    funnel.save()
    assert Funnel.load(funnel.root).next_step() == {"action": "render", "stage": 2, "name": "drafts-vary"}
    vary.copy_pick(funnel, images[0], funnel.record(1)["images"][1])
    assert funnel.path(images[0]).read_bytes() == b"png of 101" and images[0]["status"] == "done"


def test_variations_need_picks_and_a_drawing_stage(funnel):
    funnel.plan_images(1)
    with pytest.raises(ImagegenError) as caught:
        vary.insert(funnel, 1, 2)
    assert "has no picks yet" in caught.value.message and "--pick 1 --vary 2" in caught.value.hint
    _done(funnel, 1, [1])
    _done(funnel, 2, [1])
    with pytest.raises(ImagegenError) as caught:
        vary.insert(funnel, 2, 2)
    assert "upscales" in caught.value.message
    for count, denoise in ((0, None), (17, None), (2, 0.0), (2, 1.5)):
        with pytest.raises(ImagegenError):
            vary.check(count, denoise)


def test_the_status_record_has_its_schema():
    assert STATUS_SCHEMA == FUNNEL_STATUS_SCHEMA


def test_a_state_file_with_a_bad_vary_field_is_refused(funnel):
    state = funnel.root / "funnel.json"
    data = json.loads(state.read_text())
    data["stages"][0]["vary"] = "yes"
    state.write_text(json.dumps(data))
    with pytest.raises(ImagegenError) as caught:
        Funnel.load(funnel.root)
    assert caught.value.code == "invalid_funnel_state" and "vary" in caught.value.message


def test_vary_flags_are_checked_before_anything_runs(funnel):
    done = run_cli("funnel", "resume", str(funnel.root), "--vary", "40", "--json")
    assert done.returncode == 2 and "--vary 40 is outside 1..16" in done.stderr.decode()
    done = run_cli("funnel", "resume", str(funnel.root), "--vary-denoise", "0.3", "--json")
    assert done.returncode == 2 and "--vary-denoise needs --vary" in done.stderr.decode()


@pytest.mark.comfyui
def test_more_like_this_through_the_real_cli(comfyui_dir, tiny_sd15, tmp_path):
    env = {"IMAGEGEN_HOME": str(tmp_path / "home"), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir),
           "IMAGEGEN_RUNTIME": "local", "IMAGEGEN_KEEP_WARM": "60"}
    out = tmp_path / "fox"
    try:
        first = run_cli("funnel", "run", "a red fox", "-o", str(out), "--checkpoint", str(tiny_sd15), "--polish-model",
                        "none", "--upscale-model", "none", "--drafts", "2", "--keep", "1", "--size", "64x64",
                        "--steps", "1", "--seed", "500", "--json", env=env)
        assert first.returncode == 0, first.stderr.decode()
        assert json.loads(first.stdout.decode().splitlines()[-1])["status"] == "awaiting_pick"

        varied = run_cli("funnel", "resume", str(out), "--pick", "2", "--vary", "2", "--json", env=env)
        assert varied.returncode == 0, varied.stderr.decode()
        said = varied.stderr.decode()
        assert "kept image 2 (pick)" in said and "2 variation(s) of image 2" in said, said
        assert "2 image(s) with" in said and "beside the 1 pick(s)" in said and "earlier" not in said, said
        *records, status = (json.loads(line) for line in varied.stdout.decode().splitlines())
        assert not list(Draft202012Validator(FUNNEL_STATUS).iter_errors(status))
        assert not [e for r in records for e in Draft202012Validator(RESULT).iter_errors(r)]
        assert status["status"] == "awaiting_pick" and status["stage"] == 2 and status["choices"] == [1, 2, 3]
        assert [r["seed"] for r in records] == [502, 503] and {r["denoise"] for r in records} == {0.35}
        state = json.loads((out / "funnel.json").read_text())
        assert [s["name"] for s in state["stages"]] == ["drafts", "drafts-vary", "refine"]
        pick = out / state["stages"][0]["images"][1]["path"]
        assert (out / state["stages"][1]["images"][0]["path"]).read_bytes() == pick.read_bytes()
        assert Path(status["sheet"]).is_file()

        final = run_cli("funnel", "resume", str(out), "--pick", "3", "--json", env=env)
        assert final.returncode == 0, final.stderr.decode()
        status = json.loads(final.stdout.decode().splitlines()[-1])
        assert status["status"] == "done"
        state = json.loads((out / "funnel.json").read_text())
        assert state["stages"][2]["images"][0]["source"] == 3
        chunk = json.loads(png.read_text_chunks(Path(status["final"][0]).read_bytes())["imagegen"])
        assert chunk["denoise"] == 0.55, "the refine stage redraws the picked variation"
    finally:
        run_cli("stop", "--all", env=env)
