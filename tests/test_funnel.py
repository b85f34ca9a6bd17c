"""`imagegen funnel`: stages from defaults, flags and a stage file; picking; the state file; and whole
funnels through the real CLI over real local ComfyUI workers on CPU with tiny random-weight models."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, communicate, run_cli
from PIL import Image
from safetensors_util import write_safetensors
from test_addons import tiny_lora  # noqa: F401  (a fixture)

from imagegen.comfy import png
from imagegen.engine.progress import Reporter
from imagegen.funnel import contact_sheet
from imagegen.funnel import pipeline as funnel
from imagegen.funnel.stages import Stage, configure, default_stages, load_stage_file
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError

SD15_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
NO_MODELS = {"drafts": None, "refine": None, "polish": None, "upscale": None}


@pytest.fixture
def fake_models(tmp_path):
    """Header-only files: one detected as an SD1.5 checkpoint, one as an ESRGAN upscaler."""
    checkpoint = write_safetensors(tmp_path / "ckpt.safetensors", {SD15_KEY: ("F16", [320, 768])})
    upscaler = write_safetensors(tmp_path / "up.safetensors", {"conv_first.weight": ("F32", [8, 3, 3, 3]),
                                                               "body.0.rdb1.conv1.weight": ("F32", [32, 8, 3, 3])})
    return checkpoint, upscaler


# --- stages -----------------------------------------------------------------------------
def test_default_stages_polish_with_flux_dev_only_when_its_files_are_there(isolated_home):
    registry = Registry.load()
    stages = default_stages(registry)
    assert [(s.name, s.model, s.count, s.keep) for s in stages] == [
        ("drafts", "sd15", 20, 8), ("refine", "sdxl", 1, 3), ("polish", "sdxl", 1, 1),
        ("upscale", "realesrgan-x4", 1, None)]
    assert stages[1].size == "1024x1024" and stages[1].denoise == 0.55 and stages[2].denoise == 0.3
    assert stages[2].steps > stages[1].steps and stages[3].scale == 2
    assert registry.get("realesrgan-x4").family == "upscale"
    for file in registry.get("flux-dev").files.values():
        file.cache_path().parent.mkdir(parents=True, exist_ok=True)
        file.cache_path().write_bytes(b"")
    polish = default_stages(registry)[2]
    assert polish.model == "flux-dev" and polish.denoise == 0.3


def test_flags_set_each_stage(isolated_home, fake_models):
    checkpoint, upscaler = fake_models
    registry = Registry.load()
    stages = configure(default_stages(registry), registry, models={**NO_MODELS, "upscale": str(upscaler)},
                       checkpoint=checkpoint, drafts=5, keep="4,2,1", size="64x64,128x128,128x128", steps="3",
                       denoise="0.6,0.2", scale=4)
    assert [s.model for s in stages] == [str(checkpoint)] * 3 + [str(upscaler)]
    assert [s.keep for s in stages[:3]] == [4, 2, 1] and stages[0].count == 5
    assert [s.size for s in stages[:3]] == ["64x64", "128x128", "128x128"] and all(s.steps == 3 for s in stages[:3])
    assert [s.denoise for s in stages] == [None, 0.6, 0.2, None] and stages[3].scale == 4
    fewer = configure(default_stages(registry), registry, models={**NO_MODELS, "polish": "none", "upscale": "none"},
                      checkpoint=checkpoint, keep="3")
    assert [s.name for s in fewer] == ["drafts", "refine"] and fewer[0].keep == 3


@pytest.mark.parametrize("flags, fragment", [
    ({"keep": "4,2"}, "--keep '4,2': give one value, or 3"),
    ({"denoise": "0.5,x"}, "not a list of float"),
    ({"denoise": "1.5"}, "denoise 1.5 is outside 0..1"),
    ({"size": "65x64"}, "not a multiple of 8"),
    ({"steps": "0"}, "--steps 0 is outside"),
    ({"drafts": 0}, "count 0 is outside"),
    ({"models": {**NO_MODELS, "drafts": "none"}}, "cannot be skipped"),
    ({"models": {**NO_MODELS, "refine": "nope"}}, "unknown model 'nope'"),
])
def test_bad_flags_are_refused_before_anything_starts(isolated_home, fake_models, flags, fragment):
    registry = Registry.load()
    flags = {"models": NO_MODELS, "checkpoint": fake_models[0], **flags}
    with pytest.raises(ImagegenError) as caught:
        configure(default_stages(registry), registry, **flags)
    assert fragment in caught.value.message and caught.value.exit_code == 2


def test_an_upscaler_cannot_come_first(isolated_home, fake_models):
    registry = Registry.load()
    with pytest.raises(ImagegenError, match="first stage must make images"):
        configure([Stage("up", str(fake_models[1]))], registry, models={})


def test_stage_file_with_a_relative_model_path(tmp_path, isolated_home, fake_models):
    stage_file = tmp_path / "stages.yaml"
    stage_file.write_text("stages:\n"
                          "  - {name: drafts, model: ckpt.safetensors, count: 4, keep: 2, size: 64x64, steps: 2}\n"
                          "  - name: big\n    model: ./up.safetensors\n    scale: 2\n")
    stages = load_stage_file(stage_file)
    assert stages == [Stage("drafts", str(fake_models[0]), count=4, keep=2, size="64x64", steps=2),
                      Stage("big", str(fake_models[1]), scale=2)]
    registry = Registry.load()
    assert configure(stages, registry, models={}) == stages
    with pytest.raises(ImagegenError, match="--refine-model: there is no stage named refine"):
        configure(stages, registry, models={"refine": "sdxl"})


@pytest.mark.parametrize("text, line, fragment", [
    ("stages:\n  - name: drafts\n    model: sd15\n    count: many\n", 4, "count: expected int, got 'many'"),
    ("stages:\n  - name: drafts\n    model: sd15\n  - {name: up, model: x, colour: red}\n", 4,
     "unknown stage field 'colour'"),
    ("stages:\n  - name: drafts\n    model: sd15\n    denoise: 2\n", 2, "denoise 2.0 is outside 0..1"),
    ("stages:\n  - name: Drafts!\n    model: sd15\n", 2, "stage name 'Drafts!'"),
    ("stages:\n  - name: drafts\n", 2, "a stage needs `model:`"),
    ("stages:\n  - [1, 2\n", 3, "not valid YAML"),
    ("stages: []\n", 1, "non-empty `stages:` list"),
    ("stages:\n  - {name: a, model: sd15}\nextra: 1\n", 3, "unknown top-level key"),
])
def test_stage_file_errors_name_file_and_line(tmp_path, text, line, fragment):
    path = tmp_path / "stages.yaml"
    path.write_text(text)
    with pytest.raises(ImagegenError) as caught:
        load_stage_file(path)
    assert caught.value.message.startswith(f"{path}:{line}: "), caught.value.message
    assert fragment in caught.value.message and caught.value.details["line"] == line


# --- picking ------------------------------------------------------------------------------
def test_picks_are_indices_from_the_sheet():
    assert funnel.parse_picks("3,7", [1, 3, 7], None) == [3, 7]
    assert funnel.parse_picks(" 7 3 ", [1, 3, 7], None) == [7, 3]
    for bad, fragment in (("4", "4 not on the sheet"), ("3,3", "distinct"), ("x", "distinct"), ("", "distinct")):
        with pytest.raises(ImagegenError, match=fragment):
            funnel.parse_picks(bad, [1, 3, 7], "sheet.png")


def test_auto_without_a_scorer_says_it_keeps_the_first_n(monkeypatch, capsys):
    monkeypatch.delenv(funnel.SCORER_ENV, raising=False)
    images = [(i, Path(f"{i}.png")) for i in (1, 2, 3, 4)]
    assert funnel.auto_pick("a fox", images, 2, Reporter()) == [1, 2]
    assert "no CLIP-similarity scorer is configured (IMAGEGEN_FUNNEL_SCORER), so it keeps the first 2: 1, 2" \
        in capsys.readouterr().err


def test_auto_with_a_scorer_keeps_the_best(tmp_path, monkeypatch, capsys):
    scorer = tmp_path / "scorer.py"
    scorer.write_text("import json, sys\nrequest = json.load(sys.stdin)\nassert request['prompt'] == 'a fox'\n"
                      "for path in request['images']:\n    print({'1.png': 0.1, '2.png': 0.9, '3.png': 0.5}[path])\n")
    monkeypatch.setenv(funnel.SCORER_ENV, f"{sys.executable} {scorer}")
    assert funnel.auto_pick("a fox", [(i, Path(f"{i}.png")) for i in (1, 2, 3)], 2, Reporter()) == [2, 3]
    assert "highest scores" in capsys.readouterr().err
    monkeypatch.setenv(funnel.SCORER_ENV, f"{sys.executable} -c print(1)")
    with pytest.raises(ImagegenError, match="1 score"):
        funnel.auto_pick("a fox", [(i, Path(f"{i}.png")) for i in (1, 2)], 1, Reporter())


def test_asking_on_a_terminal():
    err = io.StringIO()
    assert funnel.ask([1, 2, 3], 2, "s.png", io.StringIO("9\n2 3\n"), err) == [2, 3]
    assert "contact sheet: s.png" in err.getvalue() and "9 not on the sheet" in err.getvalue()
    assert funnel.ask([1, 2, 3], 2, "s.png", io.StringIO("\n"), io.StringIO()) == [1, 2]
    assert funnel.ask([1, 2, 3], 2, "s.png", io.StringIO("q\n"), io.StringIO()) is None
    assert funnel.ask([1, 2, 3], 2, "s.png", io.StringIO(""), io.StringIO()) is None


# --- the state file -------------------------------------------------------------------------
def _finish(state: funnel.Funnel, number: int) -> None:
    for image in state.record(number)["images"]:
        path = state.root / image["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64)).save(path)
        image.update(status="done", width=64, height=64)
    state.record(number)["sheet"] = f"{state.record(number)['dir']}/sheet.png"
    state.save()


def test_the_state_file_says_what_comes_next(tmp_path, isolated_home, fake_models):
    stages = [Stage("drafts", str(fake_models[0]), count=4, keep=2),
              Stage("refine", str(fake_models[0]), count=2, keep=1), Stage("up", str(fake_models[1]), scale=2)]
    state = funnel.Funnel.create(tmp_path / "f", "a fox", None, 100, stages)
    with pytest.raises(ImagegenError) as caught:
        funnel.Funnel.create(tmp_path / "f", "a fox", None, 100, stages)
    assert caught.value.code == "output_exists" and "funnel resume" in caught.value.hint
    assert state.next_step() == {"action": "render", "stage": 1, "name": "drafts"}
    state.plan_images(1)
    assert [(i["index"], i["seed"], i["path"]) for i in state.record(1)["images"]][:2] == [
        (1, 100, "stage-1-drafts/01-100.png"), (2, 101, "stage-1-drafts/02-101.png")]
    _finish(state, 1)
    loaded = funnel.Funnel.load(tmp_path / "f")
    assert loaded.data["next"] == {"action": "pick", "stage": 1, "name": "drafts", "keep": 2}
    status = funnel.status_record(loaded)
    assert status["status"] == "awaiting_pick" and status["choices"] == [1, 2, 3, 4]
    assert status["command"] == f"imagegen funnel resume {tmp_path / 'f'} --pick 1,2"
    assert funnel.select(loaded, 1, funnel.Options(), Reporter()) is None, "no pick, no --auto, no terminal: stop"
    assert funnel.select(loaded, 1, funnel.Options(picks=("4,2",)), Reporter()) == ([4, 2], "pick")
    loaded.record(1)["picks"] = [4, 2]
    loaded.plan_images(2)
    assert [(i["index"], i["source"], i["seed"]) for i in loaded.record(2)["images"]] == [
        (1, 4, 1100), (2, 4, 1101), (3, 2, 1102), (4, 2, 1103)]
    (loaded.root / loaded.record(1)["images"][0]["path"]).unlink()  # a finished image that went missing is redone
    assert loaded.next_step()["action"] == "render" and loaded.next_step()["stage"] == 1
    assert "not a funnel directory" in pytest.raises(ImagegenError, funnel.Funnel.load, tmp_path).value.message


def test_a_stage_with_no_more_images_than_it_keeps_passes_them_all_on(tmp_path, isolated_home, fake_models):
    stages = [Stage("drafts", str(fake_models[0]), count=2, keep=3), Stage("up", str(fake_models[1]))]
    state = funnel.Funnel.create(tmp_path / "f", "a fox", None, 5, stages)
    state.plan_images(1)
    _finish(state, 1)
    assert funnel.select(state, 1, funnel.Options(picks=("1",)), Reporter()) == ([1, 2], "all")


def test_without_picks_the_funnel_stops_and_one_command_at_a_time_works_on_it(tmp_path, isolated_home, fake_models):
    from filelock import FileLock

    stages = [Stage("drafts", str(fake_models[0]), count=3, keep=1), Stage("up", str(fake_models[1]))]
    state = funnel.Funnel.create(tmp_path / "f", "a fox", None, 5, stages)
    state.plan_images(1)
    _finish(state, 1)
    status = funnel.advance(state, None, Reporter(), print, funnel.Options())
    assert status["status"] == "awaiting_pick" and status["keep"] == 1
    assert status["sheet"].endswith("stage-1-drafts/sheet.png")
    with FileLock(str(state.root / ".funnel.lock")):
        with pytest.raises(ImagegenError) as caught:
            funnel.advance(state, None, Reporter(), print, funnel.Options())
        assert caught.value.code == "output_busy" and "another imagegen command is writing in" in caught.value.message
        assert "funnel show" in caught.value.hint
        with pytest.raises(ImagegenError) as caught:
            funnel.Funnel.create(tmp_path / "f", "a fox", None, 5, [Stage("drafts", str(fake_models[0]))])
        assert caught.value.code == "output_busy", "a funnel is created under the same lock"


# --- whole funnels through the real CLI ---------------------------------------------------
@pytest.fixture(scope="module")
def env(comfyui_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("funnel-home")
    values = {"IMAGEGEN_HOME": str(home), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir), "IMAGEGEN_RUNTIME": "local"}
    yield values
    run_cli("stop", "--all", env=values)


def _json_lines(stream: bytes) -> list[dict]:
    return [json.loads(line) for line in stream.decode().splitlines()]


def _state(directory: Path) -> dict:
    return json.loads((directory / "funnel.json").read_text())


@pytest.mark.comfyui
def test_a_whole_funnel_drafts_pick_refine_pick_polish_upscale(env, tiny_sd15, tiny_esrgan, tmp_path):
    from jsonschema import Draft202012Validator

    from imagegen.engine.schema import RESULT

    stage_file = tmp_path / "stages.yaml"
    stage_file.write_text(f"stages:\n"
                          f"  - {{name: drafts, model: {tiny_sd15}, count: 4, keep: 2, size: 64x64, steps: 2}}\n"
                          f"  - {{name: refine, model: {tiny_sd15}, keep: 1, size: 128x128, steps: 4, denoise: 0.55}}\n"
                          f"  - {{name: polish, model: {tiny_sd15}, keep: 1, size: 128x128, steps: 6, denoise: 0.3}}\n"
                          f"  - {{name: upscale, model: {tiny_esrgan}, scale: 2}}\n")
    out = tmp_path / "fox"
    first = run_cli("funnel", "a red fox", "-o", str(out), "--stages", str(stage_file), "--workers", "2", "--json",
                    env=env)
    assert first.returncode == 0, first.stderr.decode()
    *images, status = _json_lines(first.stdout)
    assert len(images) == 4 and {r["funnel"]["stage"] for r in images} == {1}
    for record in images:
        assert not list(Draft202012Validator(RESULT).iter_errors(record))
    assert status["schema"] == "imagegen.funnel_status/1"
    assert status["status"] == "awaiting_pick" and status["stage"] == 1
    assert status["command"] == f"imagegen funnel resume {out} --pick 1,2" and status["choices"] == [1, 2, 3, 4]
    with Image.open(status["sheet"]) as sheet:
        assert sheet.size == contact_sheet.sheet_size(4)
    assert f"imagegen funnel resume {out} --pick" in first.stderr.decode()
    shown = run_cli("funnel", "show", str(out), "--json", env=env)
    assert json.loads(shown.stdout)["next"] == {"action": "pick", "stage": 1, "name": "drafts", "keep": 2}

    second = run_cli("funnel", "resume", str(out), "--pick", "2,4", "--workers", "2", "--json", env=env)
    assert second.returncode == 0, second.stderr.decode()
    *refined, status = _json_lines(second.stdout)
    ordered = sorted(refined, key=lambda r: r["funnel"]["index"])
    assert [(r["funnel"]["stage_name"], r["funnel"]["source"]) for r in ordered] == [("refine", 2), ("refine", 4)]
    assert all((r["width"], r["height"], r["denoise"]) == (128, 128, 0.55) for r in refined)
    assert status["status"] == "awaiting_pick" and status["stage"] == 2

    # human mode: paths on stdout
    third = run_cli("funnel", "resume", str(out), "--pick", "2", "--workers", "2", env=env)
    assert third.returncode == 0, third.stderr.decode()
    paths = third.stdout.decode().split()
    assert len(paths) == 2 and "/stage-3-polish/" in paths[0] and "/stage-4-upscale/" in paths[1]
    assert "funnel done" in third.stderr.decode()
    final = Path(paths[1]).read_bytes()
    assert png.png_size(final) == (256, 256)
    assert json.loads(png.read_text_chunks(final)["imagegen"])["family"] == "upscale"
    state = _state(out)
    assert [(s["picks"], s["picked_by"]) for s in state["stages"]] == [
        ([2, 4], "pick"), ([2], "pick"), ([1], "all"), (None, None)]
    assert state["next"] == {"action": "done"}
    for stage in state["stages"]:
        with Image.open(out / stage["sheet"]) as sheet:
            assert sheet.size == contact_sheet.sheet_size(len(stage["images"]))
    shown = run_cli("funnel", "show", str(out), env=env)
    assert shown.returncode == 0 and "the funnel is done" in shown.stdout.decode() and paths[1] in shown.stdout.decode()


@pytest.mark.comfyui
def test_an_interrupted_stage_resumes_without_redoing_finished_images(env, tiny_sd15, tiny_esrgan, tmp_path):
    out = tmp_path / "owl"
    args = ["funnel", "run", "an owl", "-o", str(out), "--checkpoint", str(tiny_sd15), "--refine-model", "none",
            "--polish-model", "none", "--upscale-model", str(tiny_esrgan), "--drafts", "6", "--keep", "1",
            "--size", "64x64", "--steps", "40", "--workers", "2"]
    process = subprocess.Popen([sys.executable, str(REPO / "generate_image.py"), *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})
    deadline = time.monotonic() + 120

    def done_images() -> list[dict]:
        try:
            images = _state(out)["stages"][0]["images"]
        except (FileNotFoundError, json.JSONDecodeError, IndexError):
            return []
        return [image for image in images if image["status"] == "done"]

    while time.monotonic() < deadline and not done_images():
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = communicate(process, 60)
    assert process.returncode == 130, stderr.decode()
    finished = done_images()
    assert 1 <= len(finished) < 6, "interrupted mid-stage"
    assert len(stdout.decode().split()) == len(finished)
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]
    before = {image["path"]: (out / image["path"]).stat().st_mtime_ns for image in finished}
    assert _state(out)["next"]["action"] == "render"

    resumed = run_cli("funnel", "resume", str(out), "--pick", "3", "--workers", "2", "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr.decode()
    *records, status = _json_lines(resumed.stdout)
    drafts = [r for r in records if r["funnel"]["stage"] == 1]
    assert len(drafts) == 6 - len(finished), "only the unfinished drafts are rendered again"
    assert {str(Path(r["path"]).relative_to(out)) for r in drafts}.isdisjoint(before)
    assert {path: (out / path).stat().st_mtime_ns for path in before} == before
    assert f"{len(finished)} done earlier" in resumed.stderr.decode()
    assert status["status"] == "done" and len(status["final"]) == 1
    assert png.png_size(Path(status["final"][0]).read_bytes()) == (128, 128)
    assert _state(out)["stages"][0]["picks"] == [3]


@pytest.mark.comfyui
def test_a_lora_applies_on_the_stages_of_its_family_and_the_others_say_they_go_without(env, tiny_sd15, tiny_esrgan,
                                                                                        tiny_lora, tmp_path):  # noqa: F811
    out = tmp_path / "lit"
    result = run_cli("funnel", "a lighthouse", "-o", str(out), "--checkpoint", str(tiny_sd15), "--lora",
                     f"{tiny_lora}:0.8", "--refine-model", "none", "--polish-model", "none", "--upscale-model",
                     str(tiny_esrgan), "--drafts", "2", "--keep", "1", "--size", "64x64", "--steps", "1", "--auto",
                     "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    *images, status = _json_lines(result.stdout)
    assert status["status"] == "done"
    drafts = [r for r in images if r["funnel"]["stage"] == 1]
    assert len(drafts) == 2 and all(r["loras"][0]["name"] == tiny_lora.name and r["loras"][0]["strength"] == 0.8
                                    and len(r["loras"][0]["sha256"]) == 64 for r in drafts)
    upscaled = [r for r in images if r["funnel"]["stage"] == 2]
    assert len(upscaled) == 1 and "loras" not in upscaled[0]
    chunks = png.read_text_chunks((out / _state(out)["stages"][0]["images"][0]["path"]).read_bytes())
    assert f"<lora:{tiny_lora.stem}:0.8>" in chunks["parameters"]
    assert f"stage 2 upscale (upscale): renders without LoRA {tiny_lora.name} (sd15)" in result.stderr.decode()
    shown = json.loads(run_cli("funnel", "show", str(out), "--json", env=env).stdout)
    assert shown["stages"][0]["loras"] == [{"name": str(tiny_lora), "strength": 0.8}]
    assert shown["stages"][1]["without_loras"] == [{"name": str(tiny_lora), "family": "sd15"}]


@pytest.mark.comfyui
def test_on_a_terminal_it_asks_and_shows_the_sheet(env, tiny_sd15, tmp_path):
    import pty
    import select

    out = tmp_path / "cat"
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, str(REPO / "generate_image.py"), "funnel", "a cat", "-o", str(out),
                                "--checkpoint", str(tiny_sd15), "--polish-model", "none", "--upscale-model", "none",
                                "--drafts", "3", "--keep", "1", "--size", "64x64", "--steps", "2", "--workers", "2",
                                "--no-progress"],
                               stdin=slave, stdout=subprocess.PIPE, stderr=slave, env={**os.environ, **env})
    os.close(slave)
    seen, answers = b"", [b"7\n", b"2\n"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if select.select([master], [], [], 0.2)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
        if answers and seen.count(b"q = stop here") > 2 - len(answers):
            os.write(master, answers.pop(0))
    stdout, _ = communicate(process, 60)
    os.close(master)
    text = seen.decode(errors="replace")
    assert process.returncode == 0, text
    assert f"contact sheet: {out}/stage-1-drafts/sheet.png" in text and "pick 1 of 3" in text
    assert "7 not on the sheet" in text and "kept image 2 (interactive)" in text
    state = _state(out)
    assert state["stages"][0]["picks"] == [2] and state["stages"][1]["images"][0]["source"] == 2
    assert len(stdout.decode().split()) == 4 and state["next"] == {"action": "done"}
