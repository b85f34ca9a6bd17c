"""UI-format workflows (the editor's Save) to API format and back, against the pinned ComfyUI's node definitions;
the checked-in definitions held to the real server."""

import copy
import json
import os
from pathlib import Path

import pytest

from imagegen.comfy import node_info, ui_graph, workflows
from imagegen.comfy.hires import HiresFix
from imagegen.engine import workflow_models
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError

EDITOR = Path(__file__).parent / "workflows" / "editor-txt2img.json"
TASKS = ({}, {"init_image": "imagegen/in.png", "denoise": 0.5}, {"batch_size": 2}, {"fast": True},
         {"init_image": "imagegen/in.png", "mask": "imagegen/mask.png", "denoise": 0.8},
         {"loras": [workflows.LoraUse("a.safetensors", 0.8), workflows.LoraUse("b.safetensors", -0.5)]},
         {"controls": [workflows.ControlUse("cn.safetensors", image="imagegen/edges.png", strength=0.7,
                                            preprocess="canny")]},
         {"hires": HiresFix(scale=2.0, denoise=0.35)}, {"hires": HiresFix(upscaler="latent")})


def editor() -> dict:
    return json.loads(EDITOR.read_text())


def normalized(graph: dict, names: dict | None = None) -> dict:
    """A graph with its ids renamed (names: old -> new), _meta left out, and optional widgets that hold
    the value the editor would show anyway (their default or first choice) left out."""
    names = names or {}
    info = node_info.pinned()
    result = {}
    for node_id, node in graph.items():
        schema = info[node["class_type"]]
        inputs = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                value = [names.get(value[0], value[0]), value[1]]
            elif not node_info.is_required(schema, name):
                kind, options = node_info.kind_of(node_info.spec_of(schema, name))
                if value == ui_graph._default(kind, options):
                    continue
            inputs[name] = value
        result[names.get(node_id, node_id)] = (node["class_type"], inputs)
    return result


def own_graphs():
    registry = Registry.load()
    for bundle in registry.bundles.values():
        for index, extra in enumerate(TASKS):
            params = workflows.Params(prompt="a fox", width=64, height=64, steps=2, cfg=7.0, sampler="euler",
                                      scheduler="normal", seed=3, **extra)
            try:
                graph = workflows.build(bundle, params)
            except (ValueError, KeyError):
                continue  # a task the family has no graph for (an upscaler drawing, inpainting flux, ...)
            yield f"{bundle.name}-{index}", graph


@pytest.mark.parametrize("name,graph", list(own_graphs()), ids=lambda value: value if isinstance(value, str) else "")
def test_the_projects_own_graphs_round_trip(name, graph):
    ui = ui_graph.from_api(graph)
    assert json.loads(json.dumps(ui)) == ui  # plain JSON, as the PNG chunk holds it
    back = ui_graph.to_api(ui).graph
    ids = {str(index): node_id for index, node_id in enumerate(graph, start=1)}
    assert normalized(back, ids) == normalized(graph)
    titles = {node["_meta"]["title"] for node in back.values()}
    assert titles == set(graph)  # the readable ids become the titles the editor shows
    assert all(link[5] for link in ui["links"]) and ui["last_link_id"] == len(ui["links"])


def test_a_workflow_the_editor_saved_converts_exactly():
    converted = ui_graph.to_api(editor())
    graph = converted.graph
    assert set(graph) == {"3", "4", "5", "6", "7", "8", "9"}  # note, reroute, primitive and the muted preview gone
    sampler = graph["3"]["inputs"]
    # widgets in /object_info order, the editor's control_after_generate value skipped, the primitive's seed used
    assert {k: v for k, v in sampler.items() if not isinstance(v, list)} == {
        "seed": 1234, "steps": 2, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1}
    assert sampler["positive"] == ["6", 0] and sampler["latent_image"] == ["5", 0]
    assert graph["9"]["inputs"]["images"] == ["8", 0]  # through the Reroute
    assert graph["6"]["_meta"]["title"] == "Positive" and graph["4"]["_meta"]["title"] == "Load Checkpoint"
    assert graph["5"]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}
    assert converted.slots[("3", "seed")] == ("10", 0)  # --set seed writes the primitive's value back


def test_set_values_are_written_back_into_the_ui_graph():
    ui = editor()
    converted = ui_graph.to_api(ui)
    patched = ui_graph.patched(ui, converted.slots, {("3", "seed"): 7, ("3", "steps"): 5, ("6", "text"): "a fox"})
    nodes = {node["id"]: node for node in patched["nodes"]}
    assert nodes[10]["widgets_values"][0] == 7
    assert nodes[3]["widgets_values"][2] == 5 and nodes[3]["widgets_values"][1] == "randomize"
    assert nodes[6]["widgets_values"] == ["a fox"]
    assert ui_graph.to_api(patched).graph["3"]["inputs"]["seed"] == 7
    assert editor() == ui  # the original is untouched


def bypassed_lora(ui: dict, kind: str = "LoraLoader") -> dict:
    """The editor's graph with a bypassed LoRA loader between the checkpoint and the sampler and encoders."""
    ui["nodes"].append({"id": 30, "type": kind, "mode": 4, "inputs": [
        {"name": "model", "type": "MODEL", "link": 31}, {"name": "clip", "type": "CLIP", "link": 32}],
        "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]},
                    {"name": "CLIP", "type": "CLIP", "links": [3, 5]}],
        "widgets_values": ["not-here.safetensors", 1, 1]})
    for link in ui["links"]:
        if link[0] in (1, 3, 5):
            link[1], link[2] = 30, 0 if link[0] == 1 else 1
    ui["links"] += [[31, 4, 0, 30, 0, "MODEL"], [32, 4, 1, 30, 1, "CLIP"]]
    return ui


def test_bypassed_nodes_pass_their_input_of_the_same_type_through_as_the_editor_does():
    for kind in ("LoraLoader", "LoraLoader|some custom pack"):  # a bypassed custom node is never sent either
        graph = ui_graph.to_api(bypassed_lora(editor(), kind)).graph
        assert "30" not in graph and graph["3"]["inputs"]["model"] == ["4", 0]
        assert graph["6"]["inputs"]["clip"] == graph["7"]["inputs"]["clip"] == ["4", 1]
    ui = editor()
    next(node for node in ui["nodes"] if node["id"] == 3)["mode"] = 4  # the sampler: its latent passes through
    graph = ui_graph.to_api(ui).graph
    assert "3" not in graph and graph["8"]["inputs"]["samples"] == ["5", 0]


def test_older_editors_without_the_control_value_and_loadimage_upload_values():
    ui = editor()
    sampler = next(node for node in ui["nodes"] if node["id"] == 3)
    sampler["widgets_values"] = [5, 2, 8, "euler", "normal", 1]  # no control_after_generate value
    sampler["inputs"] = sampler["inputs"][:4]  # the seed is a widget again
    ui["nodes"].append({"id": 20, "type": "LoadImage", "mode": 0, "inputs": [], "outputs": [],
                        "widgets_values": ["photo.png", "image"]})
    graph = ui_graph.to_api(ui).graph
    assert graph["3"]["inputs"]["seed"] == 5 and graph["3"]["inputs"]["steps"] == 2
    assert graph["20"]["inputs"] == {"image": "photo.png"}


@pytest.mark.parametrize("change,words", [
    (lambda ui: ui["nodes"][6].update(mode=4), ["node 9 (SaveImage)", "'images'", "node 8 (VAEDecode) is bypassed"]),
    (lambda ui: ui["nodes"][5].update(type="workflow>my group"), ["node 3", "group node"]),
    (lambda ui: (ui.setdefault("definitions", {}).update(subgraphs=[{"id": "abc-123"}]),
                 ui["nodes"][5].update(type="abc-123")), ["node 3 (abc-123)", "subgraph"]),
    (lambda ui: ui["nodes"][5].update(widgets_values=[1, 2, 3]), ["node 3 (KSampler) has 3 widget values", "seed"]),
    (lambda ui: ui["nodes"][4].update(mode=2), ["node 3 (KSampler)", "'seed'", "muted"]),
])
def test_what_cannot_be_converted_faithfully_is_refused_naming_the_node(change, words):
    ui = editor()
    change(ui)
    with pytest.raises(ImagegenError) as caught:
        ui_graph.to_api(ui)
    assert caught.value.code == "invalid_workflow" and caught.value.exit_code == 2
    for word in words:
        assert word in caught.value.message, caught.value.message


def test_custom_node_classes_are_refused_by_name_and_node():
    ui = editor()
    ui["nodes"][0]["type"] = "CheckpointLoader|pysssss"
    ui["nodes"][6]["type"] = "Image Save (WAS)"
    with pytest.raises(ImagegenError) as caught:
        ui_graph.to_api(ui)
    error = caught.value
    assert error.code == "unknown_node_class"
    assert "CheckpointLoader|pysssss (node 4)" in error.message and "Image Save (WAS) (node 8)" in error.message
    assert error.details["classes"] == ["CheckpointLoader|pysssss", "Image Save (WAS)"]


def test_the_workflow_chunk_of_an_image_is_a_layout_of_its_prompt_chunk():
    from imagegen.comfy import png

    graph = next(graph for _name, graph in own_graphs())
    image = png.add_text_chunks(_tiny_png(), {"prompt": json.dumps(graph)})
    chunk = ui_graph.workflow_chunk(image)
    assert normalized(ui_graph.to_api(json.loads(chunk["workflow"])).graph,
                      {str(i): n for i, n in enumerate(graph, 1)}) == normalized(graph)
    assert ui_graph.workflow_chunk(png.add_text_chunks(image, chunk)) == {}  # one is there already
    assert ui_graph.workflow_chunk(_tiny_png()) == {}
    broken = copy.deepcopy(graph)
    next(iter(broken.values()))["class_type"] = "NoSuchNode"
    assert ui_graph.workflow_chunk(png.add_text_chunks(_tiny_png(), {"prompt": json.dumps(broken)})) == {}


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    return buffer.getvalue()


MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def _without_model_files(spec: list) -> list:
    """A spec with the worker's model files (e.g. its LoRAs in TrainLoraNode's list) taken out of its choices."""
    def keep(choices):
        return [c for c in choices if not (isinstance(c, str) and c.lower().endswith(MODEL_FILE_SUFFIXES))]

    if isinstance(spec[0], list):
        return [keep(spec[0]), spec[1]]
    if spec[0] == "COMBO":
        return ["COMBO", {**spec[1], "options": keep(spec[1].get("options") or [])}]
    return spec


@pytest.mark.comfyui
def test_the_pinned_node_definitions_are_the_real_comfyuis(comfy_worker):
    """node_info_pinned.json is the pinned ComfyUI's /object_info, trimmed; file lists are empty there.
    IMAGEGEN_REGENERATE_NODE_INFO=1 writes it afresh from the real server."""
    live = node_info.trim(comfy_worker.client().object_info())
    if os.environ.get("IMAGEGEN_REGENERATE_NODE_INFO") == "1":
        for class_type, schema in live.items():  # the worker's files are not the pinned ComfyUI's
            for specs in schema["input"].values():
                for key, spec in specs.items():
                    specs[key] = spec = _without_model_files(spec)
                    if isinstance(spec[0], list) and (spec[1].get("image_upload") or
                                                      key in workflow_models.LOADERS.get(class_type, {})):
                        spec[0] = []
        node_info.PINNED_FILE.write_text(node_info.dumps(live))
    pinned = node_info.pinned()
    assert set(live) == set(pinned)
    for name, schema in pinned.items():
        assert live[name]["output"] == schema["output"] and live[name]["input_order"] == schema["input_order"], name
        for section, specs in schema["input"].items():
            for key, spec in specs.items():
                theirs = live[name]["input"][section][key]
                if isinstance(spec[0], list) and not spec[0]:
                    assert isinstance(theirs[0], list), (name, key)  # a file list: the worker's own files
                elif spec[0] == "COMBO" and not spec[1].get("options"):
                    assert theirs[0] == "COMBO", (name, key)  # a folder list (e.g. input/3d): the worker's own
                else:  # beside fixed choices, a list may hold the worker's model files (TrainLoraNode's LoRAs)
                    assert _without_model_files(theirs) == _without_model_files(spec), (name, key)
