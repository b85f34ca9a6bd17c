"""LoRAs and ControlNets by a file's bare name, as A1111 and ComfyUI users name them: found in the model cache and
in ComfyUI- and A1111-layout shared trees (real files in tmp folders), kept under the user's name in the record,
refused when ambiguous or made for another family, and an unknown name answered with the folders searched and the
names close to it. The real CLI for what a user sees (nothing starts a worker)."""

import json
import os

import pytest
from conftest import run_cli
from safetensors_util import write_safetensors
from test_addons import SD15_CHECKPOINT, SDXL_LORA

from imagegen.engine import addon_names, addons
from imagegen.models.registry import Registry
from imagegen.util import paths
from imagegen.util.errors import ImagegenError

SD15_LORA = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": ("F16", [4, 768]),
             "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": ("F16", [320, 4])}
SD15_CONTROLNET = {"control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ("F16", [320, 768]),
                   "control_model.input_hint_block.0.weight": ("F16", [16, 3, 3, 3])}


def _file(path, tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(path, tensors)


@pytest.fixture
def trees(tmp_path, monkeypatch):
    """The cache's loras/ folder, a ComfyUI tree and an A1111 tree, named in IMAGEGEN_SHARED_MODELS."""
    comfy, a1111 = tmp_path / "ComfyUI" / "models", tmp_path / "webui" / "models"
    (a1111 / "Stable-diffusion").mkdir(parents=True)
    found = {"watercolor": _file(paths.models_dir() / "loras" / "watercolor.safetensors", SD15_LORA),
             "ink": _file(comfy / "loras" / "styles" / "ink.safetensors", SD15_LORA),
             "pixel-xl": _file(a1111 / "Lora" / "pixel-xl.safetensors", SDXL_LORA),
             "canny": _file(a1111 / "ControlNet" / "canny.safetensors", SD15_CONTROLNET),
             "checkpoint": _file(tmp_path / "sd15.safetensors", SD15_CHECKPOINT), "comfy": comfy, "a1111": a1111}
    monkeypatch.setenv("IMAGEGEN_SHARED_MODELS", os.pathsep.join([str(comfy), str(a1111)]))
    return found


def test_a_bare_name_means_the_file_in_a_model_folder_and_keeps_its_name(trees, tmp_path, monkeypatch):
    registry, model = Registry.load(), Registry.load().get("sd15")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "watercolor").mkdir()  # a folder of that name here is no LoRA file: the name is looked up
    for name, file in (("watercolor", trees["watercolor"]), ("styles/ink", trees["ink"]), ("ink", trees["ink"])):
        bundle = addon_names.resolve(name, "lora", registry)
        assert (bundle.name, bundle.files["lora"].local_path) == (name, str(file))
        assert bundle.files["lora"].filename.startswith("imagegen-local/")  # linked, never copied
    chosen = addons.choose("a fox <lora:watercolor:0.7>, <lora:styles/ink>", None, None, None, model)
    assert [(lora.name, lora.strength) for lora in chosen.loras] == [("watercolor", 0.7), ("styles/ink", 1.0)]
    assert addons.local_files(chosen.bundles) >= {str(trees["watercolor"]), str(trees["ink"])}  # mounted for Docker
    assert addon_names.resolve("canny", "controlnet", registry).files["controlnet"].local_path == str(trees["canny"])


def test_a_name_of_two_files_is_refused_naming_both(trees):
    other = _file(trees["a1111"] / "Lora" / "old" / "ink.safetensors", SD15_LORA)
    with pytest.raises(ImagegenError) as caught:
        addon_names.resolve("ink", "lora", Registry.load())
    error = caught.value
    assert error.code == "ambiguous_addon"
    assert str(trees["ink"]) in error.message and str(other) in error.message
    assert "old/ink" in error.hint and "styles/ink" in error.hint and "--lora" in error.hint
    assert addon_names.resolve("old/ink", "lora", Registry.load()).files["lora"].local_path == str(other)


def test_an_unknown_name_lists_the_folders_and_close_names(trees, isolated_home):
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.yaml").write_text("models:\n  watercolour-reg:\n    family: lora\n    base: sd15\n"
                                               f"    files:\n      lora:\n        local: {trees['watercolor']}\n")
    result = run_cli("generate", "a fox <lora:watercolr:0.8>", "--checkpoint", str(trees["checkpoint"]), "--json")
    assert result.returncode == 2
    error = json.loads(result.stderr.decode().splitlines()[-1])
    assert error["code"] == "unknown_addon"
    assert "did you mean watercolor, watercolour-reg" in error["message"]
    for folder in (paths.models_dir() / "loras", trees["comfy"] / "loras", trees["a1111"] / "Lora"):
        assert str(folder) in error["message"] and str(folder) in error["details"]["searched"]
    assert "IMAGEGEN_SHARED_MODELS" in error["hint"]
    near = run_cli("generate", "a fox", "--checkpoint", str(trees["checkpoint"]), "--lora", "styles/inc", "--json")
    assert "did you mean styles/ink" in json.loads(near.stderr.decode().splitlines()[-1])["message"]


def test_a_name_found_for_another_family_is_refused_through_the_cli(trees):
    result = run_cli("generate", "a fox <lora:pixel-xl:0.8>", "--checkpoint", str(trees["checkpoint"]), "--json")
    assert result.returncode == 2
    error = json.loads(result.stderr.decode().splitlines()[-1])
    assert error["code"] == "lora_mismatch" and error["details"]["addon"] == "pixel-xl"
    assert (error["details"]["addon_family"], error["details"]["model_family"]) == ("sdxl", "sd15")


def test_batch_and_mcp_leave_a_folder_name_alone_and_from_finds_it_again(trees, tmp_path):
    registry = Registry.load()
    assert addons.anchored(["styles/ink:0.5"], None, tmp_path, registry)[0] == ["styles/ink:0.5"]
    assert addons.anchored(["styles/ink:0.5"], None, None, registry)[0] == ["styles/ink:0.5"]  # MCP: no path
    found = {"loras": [{"name": "styles/ink", "file": "imagegen-local/00-ink.safetensors", "sha256": None,
                        "strength": 0.5}]}
    assert addons.from_record(found, {}, tmp_path / "out.png") == {"loras": [{"name": "styles/ink", "strength": 0.5}]}
    trees["ink"].unlink()
    with pytest.raises(ImagegenError) as caught:
        addons.from_record(found, {}, tmp_path / "out.png")
    assert caught.value.code == "unknown_addon" and "styles/ink" in caught.value.message
