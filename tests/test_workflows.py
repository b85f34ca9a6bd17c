"""Every graph the code can produce, held to the real ComfyUI's node definitions."""

import pytest

from imagegen import COMFYUI_VERSION
from imagegen.comfy import choices, workflows
from imagegen.models.registry import Registry

TASKS = (("txt2img", {}), ("img2img", {"init_image": "imagegen/init.png", "denoise": 0.45}),
         ("batch", {"batch_size": 4}), ("img2img-batch", {"init_image": "a.png", "batch_size": 2, "denoise": 0.3}),
         ("txt2img-fast", {"fast": True}), ("img2img-fast", {"init_image": "a.png", "denoise": 0.5, "fast": True}),
         ("inpaint", {"init_image": "a.png", "mask": "m.png"}),
         ("inpaint-grown-batch", {"init_image": "a.png", "mask": "m.png", "mask_grow": 6, "batch_size": 2}),
         ("outpaint", {"init_image": "a.png", "extend": [0, 64, 128, 8], "mask_grow": 8}))
FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name1", "clip_name2", "vae_name", "model_name", "image", "lora_name",
               "control_net_name"}


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
        if bundle.family in ("lora", "controlnet"):  # add-ons draw nothing alone (their graphs: tests/test_addons.py)
            continue
        if bundle.family == "upscale":
            params = workflows.Params("x", 2048, 2048, 1, 0.0, "euler", "normal", 0, init_image="imagegen/final.png")
            yield f"{name}-upscale-resized", workflows.build(bundle, params)
            continue
        for task, extra in TASKS:
            params = workflows.Params(prompt="a lighthouse", negative="blurry", width=bundle.default("width"),
                                      height=bundle.default("height"), steps=bundle.default("steps"),
                                      cfg=bundle.default("cfg"),
                                      sampler=bundle.default("sampler"), scheduler=bundle.default("scheduler"),
                                      seed=workflows.MAX_SEED, guidance=bundle.default("guidance", 3.5), **extra)
            yield f"{name}-{task}", workflows.build(bundle, params)
    with_vae = registry.get("sd15")
    from dataclasses import replace
    with_vae = replace(with_vae, files={**with_vae.files, "vae": registry.shared["flux-ae"]})
    yield "sd15-separate-vae", workflows.build(with_vae, workflows.Params("x", 512, 512, 20, 7.0, "euler", "karras", 1))
    inpainting = replace(registry.get("sd15"), defaults={"inpaint": True})  # a 9-channel checkpoint
    for task, extra in TASKS[-3:]:
        params = workflows.Params("x", 512, 512, 20, 7.0, "euler", "karras", 1, denoise=0.9, **extra)
        yield f"sd15-inpainting-model-{task}", workflows.build(inpainting, params)
    yield "upscale", workflows.upscale("4x.safetensors", "imagegen/final.png")


@pytest.mark.comfyui
@pytest.mark.parametrize("name, graph", list(every_graph()), ids=[n for n, _ in every_graph()])
def test_graph_matches_the_real_node_definitions(object_info, name, graph):
    assert validate(graph, object_info) == []


@pytest.mark.comfyui
def test_validator_catches_mistakes(object_info):
    graph = dict(every_graph())["sd15-txt2img"]
    graph["sampler"] = {**graph["sampler"],
                        "inputs": {**graph["sampler"]["inputs"], "steps": 0, "sampler_name": "bogus"}}
    del graph["latent"]["inputs"]["width"]
    problems = validate(graph, object_info)
    for word in ("steps", "bogus", "width"):
        assert any(word in p for p in problems), (word, problems)


@pytest.mark.comfyui
def test_limits_and_choices_match_the_pinned_comfyui(object_info, comfy_worker):
    ksampler = object_info["KSampler"]["input"]["required"]
    # the fallback lists are the pinned ComfyUI's; a newer one's own lists are what its jobs are held to
    assert comfy_worker.client().comfyui_version() == COMFYUI_VERSION
    assert choices.from_object_info(object_info) == (workflows.SAMPLERS, workflows.SCHEDULERS)
    assert choices.from_object_info(comfy_worker.client().object_info("KSampler")) == (workflows.SAMPLERS,
                                                                                      workflows.SCHEDULERS)
    assert ksampler["steps"][1]["max"] == workflows.MAX_STEPS
    assert ksampler["cfg"][1]["max"] == workflows.MAX_CFG
    assert ksampler["seed"][1]["max"] == workflows.MAX_SEED
    latent = object_info["EmptyLatentImage"]["input"]["required"]
    assert latent["width"][1]["max"] == workflows.MAX_RESOLUTION
    assert latent["width"][1]["step"] == workflows.SIZE_MULTIPLE
    assert latent["batch_size"][1]["max"] == workflows.MAX_BATCH
    assert object_info["FluxGuidance"]["input"]["required"]["guidance"][1]["max"] == workflows.MAX_GUIDANCE


def _params(bundle, **extra):
    return workflows.Params("a lighthouse", 512, 512, 20, bundle.default("cfg"), "euler", "simple", 1, **extra)


def test_fast_mode_compiles_the_model_the_sampler_uses():
    registry = Registry.load()
    sd15 = registry.get("sd15")
    plain, fast = workflows.build(sd15, _params(sd15)), workflows.build(sd15, _params(sd15, fast=True))
    assert "compile" not in plain and plain["sampler"]["inputs"]["model"] == ["load_checkpoint", 0]
    assert fast["compile"] == {"class_type": "TorchCompileModel",
                               "inputs": {"model": ["load_checkpoint", 0], "backend": "inductor"}}
    assert fast["sampler"]["inputs"]["model"] == ["compile", 0]
    same = {k: v for k, v in plain.items() if k != "sampler"}
    assert {k: v for k, v in fast.items() if k not in ("compile", "sampler")} == same
    flux = registry.get("flux-dev")
    graph = workflows.build(flux, _params(flux, fast=True))
    assert graph["guider"]["inputs"]["model"] == ["compile", 0]
    assert graph["compile"]["inputs"]["model"] == ["load_unet", 0]


def test_fast_mode_uses_fp8_matmul_only_for_fp8_weights():
    registry = Registry.load()
    fp8, bf16 = registry.get("flux-dev-fp8"), registry.get("flux-dev")
    assert workflows.build(fp8, _params(fp8))["load_unet"]["inputs"]["weight_dtype"] == "fp8_e4m3fn"
    assert workflows.build(fp8, _params(fp8, fast=True))["load_unet"]["inputs"]["weight_dtype"] == "fp8_e4m3fn_fast"
    assert workflows.build(bf16, _params(bf16, fast=True))["load_unet"]["inputs"]["weight_dtype"] == "default", \
        "fast mode must not quietly quantise bf16 weights"


def test_cpu_workers_run_fast_jobs_plain_unless_asked(monkeypatch):
    params = workflows.Params("x", 64, 64, 2, 7.0, "euler", "normal", 1, fast=True)
    monkeypatch.delenv(workflows.FAST_ON_CPU, raising=False)
    assert workflows.for_device(params, "cuda").fast and not workflows.for_device(params, "cpu").fast
    monkeypatch.setenv(workflows.FAST_ON_CPU, "1")
    assert workflows.for_device(params, "cpu").fast
