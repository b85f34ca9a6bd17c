"""`generate --hires`: the two-pass graph (comfy/hires.py), its checks (engine/hires.py) and provenance,
held to the real ComfyUI's node definitions and run once through the real CLI at 64x64 -> 128x128."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from jsonschema import Draft202012Validator
from PIL import Image

from imagegen.comfy import png, workflows
from imagegen.comfy.hires import HiresFix
from imagegen.engine import batch, hires
from imagegen.engine.schema import RESULT
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError


def _params(bundle, fix: HiresFix | None, **extra) -> workflows.Params:
    return workflows.Params(prompt="a lighthouse", negative="blurry", width=bundle.default("width"),
                            height=bundle.default("height"), steps=bundle.default("steps"), cfg=bundle.default("cfg"),
                            sampler=bundle.default("sampler"), scheduler=bundle.default("scheduler"), seed=5,
                            hires=fix, **extra)


FIXES = {"lanczos": HiresFix(), "latent": HiresFix(scale=1.5, denoise=0.5, upscaler="latent"),
         "model": HiresFix(steps=7, upscaler="realesrgan-x4", model_filename="RealESRGAN_x4plus.safetensors")}


def hires_graphs():
    registry = Registry.load()
    for model in ("sd15", "sdxl", "flux-dev"):
        bundle = registry.get(model)
        for name, fix in FIXES.items():
            yield f"{model}-{name}", workflows.build(bundle, _params(bundle, fix))
    bundle = registry.get("sd15")
    yield "sd15-batch-fast", workflows.build(bundle, _params(bundle, FIXES["model"], batch_size=2, fast=True))


def test_the_second_pass_samples_the_enlarged_first_pass_at_low_denoise():
    graph = dict(hires_graphs())["sd15-lanczos"]
    first, second = graph["sampler"]["inputs"], graph["hires_sampler"]["inputs"]
    assert graph["decode"]["inputs"]["samples"] == ["hires_sampler", 0]
    assert second["latent_image"] == ["hires_encode", 0]
    assert graph["hires_decode"]["inputs"]["samples"] == ["sampler", 0]
    assert (graph["hires_resize"]["inputs"]["width"], graph["hires_resize"]["inputs"]["height"]) == (1024, 1024)
    assert second["denoise"] == 0.35 and first["denoise"] == 1.0
    assert {k: v for k, v in second.items() if k not in ("latent_image", "denoise")} == \
        {k: v for k, v in first.items() if k not in ("latent_image", "denoise")}, "same model, prompts, seed, steps"
    flux = dict(hires_graphs())["flux-dev-model"]
    assert flux["hires_sample"]["inputs"]["sigmas"] == ["hires_schedule", 0]
    assert flux["hires_schedule"]["inputs"]["steps"] == 7 and flux["hires_schedule"]["inputs"]["denoise"] == 0.35
    assert flux["hires_load_upscaler"]["inputs"]["model_name"] == "RealESRGAN_x4plus.safetensors"
    latent = dict(hires_graphs())["sd15-latent"]
    assert latent["hires_upscale"]["inputs"]["width"] == 768 and "hires_decode" not in latent
    assert workflows.build(Registry.load().get("sd15"), _params(Registry.load().get("sd15"), None)).keys() == \
        {k for k in graph if not k.startswith("hires_")}, "without --hires the graph is the one-pass one"


def test_sizes_round_to_multiples_of_8():
    assert HiresFix(scale=1.5).size(64, 72) == (96, 112)
    assert HiresFix(scale=1.3).size(512, 768) == (664, 1000)


@pytest.mark.parametrize("fix, words", [
    (HiresFix(scale=1.0), "--hires-scale 1.0 is outside"),
    (HiresFix(scale=5), "--hires-scale 5"),
    (HiresFix(denoise=1.5), "--hires-denoise 1.5"),
    (HiresFix(steps=0), "--hires-steps 0"),
    (HiresFix(upscaler="sd15"), "not an upscale model"),
    (HiresFix(scale=4), "over 16384 a side"),
])
def test_bad_hires_settings_are_refused(fix, words):
    with pytest.raises(ImagegenError) as caught:
        hires.check(fix, 4104 if "16384" in words else 512, 512)
    assert words in caught.value.message


def test_hires_resolves_a_registered_upscaler_and_refuses_an_input_image():
    checked = hires.check(HiresFix(upscaler="realesrgan-x4"), 512, 512)
    assert checked.model_filename == "RealESRGAN_x4plus.safetensors"
    assert hires.check(HiresFix(upscaler="Latent"), 512, 512).upscaler == "latent"
    with pytest.raises(ImagegenError) as caught:
        hires.check(HiresFix(), 512, 512, has_image=True)
    assert "text-to-image" in caught.value.message


def test_an_unknown_upscaler_lists_the_upscalers_and_local_ones_link_by_path(tmp_path):
    with pytest.raises(ImagegenError) as caught:
        hires.upscale_model("realesrgan-x8")
    assert caught.value.code == "unknown_model" and "realesrgan-x4" in caught.value.hint
    assert "sd15" not in caught.value.hint, "the hint lists upscale models, not every model"
    from safetensors_util import write_safetensors

    links = set()
    for folder in ("a", "b"):  # two upscalers of one name in two folders never share a link
        (tmp_path / folder).mkdir()
        esrgan = write_safetensors(tmp_path / folder / "4x.safetensors", {"conv_first.weight": ("F16", [8, 3, 3, 3])})
        bundle = hires.upscale_model(str(esrgan))
        assert (bundle.name, bundle.family) == ("4x", "upscale")
        links.add(bundle.files["upscale_model"].filename)
    assert len(links) == 2


def test_a1111_parameters_name_the_first_pass_size_and_the_hires_settings():
    bundle = Registry.load().get("sd15")
    params = workflows.Params("a fox", 512, 512, 20, 7.0, "euler", "normal", 3, hires=HiresFix(steps=10))
    from imagegen.engine.render import image_parameters

    record = {**image_parameters(bundle, params), "width": 1024, "height": 1024}
    text = png.a1111_parameters(record)
    assert "Size: 512x512" in text
    for field in ("Denoising strength: 0.35", "Hires upscale: 2.0", "Hires steps: 10", "Hires upscaler: Lanczos"):
        assert field in text
    assert record["hires"] == {"scale": 2.0, "denoise": 0.35, "steps": 10, "upscaler": "lanczos", "first_width": 512,
                               "first_height": 512}


def test_batch_items_take_a_hires_field(tmp_path):
    items = batch.parse_items('{"prompt": "a fox", "hires": true, "size": "64x64"}\n'
                              '{"prompt": "an owl", "hires": {"scale": 1.5, "denoise": 0.5, "model": "latent"}}\n'
                              '{"prompt": "a cat"}\n')
    jobs = batch.plan(items, tmp_path, {}, 0, 1)
    assert [job.params.hires for job in jobs] == [
        HiresFix(), HiresFix(scale=1.5, denoise=0.5, upscaler="latent"), None]
    with pytest.raises(ImagegenError) as caught:
        batch.plan(batch.parse_items('{"prompt": "a fox", "hires": {"scael": 2}}'), tmp_path, {}, 0, 1)
    assert "line 1: hires must be true or an object" in caught.value.message


def test_hires_flags_without_hires_and_with_an_image_are_usage_errors(tmp_path):
    for flag, value in (("--hires-scale", "1.5"), ("--hires-scale", "2"), ("--hires-denoise", "0.35")):
        done = run_cli("generate", "a fox", flag, value, "--json")  # even the default value asks for --hires
        assert done.returncode == 2 and f"{flag} needs --hires" in done.stderr.decode()
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(image)
    done = run_cli("generate", "a fox", "--hires", "--image", str(image), "--json")
    assert done.returncode == 2 and "cannot be combined with --image" in done.stderr.decode()


# --- real ComfyUI ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def object_info(comfy_worker):
    return comfy_worker.client().object_info()


@pytest.mark.comfyui
@pytest.mark.parametrize("name, graph", list(hires_graphs()), ids=[n for n, _ in hires_graphs()])
def test_hires_graphs_match_the_real_node_definitions(object_info, name, graph):
    from test_workflows import validate  # here: that module builds every other graph when it is imported

    assert validate(graph, object_info) == []


@pytest.mark.comfyui
def test_generate_hires_renders_64_to_128_through_the_real_cli(comfy_worker, session_home, tiny_sd15, tiny_esrgan,
                                                               tmp_path):
    env = {"IMAGEGEN_HOME": str(session_home), "IMAGEGEN_RUNTIME": "local"}
    common = ("--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "1", "--seed", "11", "--json")
    done = run_cli("generate", "a red fox", *common, "--hires", "-o", str(tmp_path / "fox.png"), env=env)
    assert done.returncode == 0, done.stderr.decode()
    record = json.loads(done.stdout)
    assert not list(Draft202012Validator(RESULT).iter_errors(record))
    assert (record["width"], record["height"]) == (128, 128)
    assert record["hires"] == {"scale": 2.0, "denoise": 0.35, "steps": 1, "upscaler": "lanczos", "first_width": 64,
                               "first_height": 64}
    chunks = png.read_text_chunks(Path(record["path"]).read_bytes())
    assert json.loads(chunks["imagegen"])["hires"] == record["hires"]
    assert "Size: 64x64" in chunks["parameters"] and "Hires upscale: 2.0" in chunks["parameters"]
    with Image.open(record["path"]) as image:
        assert image.size == (128, 128)

    again = run_cli("generate", "--from", record["path"], "--checkpoint", str(tiny_sd15), "--json",
                    "-o", str(tmp_path / "again.png"), env=env)
    assert again.returncode == 0, again.stderr.decode()
    reproduced = json.loads(again.stdout)
    assert reproduced["hires"] == record["hires"] and (reproduced["width"], reproduced["height"]) == (128, 128)
    with Image.open(record["path"]) as first, Image.open(reproduced["path"]) as second:
        assert first.tobytes() == second.tobytes(), "--from draws the same two passes again"

    done = run_cli("generate", "a red fox", *common, "--hires", "--hires-scale", "1.5", "--hires-model",
                   str(tiny_esrgan), "--hires-steps", "2", "-o", str(tmp_path / "owl.png"), env=env)
    assert done.returncode == 0, done.stderr.decode()
    record = json.loads(done.stdout)
    assert (record["width"], record["height"]) == (96, 96)
    assert record["hires"]["upscaler"] == tiny_esrgan.stem and record["hires"]["steps"] == 2


@pytest.mark.comfyui
def test_a_batch_renders_items_with_and_without_hires(comfy_worker, session_home, tiny_sd15, tiny_esrgan, tmp_path):
    env = {"IMAGEGEN_HOME": str(session_home), "IMAGEGEN_RUNTIME": "local"}
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"prompt": "a fox", "hires": True, "output": "fox"}) + "\n"
                     + json.dumps({"prompt": "an owl", "hires": {"scale": 1.5, "model": str(tiny_esrgan)},
                                   "output": "owl"}) + "\n"
                     + json.dumps({"prompt": "a cat", "output": "cat"}) + "\n")
    done = run_cli("batch", str(items), "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_sd15), "--size", "64x64",
                   "--steps", "1", "--json", env=env)
    assert done.returncode == 0, done.stderr.decode()
    records = [json.loads(line) for line in done.stdout.decode().splitlines()]
    sizes = {Path(r["path"]).stem: (r["width"], r["height"]) for r in records}
    assert sizes == {"fox": (128, 128), "owl": (96, 96), "cat": (64, 64)}


def test_an_a1111_hires_image_is_read_back_as_its_two_passes():
    from imagegen.comfy.provenance import parse_a1111

    found = parse_a1111("a fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 512x768, Model: x, "
                        "Denoising strength: 0.4, Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Latent")
    assert found["hires"] == {"scale": 1.5, "denoise": 0.4, "steps": 10, "upscaler": "latent", "first_width": 512,
                              "first_height": 768}
    fix, size = hires.from_record(found["hires"])
    assert fix == HiresFix(scale=1.5, denoise=0.4, steps=10, upscaler="latent") and size == "512x768"
    bundle = Registry.load().get("sd15")
    params = workflows.Params("a fox", 512, 512, 20, 7.0, "euler", "normal", 3, hires=HiresFix(steps=10))
    from imagegen.engine.render import image_parameters

    text = png.a1111_parameters({**image_parameters(bundle, params), "width": 1024, "height": 1024})
    assert parse_a1111(text)["hires"]["first_width"] == 512, "imagegen's own parameters chunk reads back"
