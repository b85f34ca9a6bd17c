"""LoRA stacks and ControlNets: parsing, family checks through the real CLI, graphs held to the real ComfyUI's
node definitions, and tiny real LoRA/ControlNet files rendered by a real ComfyUI on CPU."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import FIXTURES, REPO, run_cli
from jsonschema import Draft202012Validator
from safetensors_util import write_safetensors
from test_workflows import validate

from imagegen.comfy import addons as graph_addons
from imagegen.comfy import png, workflows
from imagegen.engine import addons
from imagegen.engine.schema import RESULT
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError

# --- parsing -------------------------------------------------------------------------------------


def test_prompt_tags_are_taken_out_of_the_prompt():
    text, tags = addons.split_prompt("a fox, <lora:style:0.8>, at night <lora:Detail Tweaker> <LORA:x:0.5:0.7>")
    assert text == "a fox, at night"
    assert tags == [("style", 0.8), ("Detail Tweaker", 1.0), ("x", 0.5)]
    assert addons.split_prompt("no tags here") == ("no tags here", [])
    with pytest.raises(ImagegenError, match="not a number"):
        addons.split_prompt("<lora:style:strong>")


def test_lora_strength_is_parsed_from_the_right():
    assert addons.parse_lora("style") == ("style", 1.0)
    assert addons.parse_lora("style:0.6") == ("style", 0.6)
    assert addons.parse_lora("/data/a:b/my.safetensors:-0.5") == ("/data/a:b/my.safetensors", -0.5)
    assert addons.parse_lora("/data/a:b/my.safetensors") == ("/data/a:b/my.safetensors", 1.0)
    assert addons.parse_lora({"name": "style", "strength": 0.3}) == ("style", 0.3)
    with pytest.raises(ImagegenError):
        addons.parse_lora({"name": "style", "weight": 1})


def test_control_specs(tmp_path):
    registry = Registry.load()
    spec = addons.parse_control("canny-sd15:shots/a:b.png:0.8:0.1:0.9", registry)
    assert (spec.model, spec.image, spec.strength, spec.start, spec.end) == ("canny-sd15", "shots/a:b.png", 0.8,
                                                                            0.1, 0.9)
    spec = addons.parse_control("canny-sd15:edges.png:0.5", registry, "canny")
    assert (spec.image, spec.strength, spec.start, spec.end, spec.preprocess) == ("edges.png", 0.5, 0.0, 1.0, "canny")
    (tmp_path / "dir:x").mkdir()
    model = write_safetensors(tmp_path / "dir:x" / "cn.safetensors", {})
    spec = addons.parse_control(f"{model}:edges.png", registry)
    assert (spec.model, spec.image) == (str(model), "edges.png")
    with pytest.raises(ImagegenError, match="STRENGTH:START:END"):
        addons.parse_control("canny-sd15:edges.png:0.5:0.2", registry)
    with pytest.raises(ImagegenError, match="MODEL:IMAGE"):
        addons.parse_control("canny-sd15", registry)


# --- crafted headers through the real CLI (nothing starts) -----------------------------------------

SD15_CHECKPOINT = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ("F16", [320, 768])}
SDXL_LORA = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": ("F16", [4, 2048]),
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": ("F16", [640, 4]),
             "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": ("F16", [4, 1280])}
SDXL_CONTROLNET = {"controlnet_cond_embedding.conv_in.weight": ("F16", [16, 3, 3, 3]),
                   "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": ("F16", [640, 2048])}


@pytest.fixture
def crafted(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(tmp_path / "edges.png")
    return {"checkpoint": write_safetensors(tmp_path / "sd15.safetensors", SD15_CHECKPOINT),
            "lora": write_safetensors(tmp_path / "sdxl-style.safetensors", SDXL_LORA),
            "controlnet": write_safetensors(tmp_path / "sdxl-canny.safetensors", SDXL_CONTROLNET),
            "image": tmp_path / "edges.png"}


def _error(result) -> dict:
    return json.loads(result.stderr.decode().strip().splitlines()[-1])


def test_a_lora_of_another_family_is_refused_before_anything_loads(crafted):
    for how in (["--lora", f"{crafted['lora']}:0.7"], []):
        prompt = "a fox" if how else f"a fox <lora:{crafted['lora']}:0.7>"
        result = run_cli("generate", prompt, "--checkpoint", str(crafted["checkpoint"]), *how, "--json",
                         env={"IMAGEGEN_RUNTIME": "local"})
        assert result.returncode == 2, result.stderr
        error = _error(result)
        assert error["code"] == "lora_mismatch"
        assert "SDXL" in error["message"] and "SD1.5" in error["message"]
        assert (error["details"]["addon_family"], error["details"]["model_family"]) == ("sdxl", "sd15")
    assert not list((crafted["checkpoint"].parent / "imagegen-home").glob("state/workers/*"))


def test_a_controlnet_of_another_family_is_refused(crafted):
    result = run_cli("generate", "a fox", "--checkpoint", str(crafted["checkpoint"]), "--control",
                     f"{crafted['controlnet']}:{crafted['image']}:0.8", "--json")
    assert result.returncode == 2, result.stderr
    error = _error(result)
    assert error["code"] == "controlnet_mismatch"
    assert "SDXL" in error["message"] and "SD1.5" in error["message"]
    builtin = run_cli("generate", "a fox", "--checkpoint", str(crafted["checkpoint"]), "--control",
                      f"canny-sdxl:{crafted['image']}", "--json")  # a registry entry: its `base` decides
    assert builtin.returncode == 2 and _error(builtin)["code"] == "controlnet_mismatch"


def test_registered_lora_entries_and_unknown_names(crafted, isolated_home):
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.yaml").write_text(
        "models:\n  xl-style:\n    family: lora\n    base: sdxl\n    files:\n      lora:\n"
        f"        local: {crafted['lora']}\n")
    result = run_cli("generate", "a fox <lora:xl-style:0.5>", "--checkpoint", str(crafted["checkpoint"]), "--json")
    assert result.returncode == 2 and _error(result)["code"] == "lora_mismatch"
    unknown = run_cli("generate", "a fox", "--checkpoint", str(crafted["checkpoint"]), "--lora", "xl-styel", "--json")
    assert unknown.returncode == 2
    assert _error(unknown)["code"] == "unknown_addon" and "xl-style" in _error(unknown)["message"]
    (isolated_home / "models.yaml").write_text(
        "models:\n  no-base:\n    family: lora\n    files:\n      lora:\n"
        f"        local: {crafted['lora']}\n")
    broken = run_cli("models", "list", "--json")
    assert broken.returncode == 2 and "base" in _error(broken)["message"]


def test_a_lora_or_controlnet_entry_is_no_drawing_model(crafted):
    result = run_cli("generate", "a fox", "-m", "canny-sd15", "--json")
    assert result.returncode == 2 and "--control canny-sd15:IMAGE" in _error(result)["hint"]


# --- records -----------------------------------------------------------------------------------------


def test_the_record_and_a1111_text_carry_the_stack():
    params = workflows.Params("a fox", 64, 64, 1, 7.0, "euler", "normal", 3,
                              loras=[workflows.LoraUse("imagegen-local/ab-style.safetensors", 0.8, "style.safetensors",
                                                       sha256="a" * 64)],
                              controls=[workflows.ControlUse("c.safetensors", "/x/edges.png", 0.5, 0.0, 0.8, "canny",
                                                             "canny-sd15", "b" * 64, "c" * 64)])
    found = addons.records(params)
    assert found["loras"] == [{"name": "style.safetensors", "file": "imagegen-local/ab-style.safetensors",
                               "sha256": "a" * 64, "strength": 0.8}]
    assert found["controls"][0] | {"image_path": None} == {
        "model": "canny-sd15", "file": "c.safetensors", "sha256": "b" * 64, "image": "edges.png", "image_path": None,
        "image_sha256": "c" * 64, "strength": 0.5, "start": 0.0, "end": 0.8, "preprocess": "canny"}
    record = {"prompt": "a fox", "negative": "", "steps": 1, "sampler": "euler", "scheduler": "normal", "cfg": 7.0,
              "seed": 3, "width": 64, "height": 64, "model": "sd15", "imagegen_version": "0", **found}
    assert png.a1111_parameters(record).splitlines()[0] == "a fox <lora:style:0.8>"


def test_from_names_a_lora_that_is_not_here(tmp_path):
    found = {"loras": [{"name": "gone.safetensors", "file": "imagegen-local/12-gone.safetensors",
                        "sha256": "d" * 64, "strength": 1.0}]}
    with pytest.raises(ImagegenError) as caught:
        addons.from_record(found, {}, tmp_path / "out.png")
    assert caught.value.code == "unknown_addon"
    assert "gone.safetensors" in caught.value.message and "d" * 64 in caught.value.message
    assert addons.from_record(found, {"loras": ["mine"]}, tmp_path / "out.png") == {}


def test_from_finds_a_moved_control_image_and_refuses_a_changed_one(tmp_path):
    from PIL import Image

    from imagegen.engine import inputs

    Image.new("RGB", (16, 16), "white").save(tmp_path / "edges.png")
    sha = inputs.load(tmp_path / "edges.png", "control").sha256
    made = tmp_path / "out" / "made.png"
    made.parent.mkdir()
    found = {"controls": [{"model": "canny-sd15", "file": "x", "sha256": None, "image": "edges.png",
                           "image_path": str(tmp_path / "edges.png"), "image_sha256": sha, "strength": 0.7,
                           "start": 0.0, "end": 1.0, "preprocess": None}]}
    (tmp_path / "edges.png").rename(made.parent / "edges.png")  # moved next to the image it made
    merged = addons.from_record(found, {}, made)
    assert merged["controls"][0]["image"] == str(made.parent / "edges.png")
    Image.new("RGB", (16, 16), "black").save(made.parent / "edges.png")  # the same name, other pixels
    with pytest.raises(ImagegenError) as caught:
        addons.from_record(found, {}, made)
    assert caught.value.code == "input_missing" and sha in caught.value.message
    assert "--control MODEL:PATH" in caught.value.hint


def test_a_lora_file_with_a_strength_that_is_no_number_says_so(tmp_path):
    lora = write_safetensors(tmp_path / "style.safetensors", {})
    with pytest.raises(ImagegenError) as caught:
        addons.resolve(f"{lora}:strong", "lora", Registry.load())
    assert caught.value.code == "invalid_argument" and "'strong' is not a number" in caught.value.message


def test_relative_lora_and_control_files_anchor_to_a_folder_or_are_refused(tmp_path):
    registry = Registry.load()
    loras, controls = addons.anchored(["style.safetensors:0.5", "registered-name:0.3", "sub/x.safetensors"],
                                      ["canny-sd15:edges.png:0.8", {"model": "cn.safetensors", "image": "/abs/e.png",
                                                                    "preprocess": "canny"}], tmp_path, registry)
    assert loras == [{"name": str(tmp_path / "style.safetensors"), "strength": 0.5}, "registered-name:0.3",
                     {"name": str(tmp_path / "sub/x.safetensors"), "strength": 1.0}]
    assert controls[0] == {"model": "canny-sd15", "image": str(tmp_path / "edges.png"), "strength": 0.8,
                           "start": 0.0, "end": 1.0}
    assert (controls[1]["model"], controls[1]["image"], controls[1]["preprocess"]) == (
        str(tmp_path / "cn.safetensors"), "/abs/e.png", "canny")
    for loras, controls in ((["style.safetensors"], None), (None, ["canny-sd15:edges.png"])):
        with pytest.raises(ImagegenError, match="not an absolute path"):
            addons.anchored(loras, controls, None, registry)
    assert addons.anchored(["style:0.4"], [f"canny-sd15:{tmp_path}/e.png"], None, registry)[0] == ["style:0.4"]


def test_unapplied_keys_are_read_from_log_entries_after_the_marker():
    entries = [{"t": "2026-01-01T10:00:00.1", "m": "lora key not loaded: old\n"},
               {"t": "2026-01-01T10:00:01", "m": "lora key not loaded: a.lora_up.weight\nlora key not loaded: b\n"},
               {"t": "2026-01-01T10:00:02", "m": "Prompt executed in 0.5 seconds\n"}]
    assert graph_addons.log_marker(entries[:1]) == "2026-01-01T10:00:00.1"
    assert graph_addons.unloaded_lora_keys(entries, "2026-01-01T10:00:00.1") == ["a.lora_up.weight", "b"]


# --- graphs ------------------------------------------------------------------------------------------


def _stacked_graphs():
    registry = Registry.load()
    loras = [workflows.LoraUse("a.safetensors", 0.8, "a"), workflows.LoraUse("b.safetensors", -0.5, "b")]
    controls = [workflows.ControlUse("c.safetensors", "imagegen/edges.png", 0.9, 0.0, 0.6, "canny", "c"),
                workflows.ControlUse("d.safetensors", "imagegen/depth.png", 0.4, 0.2, 1.0, None, "d")]
    for name in ("sd15", "sdxl", "flux-schnell"):
        bundle = registry.get(name)
        params = workflows.Params("a lighthouse", 512, 512, 4, 7.0, "euler", "normal", 1, loras=loras,
                                  controls=controls)
        yield f"{name}-stack", workflows.build(bundle, params)
        img2img = workflows.Params("a lighthouse", 512, 512, 4, 7.0, "euler", "normal", 1, loras=loras[:1],
                                   controls=controls[:1], init_image="imagegen/in.png", denoise=0.5)
        yield f"{name}-img2img-stack", workflows.build(bundle, img2img)


def test_lora_and_control_nodes_chain_in_order():
    graph = dict(_stacked_graphs())["sd15-stack"]
    assert graph["lora_0"]["inputs"]["model"] == ["load_checkpoint", 0]
    assert graph["lora_1"]["inputs"]["clip"] == ["lora_0", 1]
    assert graph["sampler"]["inputs"]["model"] == ["lora_1", 0]
    assert graph["positive"]["inputs"]["clip"] == graph["negative"]["inputs"]["clip"] == ["lora_1", 1]
    assert graph["control_0_apply"]["inputs"]["image"] == ["control_0_canny", 0]
    assert graph["control_1_apply"]["inputs"]["positive"] == ["control_0_apply", 0]
    assert graph["sampler"]["inputs"]["positive"] == ["control_1_apply", 0]
    assert graph["sampler"]["inputs"]["negative"] == ["control_1_apply", 1]
    flux = dict(_stacked_graphs())["flux-schnell-stack"]
    assert flux["lora_0"]["class_type"] == "LoraLoaderModelOnly"
    assert flux["guider"]["inputs"]["conditioning"] == ["control_1_apply", 0]


@pytest.mark.comfyui
def test_stacked_graphs_match_the_real_node_definitions(comfy_worker):
    info = comfy_worker.client().object_info()
    for name, graph in _stacked_graphs():
        assert validate(graph, info) == [], name
    limits = info["LoraLoader"]["input"]["required"]["strength_model"][1]
    assert limits["max"] == graph_addons.MAX_LORA_STRENGTH == -limits["min"]
    assert info["ControlNetApplyAdvanced"]["input"]["required"]["strength"][1]["max"] == \
        graph_addons.MAX_CONTROL_STRENGTH


# --- tiny real LoRA and ControlNet on a real ComfyUI ----------------------------------------------------


def _build(kind: str, *args) -> None:
    subprocess.run([sys.executable, str(REPO / "tests" / "tiny_addons.py"), kind, *map(str, args)], check=True,
                   env=dict(os.environ), capture_output=True)


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd15):
    target = FIXTURES / "tiny-sd15-lora.safetensors"
    if not target.is_file():
        _build("lora", tiny_sd15, target)
    return target


@pytest.fixture(scope="module")
def tiny_controlnet(comfyui_dir):
    target = FIXTURES / "tiny-sd15-controlnet.safetensors"
    if not target.is_file():
        _build("controlnet", target)
    return target


@pytest.fixture
def warm(comfy_worker, session_home, comfyui_dir):
    """The CLI's environment for the session's warm worker."""
    return {"IMAGEGEN_HOME": str(session_home), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir), "IMAGEGEN_RUNTIME": "local",
            "IMAGEGEN_KEEP_WARM": "600"}


def _generate(warm, tiny_sd15, target, *extra, prompt="a lighthouse"):
    result = run_cli("generate", prompt, "--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "1",
                     "--seed", "11", "-o", str(target), "--json", *extra, env=warm)
    assert result.returncode == 0, result.stderr.decode()
    record = json.loads(result.stdout.decode().splitlines()[-1])
    Draft202012Validator(RESULT).validate(record)  # `imagegen schema` covers loras, controls and warnings
    return record, result.stderr.decode()


def _pixels(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


@pytest.mark.comfyui
def test_a_tiny_lora_changes_the_pixels_every_key_applies_and_from_reapplies_it(warm, comfy_worker, tiny_sd15,
                                                                                tiny_lora, tmp_path):
    client = comfy_worker.client()
    plain, _ = _generate(warm, tiny_sd15, tmp_path / "plain.png")
    marker = graph_addons.log_marker(client.log_entries() or [])
    styled, stderr = _generate(warm, tiny_sd15, tmp_path / "styled.png", "--lora", f"{tiny_lora}:0.8")
    assert graph_addons.unloaded_lora_keys(client.log_entries() or [], marker) == []
    assert "warnings" not in styled and "not apply" not in stderr
    assert _pixels(tmp_path / "plain.png") != _pixels(tmp_path / "styled.png")
    lora = styled["loras"][0]
    assert (lora["name"], lora["strength"]) == (tiny_lora.name, 0.8) and len(lora["sha256"]) == 64
    assert "loras" not in plain
    chunks = png.read_text_chunks((tmp_path / "styled.png").read_bytes())
    assert f"<lora:{tiny_lora.stem}:0.8>" in chunks["parameters"]
    assert json.loads(chunks["imagegen"])["prompt"] == "a lighthouse"
    again = run_cli("generate", "--from", str(tmp_path / "styled.png"), "--checkpoint", str(tiny_sd15), "-o",
                    str(tmp_path / "again.png"), "--json", env=warm)
    assert again.returncode == 0, again.stderr.decode()
    assert _pixels(tmp_path / "again.png") == _pixels(tmp_path / "styled.png")
    # the same file by its bare name in a ComfyUI tree (IMAGEGEN_SHARED_MODELS), as an A1111 prompt tag names it
    tree = tmp_path / "ComfyUI" / "models"
    (tree / "loras" / "styles").mkdir(parents=True)
    shutil.copy(tiny_lora, tree / "loras" / "styles" / "tiny.safetensors")
    shared = {**warm, "IMAGEGEN_SHARED_MODELS": str(tree)}
    named, _ = _generate(shared, tiny_sd15, tmp_path / "named.png", prompt="a lighthouse, <lora:tiny:0.8>")
    assert _pixels(tmp_path / "named.png") == _pixels(tmp_path / "styled.png")
    assert (named["loras"][0]["name"], named["loras"][0]["sha256"]) == ("tiny", lora["sha256"])
    assert "<lora:tiny:0.8>" in png.read_text_chunks((tmp_path / "named.png").read_bytes())["parameters"]
    renamed = run_cli("generate", "--from", str(tmp_path / "named.png"), "--checkpoint", str(tiny_sd15), "-o",
                      str(tmp_path / "renamed.png"), "--json", env=shared)  # the name is found in the tree again
    assert renamed.returncode == 0, renamed.stderr.decode()
    assert json.loads(renamed.stdout.decode().splitlines()[-1])["loras"][0]["name"] == "tiny"


@pytest.mark.comfyui
def test_a_partly_mapped_lora_is_reported(warm, tiny_sd15, tiny_lora, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_lora))
    state["lora_unet_no_such_block.lora_down.weight"] = state[next(iter(state))].clone()
    save_file(state, str(tmp_path / "partial.safetensors"))
    partial = tmp_path / "partial.safetensors"
    record, stderr = _generate(warm, tiny_sd15, tmp_path / "partial.png", "--lora", str(partial))
    assert "lora_unet_no_such_block.lora_down.weight" in record["warnings"][0]
    assert "lora key not loaded" in stderr


@pytest.mark.comfyui
def test_a_tiny_controlnet_is_detected_and_steers(warm, tiny_sd15, tiny_controlnet, tmp_path):
    from PIL import Image, ImageDraw

    edges = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(edges).rectangle([12, 12, 52, 52], outline="white", width=4)
    edges.save(tmp_path / "shape.png")
    record, _ = _generate(warm, tiny_sd15, tmp_path / "steered.png", "--control",
                          f"{tiny_controlnet}:{tmp_path / 'shape.png'}:1.0:0.0:1.0", "--control-preprocess", "canny")
    control = record["controls"][0]
    assert (control["model"], control["image"], control["preprocess"]) == (tiny_controlnet.name, "shape.png", "canny")
    assert len(control["sha256"]) == 64 and len(control["image_sha256"]) == 64
    _generate(warm, tiny_sd15, tmp_path / "free.png")
    assert _pixels(tmp_path / "steered.png") != _pixels(tmp_path / "free.png"), "the ControlNet changed nothing"


@pytest.mark.comfyui
def test_batch_items_and_mcp_arguments_carry_loras_and_controls(warm, tiny_sd15, tiny_lora, tiny_controlnet, tmp_path):
    from PIL import Image
    from test_mcp import call_server, texts

    Image.new("RGB", (64, 64), "grey").save(tmp_path / "flat.png")
    common = {"checkpoint": str(tiny_sd15), "size": "64x64", "steps": 1}
    items = [{"prompt": "a tower", **common, "seed": 1, "loras": [f"{tiny_lora}:0.6"]},
             {"prompt": "a tower", **common, "seed": 1, "loras": [{"name": str(tiny_lora), "strength": -0.4}],
              "controls": [{"model": str(tiny_controlnet), "image": str(tmp_path / "flat.png"), "strength": 0.7}]}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    result = run_cli("batch", str(tmp_path / "items.jsonl"), "-o", str(tmp_path / "out"), "--json", env=warm)
    assert result.returncode == 0, result.stderr.decode()
    records = sorted((json.loads(line) for line in result.stdout.decode().splitlines()), key=lambda r: r["line"])
    assert [r["loras"][0]["strength"] for r in records] == [0.6, -0.4]
    assert records[1]["controls"][0]["strength"] == 0.7 and "controls" not in records[0]

    async def scenario(session):
        good = await session.call_tool("generate_image", {"prompt": "a tower", **common, "seed": 2,
                                                          "output_dir": str(tmp_path / "mcp"),
                                                          "loras": [f"{tiny_lora}:0.5"]})
        wrong = await session.call_tool("generate_image", {
            "prompt": "a tower", **common, "controls": [f"canny-sdxl:{tmp_path / 'flat.png'}"]})
        return good, wrong

    good, wrong = call_server(warm, tmp_path, scenario)
    assert not good.is_error and texts(good)[0]["loras"][0]["strength"] == 0.5
    assert wrong.is_error and texts(wrong)[0]["code"] == "controlnet_mismatch"


def test_models_add_and_inspect_know_loras_and_controlnets(crafted, isolated_home):
    inspected = json.loads(run_cli("models", "inspect", str(crafted["lora"]), "--json").stdout)
    assert (inspected["kind"], inspected["base"], inspected["layout"]) == ("lora", "sdxl", "kohya")
    assert run_cli("models", "add", "xl-style", "--file", str(crafted["lora"])).returncode == 0
    assert run_cli("models", "add", "xl-canny", "--file", str(crafted["controlnet"])).returncode == 0
    listed = {r["name"]: r for r in map(json.loads, run_cli("models", "list", "--json").stdout.splitlines())}
    assert (listed["xl-style"]["family"], listed["xl-style"]["base"]) == ("lora", "sdxl")
    assert (listed["xl-canny"]["family"], listed["xl-canny"]["base"]) == ("controlnet", "sdxl")
    refused = run_cli("generate", "a fox", "--checkpoint", str(crafted["checkpoint"]), "--lora", "xl-style:0.4",
                      "--json")
    assert refused.returncode == 2 and _error(refused)["code"] == "lora_mismatch"


def test_a_lora_whose_header_tells_no_family_goes_on_with_a_note(crafted, tmp_path):
    model = Registry.load().get("sd15")
    vague = write_safetensors(tmp_path / "vague.safetensors", {
        "lora_unet_mid_block_resnets_0_conv1.lora_down.weight": ("F16", [4, 1280, 3, 3]),
        "lora_unet_mid_block_resnets_0_conv1.lora_up.weight": ("F16", [1280, 4, 1, 1])})
    chosen = addons.choose("a fox", [f"{vague}:0.5", f"{vague}:0.2"], None, None, model)
    assert [lora.strength for lora in chosen.loras] == [0.5, 0.2] and len(chosen.bundles) == 1
    assert len(chosen.notes) == 1 and "cannot tell" in chosen.notes[0]
    with pytest.raises(ImagegenError) as caught:
        addons.choose("a fox", [f"{vague}:500"], None, None, model)
    assert caught.value.code == "invalid_argument"
    with pytest.raises(ImagegenError) as caught:
        addons.choose("a fox", None, [f"canny-sd15:{crafted['image']}:0.5:0.9:0.1"], None, model)
    assert "after" in caught.value.message
