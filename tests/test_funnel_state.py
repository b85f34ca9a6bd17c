"""funnel.json is checked on every load (paths confined to the funnel folder, fields typed), a stage
whose source image is gone fails up front, and a funnel on remote workers fetches nothing locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image
from safetensors_util import write_safetensors
from sim_comfy import SimWorker

from imagegen.engine.progress import Reporter
from imagegen.funnel import pipeline as funnel
from imagegen.funnel.stages import Stage
from imagegen.util.errors import ImagegenError

SD15_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture
def checkpoint(tmp_path):
    return write_safetensors(tmp_path / "ckpt.safetensors", {SD15_KEY: ("F16", [320, 768])})


def finish(state: funnel.Funnel, number: int) -> None:
    for image in state.record(number)["images"]:
        path = state.root / image["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64)).save(path)
        image.update(status="done", width=64, height=64)
    state.record(number)["sheet"] = f"{state.record(number)['dir']}/sheet.png"
    state.save()


@pytest.fixture
def picked(tmp_path, isolated_home, checkpoint) -> funnel.Funnel:
    """A funnel whose drafts are done and picked (#2), with its refine stage planned."""
    state = funnel.Funnel.create(tmp_path / "f", "a fox", None, 100, [Stage("drafts", str(checkpoint), count=3, keep=1),
                                                                       Stage("refine", str(checkpoint), keep=1)])
    state.plan_images(1)
    finish(state, 1)
    state.record(1)["picks"], state.record(1)["picked_by"] = [2], "pick"
    state.plan_images(2)
    state.save()
    return state


def edit(state: funnel.Funnel, change) -> None:
    data = json.loads((state.root / "funnel.json").read_text())
    change(data)
    (state.root / "funnel.json").write_text(json.dumps(data))


@pytest.mark.parametrize("change, field, fragment", [
    (lambda d: d["stages"][0]["images"][0].update(path="/etc/passwd"), "stages[0].images[0].path",
     "must be a path relative"),
    (lambda d: d["stages"][1]["images"][0].update(path="../../victim.png"), "stages[1].images[0].path",
     "leads outside"),
    (lambda d: d["stages"][0].update(dir="stage-1-drafts/../.."), "stages[0].dir", "leads outside"),
    (lambda d: d["stages"][0].update(sheet="/tmp/sheet.png"), "stages[0].sheet", "must be a path relative"),
    (lambda d: d["stages"][0]["images"][1].update(path=7), "stages[0].images[1].path", "must be a path relative"),
    (lambda d: d["stages"][0]["images"][0].pop("index"), "stages[0].images[0].index", "not a whole number"),
    (lambda d: d["stages"][0]["images"][0].pop("width"), "stages[0].images[0].width", "not a whole number"),
    (lambda d: d["stages"][0].update(picks=[9]), "stages[0].picks", "this stage's image indices"),
    (lambda d: d["stages"][1]["images"][0].update(source=3), "stages[1].images[0].source", "not a picked image"),
    (lambda d: d["stages"][1].pop("name"), "stages[1].name", "is missing"),
    (lambda d: d["stages"][1].update(name="../x"), "stages[1].name", "not a stage name"),
    (lambda d: d.update(stages="all"), "stages", "non-empty list"),
    (lambda d: d.update(seed="7"), "seed", "wrong type"),
    (lambda d: d["stages"][0].update(count=10**9), "stages[0]", "count 1000000000 is outside"),
    (lambda d: d["stages"][0].update(count=None), "stages[0].count", "not a whole number"),
])
def test_a_crafted_state_file_is_refused_naming_the_field(picked, change, field, fragment):
    edit(picked, change)
    with pytest.raises(ImagegenError) as caught:
        funnel.Funnel.load(picked.root)
    assert caught.value.code == "invalid_funnel_state" and caught.value.exit_code == 2
    assert caught.value.details["field"] == field and f": {field}: " in caught.value.message
    assert fragment in caught.value.message


def test_a_link_in_the_funnel_folder_that_leads_out_is_refused(picked, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (picked.root / "stage-2-refine").symlink_to(outside)
    with pytest.raises(ImagegenError) as caught:
        funnel.Funnel.load(picked.root)
    assert caught.value.code == "invalid_funnel_state" and "stages[1].dir" in caught.value.message


def test_resume_and_show_refuse_a_path_outside_the_folder_and_touch_nothing(picked, tmp_path, isolated_home):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    edit(picked, lambda d: d["stages"][1]["images"][0].update(path=str(victim)))
    env = {"IMAGEGEN_HOME": str(isolated_home), "IMAGEGEN_RUNTIME": "local"}
    for args in (("resume", str(picked.root), "--json"), ("show", str(picked.root), "--json")):
        result = run_cli("funnel", *args, env=env, timeout=120)
        assert result.returncode == 2, result.stderr.decode()
        error = json.loads(result.stderr.decode().strip().splitlines()[-1])
        assert error["code"] == "invalid_funnel_state" and "stages[1].images[0].path" in error["message"]
    assert victim.read_bytes() == b"precious"


def test_a_source_image_gone_from_disk_fails_its_job_up_front(picked):
    source = picked.root / picked.record(1)["images"][1]["path"]
    source.unlink()  # between `resume` deciding to render stage 2 and the stage starting
    with pytest.raises(ImagegenError) as caught:
        # no runtime: nothing may be submitted
        funnel.render_stage(picked, 2, None, Reporter(), print, funnel.Options(), set())
    assert caught.value.code == "jobs_failed" and caught.value.exit_code == 1
    assert "stage 2 (refine): 1 image(s) failed" in caught.value.message and "is gone from disk" in caught.value.message
    assert f"imagegen funnel resume {picked.root}" in caught.value.hint
    image = funnel.Funnel.load(picked.root).record(2)["images"][0]
    assert image["status"] == "failed" and image["error"]["code"] == "source_missing"
    assert str(source) in image["error"]["message"]
    assert funnel.Funnel.load(picked.root).next_step() == {"action": "render", "stage": 1, "name": "drafts"}, \
        "a resume draws the missing draft again first"


def test_a_funnel_on_remote_workers_fetches_no_model_here(tmp_path):
    home = tmp_path / "home"
    with SimWorker(gpu_name="NVIDIA L40S", memory_total_mib=46068, step_seconds=0.002) as sim:
        env = {"IMAGEGEN_HOME": str(home), "IMAGEGEN_RUNTIME": "remote", "IMAGEGEN_REMOTE_WORKERS": sim.entry,
               "HF_ENDPOINT": "http://127.0.0.1:9"}  # a download would fail at once
        out = tmp_path / "fox"
        result = run_cli("funnel", "a remote fox", "-o", str(out), "--draft-model", "sd15", "--refine-model", "sd15",
                         "--polish-model", "none", "--upscale-model", "none", "--drafts", "3", "--keep", "1",
                         "--size", "64x64", "--steps", "2", "--auto", "--json", env=env, timeout=300)
        assert result.returncode == 0, result.stderr.decode()
    *images, status = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert status["status"] == "done" and len(images) == 4 and all(Path(r["path"]).is_file() for r in images)
    assert [r["funnel"]["stage"] for r in images].count(2) == 1
    models = home / "models"
    assert not models.exists() or not any(p.is_file() for p in models.rglob("*")), \
        "nothing is downloaded for remote workers"


def test_a_full_disk_while_saving_the_state_is_disk_full_and_keeps_the_old_file(picked, monkeypatch):
    import errno

    from imagegen.util import files

    before = (picked.root / "funnel.json").read_bytes()

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_atomic", full)
    with pytest.raises(ImagegenError) as caught:
        picked.save()
    assert caught.value.code == "disk_full" and "funnel.json" in caught.value.message
    assert (picked.root / "funnel.json").read_bytes() == before


def test_a_state_file_whose_first_stage_upscales_is_refused_not_a_crash(tmp_path, isolated_home, checkpoint):
    upscaler = write_safetensors(tmp_path / "up.safetensors", {"conv_first.weight": ("F32", [8, 3, 3, 3]),
                                                               "body.0.rdb1.conv1.weight": ("F32", [32, 8, 3, 3])})
    state = funnel.Funnel.create(tmp_path / "f", "a fox", None, 1, [Stage("drafts", str(checkpoint), count=2)])
    edit(state, lambda d: d["stages"][0].update(model=str(upscaler)))
    with pytest.raises(ImagegenError) as caught:
        funnel.render_stage(funnel.Funnel.load(state.root), 1, None, Reporter(), print, funnel.Options(), set())
    assert caught.value.code == "invalid_funnel_state" and "no stage before it" in caught.value.message


def test_a_second_command_on_a_running_funnel_stops_at_once_with_output_busy(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO, communicate

    with SimWorker(gpu_name="NVIDIA L40S", memory_total_mib=46068, step_seconds=0.02) as sim:
        env = {"IMAGEGEN_HOME": str(tmp_path / "home"), "IMAGEGEN_RUNTIME": "remote",
               "IMAGEGEN_REMOTE_WORKERS": sim.entry}
        out = tmp_path / "owl"
        first = subprocess.Popen([sys.executable, str(REPO / "generate_image.py"), "funnel", "an owl", "-o", str(out),
                                  "--draft-model", "sd15", "--refine-model", "none", "--polish-model", "none",
                                  "--upscale-model", "none", "--drafts", "6", "--size", "64x64",
                                  "--steps", "100", "--json"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env={**os.environ, **env})
        try:
            deadline = time.monotonic() + 120
            while not sim.records() and first.poll() is None:
                assert time.monotonic() < deadline, "the first funnel never rendered"
                time.sleep(0.05)
            second = run_cli("funnel", "resume", str(out), "--json", env=env, timeout=120)
            running = first.poll() is None
        finally:
            _stdout, stderr = communicate(first, 300)
    assert first.returncode == 0, stderr.decode()
    assert running, "the second command must be refused while the first renders"
    error = json.loads(second.stderr.decode().strip().splitlines()[-1])
    assert second.returncode == 1 and error["code"] == "output_busy" and "funnel show" in error["hint"]
    assert json.loads((out / "funnel.json").read_text())["next"] == {"action": "done"}
