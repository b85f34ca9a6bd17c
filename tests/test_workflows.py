"""Every graph the code can produce, held to the real ComfyUI's node definitions."""

import pytest

from imagegen import workflows
from imagegen.registry import Registry

pytestmark = pytest.mark.comfyui

FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name1", "clip_name2", "vae_name", "model_name", "image"}


@pytest.fixture(scope="module")
def object_info(comfy_worker):
    return comfy_worker.client().object_info()


def _spec_type(spec):
    kind = spec[0]
    if isinstance(kind, list):
        return "COMBO", kind
    if kind == "COMBO":
        return "COMBO", spec[1].get("options", [])
    return kind, spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def validate(graph: dict, info: dict) -> list[str]:
    problems = []
    for node_id, node in graph.items():
        schema = info.get(node["class_type"])
        if schema is None:
            problems.append(f"{node_id}: unknown node type {node['class_type']}")
            continue
        required = schema["input"].get("required", {})
        declared = {**required, **schema["input"].get("optional", {})}
        for name in required:
            if name not in node["inputs"]:
                problems.append(f"{node_id}: missing required input {name}")
        for name, value in node["inputs"].items():
            if name not in declared:
                problems.append(f"{node_id}: undeclared input {name}")
                continue
            kind, extra = _spec_type(declared[name])
            if isinstance(value, list) and len(value) == 2 and value[0] in graph:
                source = info[graph[value[0]]["class_type"]]
                produced = source["output"][value[1]]
                if produced != kind:
                    problems.append(f"{node_id}.{name}: wants {kind}, linked to {produced}")
            elif kind == "COMBO":
                if name not in FILE_INPUTS and value not in extra:
                    problems.append(f"{node_id}.{name}: {value!r} not among the choices")
                if name in FILE_INPUTS and not isinstance(value, str):
                    problems.append(f"{node_id}.{name}: file name must be a string")
            elif kind in ("INT", "FLOAT"):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    problems.append(f"{node_id}.{name}: not a number")
                elif not extra.get("min", -float("inf")) <= value <= extra.get("max", float("inf")):
                    problems.append(f"{node_id}.{name}: {value} outside {extra.get('min')}..{extra.get('max')}")
                elif kind == "INT" and not isinstance(value, int):
                    problems.append(f"{node_id}.{name}: not an integer")
            elif kind == "STRING" and not isinstance(value, str):
                problems.append(f"{node_id}.{name}: not a string")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"{node_id}.{name}: not a boolean")
    return problems


def every_graph():
    registry = Registry.load()
    for name, bundle in registry.bundles.items():
        if bundle.family == "upscale":
            params = workflows.Params("x", 2048, 2048, 1, 0.0, "euler", "normal", 0, init_image="imagegen/final.png")
            yield f"{name}-upscale-resized", workflows.build(bundle, params)
            continue
        for task, extra in (("txt2img", {}), ("img2img", {"init_image": "imagegen/init.png", "denoise": 0.45}),
                            ("batch", {"batch_size": 4}), ("img2img-batch", {"init_image": "a.png", "batch_size": 2, "denoise": 0.3})):
            params = workflows.Params(prompt="a lighthouse", negative="blurry", width=bundle.default("width"),
                                      height=bundle.default("height"), steps=bundle.default("steps"), cfg=bundle.default("cfg"),
                                      sampler=bundle.default("sampler"), scheduler=bundle.default("scheduler"),
                                      seed=workflows.MAX_SEED, guidance=bundle.default("guidance", 3.5), **extra)
            yield f"{name}-{task}", workflows.build(bundle, params)
    with_vae = registry.get("sd15")
    from dataclasses import replace
    with_vae = replace(with_vae, files={**with_vae.files, "vae": registry.shared["flux-ae"]})
    yield "sd15-separate-vae", workflows.build(with_vae, workflows.Params("x", 512, 512, 20, 7.0, "euler", "karras", 1))
    yield "upscale", workflows.upscale("4x.safetensors", "imagegen/final.png")


@pytest.mark.parametrize("name, graph", list(every_graph()), ids=[n for n, _ in every_graph()])
def test_graph_matches_the_real_node_definitions(object_info, name, graph):
    assert validate(graph, object_info) == []


def test_validator_catches_mistakes(object_info):
    graph = dict(every_graph())["sd15-txt2img"]
    graph["sampler"] = {**graph["sampler"], "inputs": {**graph["sampler"]["inputs"], "steps": 0, "sampler_name": "bogus"}}
    del graph["latent"]["inputs"]["width"]
    problems = validate(graph, object_info)
    assert any("steps" in p for p in problems) and any("bogus" in p for p in problems) and any("width" in p for p in problems)


def test_limits_and_choices_match_the_pinned_comfyui(object_info):
    ksampler = object_info["KSampler"]["input"]["required"]
    assert tuple(_spec_type(ksampler["sampler_name"])[1]) == workflows.SAMPLERS
    assert tuple(_spec_type(ksampler["scheduler"])[1]) == workflows.SCHEDULERS
    assert ksampler["steps"][1]["max"] == workflows.MAX_STEPS
    assert ksampler["cfg"][1]["max"] == workflows.MAX_CFG
    assert ksampler["seed"][1]["max"] == workflows.MAX_SEED
    latent = object_info["EmptyLatentImage"]["input"]["required"]
    assert latent["width"][1]["max"] == workflows.MAX_RESOLUTION and latent["width"][1]["step"] == workflows.SIZE_MULTIPLE
    assert latent["batch_size"][1]["max"] == workflows.MAX_BATCH
    assert object_info["FluxGuidance"]["input"]["required"]["guidance"][1]["max"] == workflows.MAX_GUIDANCE
