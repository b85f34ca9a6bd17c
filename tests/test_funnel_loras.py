"""A funnel's LoRAs: each applies on the stages of its family and the others render without it (a note each),
the per-stage stack survives funnel.json round trips, variations stages and `funnel show`, a LoRA that no stage can
apply is refused up front, and a stage's jobs carry their LoRA files. Header-only files; nothing starts."""

import json

import pytest
from safetensors_util import write_safetensors
from test_addon_names import SD15_LORA
from test_addons import SDXL_LORA

from imagegen.engine.progress import Reporter
from imagegen.funnel import loras, vary
from imagegen.funnel import pipeline as funnel
from imagegen.funnel.stages import Stage
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError

SD15_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
FLUX_LORA = {"double_blocks.0.img_attn.qkv.lora_A.weight": ("F16", [4, 3072]),
             "double_blocks.0.img_attn.qkv.lora_B.weight": ("F16", [9216, 4])}


@pytest.fixture
def files(tmp_path):
    return {"checkpoint": write_safetensors(tmp_path / "ckpt.safetensors", {SD15_KEY: ("F16", [320, 768])}),
            "sd15": write_safetensors(tmp_path / "soft.safetensors", SD15_LORA),
            "sdxl": write_safetensors(tmp_path / "crisp-xl.safetensors", SDXL_LORA),
            "flux": write_safetensors(tmp_path / "flux-style.safetensors", FLUX_LORA)}


def _stages(files):
    return [Stage("drafts", str(files["checkpoint"]), count=2, keep=1, size="64x64", steps=1),
            Stage("refine", "sdxl", keep=1, size="64x64", steps=1, denoise=0.5),
            Stage("upscale", "realesrgan-x4", scale=2)]


def test_each_lora_goes_to_the_stages_of_its_family(files):
    registry = Registry.load()
    text, per_stage = loras.plan(f"a fox, <lora:{files['sdxl']}:0.5>", [f"{files['sd15']}:0.8"], _stages(files),
                                 registry)
    assert text == "a fox"
    assert per_stage[0] == {"loras": [{"name": str(files["sd15"]), "strength": 0.8}],
                            "without_loras": [{"name": str(files["sdxl"]), "family": "sdxl"}]}
    assert per_stage[1] == {"loras": [{"name": str(files["sdxl"]), "strength": 0.5}],
                            "without_loras": [{"name": str(files["sd15"]), "family": "sd15"}]}
    assert per_stage[2]["loras"] == [] and len(per_stage[2]["without_loras"]) == 2  # an upscaler takes none
    assert loras.notes({"name": "refine", **per_stage[1]}, 2, "sdxl") == [
        "stage 2 refine (sdxl): renders without LoRA soft.safetensors (sd15)"]
    assert loras.notes({"name": "drafts", "loras": []}, 1, "sd15") == []
    assert loras.plan("a fox", None, _stages(files), registry) == ("a fox", [])


def test_a_lora_that_no_stage_can_apply_is_refused_up_front(files):
    with pytest.raises(ImagegenError) as caught:
        loras.plan("a fox", [str(files["flux"])], _stages(files), Registry.load())
    error = caught.value
    assert error.code == "lora_mismatch" and "Flux" in error.message
    assert "(drafts: SD1.5, refine: SDXL, upscale: upscaler)" in error.message
    assert error.details["stage_families"] == ["sd15", "sdxl", "upscale"]
    with pytest.raises(ImagegenError) as caught:
        loras.plan("a fox <lora:nowhere-to-be-found>", None, _stages(files), Registry.load())
    assert caught.value.code == "unknown_addon"


def test_the_stack_survives_the_state_file_variations_and_show(tmp_path, files):
    registry = Registry.load()
    stages = _stages(files)
    text, per_stage = loras.plan("a fox", [f"{files['sd15']}:0.8", f"{files['sdxl']}:0.5"], stages, registry)
    state = funnel.Funnel.create(tmp_path / "f", text, None, 7, stages, per_stage)
    loaded = funnel.Funnel.load(tmp_path / "f")
    assert [record["loras"] for record in loaded.data["stages"]] == [entry["loras"] for entry in per_stage]
    assert "  loras: soft.safetensors:0.8 (without crisp-xl.safetensors)" in funnel.summary_lines(loaded)
    state.plan_images(1)
    for image in state.record(1)["images"]:
        (state.root / image["path"]).parent.mkdir(parents=True, exist_ok=True)
        (state.root / image["path"]).write_bytes(b"")
        image.update(status="done", width=64, height=64)
    state.record(1)["picks"] = [1]
    added = vary.insert(state, 1, 2)
    assert state.record(added)["loras"] == per_stage[0]["loras"]  # variations redraw with the pick's stack

    jobs = funnel.stage_jobs(state, 1, registry)
    assert jobs == []  # all done; stage 2 (variations) draws with the sd15 LoRA
    state.record(added)["images"] = vary.plan(state, added)
    jobs = funnel.stage_jobs(state, added, registry)
    assert len(jobs) == 2 and all([(lora.name, lora.strength) for lora in job.params.loras] ==
                                  [("soft.safetensors", 0.8)] for job in jobs)
    assert all([bundle.source for bundle in job.addons] == [str(files["sd15"].absolute())] for job in jobs)

    data = json.loads((tmp_path / "f" / "funnel.json").read_text())
    data["stages"][0]["loras"] = [{"name": "x", "strength": "strong"}]
    (tmp_path / "f" / "funnel.json").write_text(json.dumps(data))
    with pytest.raises(ImagegenError) as caught:
        funnel.Funnel.load(tmp_path / "f")
    assert caught.value.code == "invalid_funnel_state" and "strength" in caught.value.message


def test_render_notes_each_stage_without_a_lora(tmp_path, files):
    class Notes(Reporter):
        def __init__(self):
            super().__init__()
            self.warnings: list[str] = []

        def warn(self, message):
            self.warnings.append(message)

    stages = _stages(files)
    _, per_stage = loras.plan("a fox", [str(files["sdxl"])], stages, Registry.load())
    state = funnel.Funnel.create(tmp_path / "f", "a fox", None, 7, stages, per_stage)
    state.plan_images(1)
    for image in state.record(1)["images"]:  # nothing left to render: only the note and the sheet
        (state.root / image["path"]).parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.new("RGB", (64, 64)).save(state.root / image["path"])
        image.update(status="done", width=64, height=64)
    notes = Notes()
    funnel.render_stage(state, 1, None, notes, print, funnel.Options(), set())
    assert notes.warnings == ["stage 1 drafts (sd15): renders without LoRA crisp-xl.safetensors (sdxl)"]
