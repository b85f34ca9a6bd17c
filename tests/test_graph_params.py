"""`--set KEY=VALUE` on a graph's leaves: by title, by id, by well-known name; types and ranges from the node
definitions; unknown keys list the keys that exist."""

import json
from pathlib import Path

import pytest

from imagegen.comfy import graph_params, ui_graph, workflows
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError

EDITOR = Path(__file__).parent / "workflows" / "editor-txt2img.json"


def editor_graph() -> dict:
    return ui_graph.to_api(json.loads(EDITOR.read_text())).graph


def own(bundle: str, **extra) -> dict:
    params = workflows.Params(prompt="a fox", negative="blur", width=64, height=96, steps=2, cfg=7.0, sampler="euler",
                              scheduler="normal", seed=3, **extra)
    return workflows.build(Registry.load().get(bundle), params)


def test_well_known_names_on_a_checkpoint_graph():
    names = graph_params.well_known(editor_graph())
    assert names == {"prompt": [("6", "text")], "negative": [("7", "text")], "seed": [("3", "seed")],
                     "steps": [("3", "steps")], "cfg": [("3", "cfg")], "denoise": [("3", "denoise")],
                     "size": [("5", "width"), ("5", "height")], "checkpoint": [("4", "ckpt_name")]}


def test_well_known_names_on_a_flux_graph_walk_guider_noise_and_scheduler():
    names = graph_params.well_known(own("flux-schnell"))
    assert names["prompt"] == [("positive", "text")]  # through FluxGuidance and BasicGuider
    assert names["seed"] == [("noise", "noise_seed")] and names["steps"] == [("schedule", "steps")]
    assert names["denoise"] == [("schedule", "denoise")]
    assert "negative" not in names and "cfg" not in names and "checkpoint" not in names  # Flux has neither


def test_prompt_sets_every_prompt_box_and_a_zeroed_positive_is_no_negative():
    """CLIPTextEncodeSDXL (text_g, text_l) and CLIPTextEncodeFlux (clip_l, t5xxl) keep a prompt in each box;
    ComfyUI's Flux templates feed the sampler's negative a ConditioningZeroOut of the positive encoder."""
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
        "2": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["1", 1], "clip_l": "old", "t5xxl": "old",
                                                              "guidance": 3.5}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "x"}},
    }
    names = graph_params.well_known(graph)
    assert names["prompt"] == [("2", "clip_l"), ("2", "t5xxl")] and "negative" not in names
    applied = graph_params.apply(graph, {"prompt": "a fox"})
    assert applied.graph["2"]["inputs"]["clip_l"] == applied.graph["2"]["inputs"]["t5xxl"] == "a fox"
    graph["2"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "clip": ["1", 1], "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
        "target_height": 1024, "text_g": "old", "text_l": "old"}}
    assert graph_params.well_known(graph)["prompt"] == [("2", "text_g"), ("2", "text_l")]


def test_a_value_shared_through_a_core_primitive_node_is_where_the_well_known_name_sets_it():
    """The editor's Int and String nodes (PrimitiveInt, PrimitiveStringMultiline) feeding converted widgets."""
    ui = json.loads(EDITOR.read_text())
    primitive = next(node for node in ui["nodes"] if node["id"] == 10)
    primitive.update(type="PrimitiveInt", widgets_values=[1234, "fixed"])
    ui["nodes"].append({"id": 40, "type": "PrimitiveStringMultiline", "mode": 0, "inputs": [],
                        "outputs": [{"name": "STRING", "type": "STRING", "links": [40]}], "widgets_values": ["a owl"]})
    positive = next(node for node in ui["nodes"] if node["id"] == 6)
    positive["inputs"].append({"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 40})
    ui["links"].append([40, 40, 0, 6, 1, "STRING"])
    converted = ui_graph.to_api(ui)
    names = graph_params.well_known(converted.graph)
    assert names["seed"] == [("10", "value")] and names["prompt"] == [("40", "value")]
    applied = graph_params.apply(converted.graph, {"seed": 7, "prompt": "a fox"})
    assert applied.graph["10"]["inputs"]["value"] == 7 and applied.graph["40"]["inputs"]["value"] == "a fox"
    saved = {n["id"]: n for n in ui_graph.patched(ui, converted.slots, applied.changes)["nodes"]}
    assert saved[10]["widgets_values"] == [7, "fixed"] and saved[40]["widgets_values"] == ["a fox"]


def test_img2img_graphs_name_their_image():
    names = graph_params.well_known(own("sd15", init_image="in.png", denoise=0.5))
    assert names["image"] == [("load_image", "image")] and "size" not in names


def test_every_addressing_mode_sets_the_same_kind_of_leaf(tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"not read here")
    graph = editor_graph()
    graph["20"] = {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "Load Image"}}
    applied = graph_params.apply(graph, {"prompt": "a red fox", "Negative.text": "ugly", "3.steps": "4",
                                         "cfg": "5.5", "size": "128x64", "seed": "42", "denoise": "0.75",
                                         "image": str(photo), "checkpoint": "other.safetensors",
                                         "ksampler.sampler_name": "dpmpp_2m"})
    inputs = {node_id: node["inputs"] for node_id, node in applied.graph.items()}
    assert inputs["6"]["text"] == "a red fox" and inputs["7"]["text"] == "ugly"
    assert inputs["3"]["steps"] == 4 and inputs["3"]["cfg"] == 5.5 and inputs["3"]["seed"] == 42
    assert inputs["3"]["denoise"] == 0.75 and inputs["3"]["sampler_name"] == "dpmpp_2m"  # a title, any case
    assert (inputs["5"]["width"], inputs["5"]["height"]) == (128, 64)
    assert inputs["4"]["ckpt_name"] == "other.safetensors"
    assert applied.uploads == {("20", "image"): photo} and inputs["20"]["image"] == "photo.png"
    assert applied.changes[("3", "steps")] == 4 and graph["3"]["inputs"]["steps"] == 2  # the original is untouched


@pytest.mark.parametrize("key,value,words", [
    ("3.steps", "0", ["outside 1..10000"]), ("3.steps", "2.5", ["not a whole number"]),
    ("cfg", "nan", ["not a finite number"]), ("seed", "-1", ["outside 0.."]),
    ("3.sampler_name", "Euler A", ["not one of KSampler's sampler_name choices"]),
    ("size", "64", ["not WIDTHxHEIGHT"]), ("size", "8x64", ["outside 16..16384"]),
    ("image", "missing.png", ["no such parameter"]), ("3.model", "x", ["fed by node 4 (CheckpointLoaderSimple)"]),
    ("3.bogus", "x", ["no settable input 'bogus'", "steps"]), ("9.filename_prefix", "x", ["names the images"]),
    ("99.text", "x", ["no such parameter", "prompt", "6.text"]), ("nope", "1", ["no such parameter", "3.seed"]),
])
def test_values_are_checked_and_unknown_keys_list_the_keys(key, value, words):
    with pytest.raises(ImagegenError) as caught:
        graph_params.apply(editor_graph(), {key: value})
    assert caught.value.code == "invalid_argument"
    for word in words:
        assert word in caught.value.message, caught.value.message
    assert any(words in caught.value.hint for words in ("--list-params", "size=", "Choices", "-o DIR"))


def test_typed_json_values_from_a_batch_item_and_booleans():
    graph = editor_graph()
    applied = graph_params.apply(graph, {"3.steps": 3, "cfg": 6})
    assert applied.graph["3"]["inputs"]["steps"] == 3 and applied.graph["3"]["inputs"]["cfg"] == 6.0
    with pytest.raises(ImagegenError):
        graph_params.apply(graph, {"3.steps": True})
    leaf = graph_params.Leaf("1", "flag", "X", "", "BOOLEAN", {}, False)
    assert graph_params.parse_value(leaf, "yes", "1.flag") is True
    assert graph_params.parse_value(leaf, False, "1.flag") is False


def test_ambiguous_titles_and_names_ask_for_an_id():
    graph = editor_graph()
    graph["7"]["_meta"]["title"] = "Positive"
    with pytest.raises(ImagegenError) as caught:
        graph_params.apply(graph, {"Positive.text": "x"})
    assert "2 nodes are titled 'Positive' (6, 7)" in caught.value.message
    two_pass = editor_graph()
    two_pass["30"] = json.loads(json.dumps(two_pass["3"]))
    two_pass["30"]["inputs"]["latent_image"] = ["3", 0]
    with pytest.raises(ImagegenError) as caught:
        graph_params.apply(two_pass, {"steps": "3"})
    assert "several (3.steps, 30.steps)" in caught.value.message
    seeded = graph_params.apply(two_pass, {"seed": "9", "prompt": "both"})  # seed and prompt set every sampler's
    assert seeded.graph["3"]["inputs"]["seed"] == seeded.graph["30"]["inputs"]["seed"] == 9


def test_list_params_records():
    records = {record["key"]: record for record in graph_params.describe(editor_graph())}
    assert records["prompt"] == {"key": "prompt", "type": "STRING", "sets": ["6.text"],
                                 "value": "beautiful scenery nature glass bottle landscape, purple galaxy bottle"}
    assert records["size"]["value"] == "64x64" and records["size"]["type"] == "SIZE"
    steps = records["3.steps"]
    assert (steps["type"], steps["value"], steps["default"], steps["min"], steps["max"]) == ("INT", 2, 20, 1, 10000)
    assert records["3.sampler_name"]["choices"][0] == "euler" and records["6.text"]["title"] == "Positive"
    assert json.loads(json.dumps(list(records.values())))  # plain JSON for --json


def test_the_graphs_own_values_are_checked_like_comfyui_checks_them():
    graph = editor_graph()
    assert graph_params.check_values(graph) == []
    graph["3"]["inputs"].update(steps=0, sampler_name="Euler Old")
    assert graph_params.check_values(graph) == [
        "node 3 (KSampler) steps = 0 is outside 1..10000",
        "node 3 (KSampler) sampler_name = 'Euler Old' is not one of its choices"]
    graph["3"]["inputs"].update(steps=1, sampler_name="exp_heun_2_x0")  # a newer ComfyUI's: the worker decides
    assert graph_params.check_values(graph) == []
    graph["3"]["inputs"].update(steps="4", cfg="7.5")  # ComfyUI converts numbers given as text
    assert graph_params.check_values(graph) == []
    graph["3"]["inputs"].update(steps="abc", cfg=None)
    del graph["5"]["inputs"]["height"], graph["8"]["inputs"]["vae"]
    assert graph_params.check_values(graph) == [
        "node 5 (EmptyLatentImage) has no height (required)", "node 8 (VAEDecode) has no vae (required)",
        "node 3 (KSampler) steps = 'abc' is not a number", "node 3 (KSampler) cfg = None is not a number"]
