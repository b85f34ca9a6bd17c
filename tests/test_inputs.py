"""The user's own images: checked and decoded before any worker starts (unit), and img2img and inpainting
through the real CLI on real ComfyUI with tiny checkpoints whose VAE passes images through."""

import io
import json
import os
from pathlib import Path

import pytest
from conftest import run_cli
from jsonschema import Draft202012Validator
from PIL import Image
from safetensors_util import write_safetensors

from imagegen.comfy import png, workflows
from imagegen.engine import generate, inputs
from imagegen.engine.schema import RESULT
from imagegen.models import modelfile
from imagegen.models.registry import local_bundle
from imagegen.util.errors import ImagegenError


def blocks(path: Path, width: int = 64, height: int = 64, seed: int = 0, fmt: str = "PNG", **save) -> Path:
    """An image of flat 8x8 colour blocks: what the pass-through VAE returns unchanged."""
    import random

    rng = random.Random(seed)
    small = Image.new("RGB", (width // 8, height // 8))
    small.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(small.width *
                                                                                                small.height)])
    small.resize((width, height), Image.NEAREST).save(path, fmt, **save)
    return path


def square_mask(path: Path, width: int = 64, height: int = 64, box=(16, 16, 48, 48), mode: str = "L") -> Path:
    mask = Image.new(mode, (width, height), 0)
    mask.paste(255 if mode == "L" else (255, 255, 255), box)
    mask.save(path)
    return path


def pixels(path: Path):
    import numpy as np

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def refused(code: str, call, *args, **kwargs) -> ImagegenError:
    with pytest.raises(ImagegenError) as caught:
        call(*args, **kwargs)
    assert caught.value.code == code, caught.value.message
    assert caught.value.exit_code == 2
    return caught.value


# --- checked and decoded before any worker starts ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_are_decoded_and_normalized(tmp_path, fmt):
    source = blocks(tmp_path / f"in.{fmt.lower()}", 100, 70, fmt=fmt)
    prepared = inputs.prepare(source)
    assert prepared.denoise == inputs.DEFAULT_DENOISE and prepared.mask is None
    assert prepared.size() == (96, 64), "the input's size, rounded down to a multiple of 8"
    import hashlib

    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    assert prepared.sources()["image"] == {"name": source.name, "path": str(source), "sha256": sha}
    files = inputs.job_files(prepared.sources())
    with Image.open(files["init_image"]) as normalized:
        assert (normalized.format, normalized.mode, normalized.size) == ("PNG", "RGB", (100, 70))


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 24), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: viewers show it 24 wide and 40 tall
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    prepared = inputs.prepare(tmp_path / "phone.jpg")
    assert (prepared.image.width, prepared.image.height) == (24, 40)
    assert prepared.size() == (24, 40)
    with Image.open(inputs.job_files(prepared.sources())["init_image"]) as normalized:
        assert normalized.size == (24, 40)


def test_transparency_is_flattened_onto_white(tmp_path):
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    with Image.open(inputs.job_files(inputs.prepare(tmp_path / "clear.png").sources())["init_image"]) as normalized:
        assert normalized.getpixel((3, 3)) == (255, 255, 255)


def test_corrupt_unsupported_and_missing_files_are_refused(tmp_path):
    data = blocks(tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert "cannot be decoded" in refused("invalid_source_image", inputs.prepare, tmp_path / "cut.png").message
    (tmp_path / "text.png").write_text("not an image")
    refused("invalid_source_image", inputs.prepare, tmp_path / "text.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "old.gif")
    assert "GIF" in refused("invalid_source_image", inputs.prepare, tmp_path / "old.gif").message
    assert "no such file" in refused("invalid_source_image", inputs.prepare, tmp_path / "gone.png").message
    assert "directory" in refused("invalid_source_image", inputs.prepare, tmp_path).message
    refused("invalid_source_image", inputs.prepare, Path("/dev/zero"))


def test_a_16_bit_greyscale_image_keeps_its_tones(tmp_path):
    """Pillow clips 16-bit values when converting to RGB: a mid-grey 16-bit PNG must not come out white."""
    Image.new("I;16", (16, 16), 40000).save(tmp_path / "deep.png")
    for role, key in (("image", "init_image"), ("mask", "mask")):
        loaded = inputs.load(tmp_path / "deep.png", role)
        with Image.open(inputs.job_files({role: loaded.record()})[key]) as normalized:
            value = normalized.convert("L").getpixel((3, 3))
        assert abs(value - 40000 / 257) <= 1, (role, value)


def test_refusals_read_well_and_name_where_the_file_came_from(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    error = refused("invalid_source_image", inputs.prepare, tmp_path / "notes.png")
    assert "is not an image" in error.message and "BytesIO" not in error.message
    assert refused("invalid_source_image", inputs.load, tmp_path / "notes.png", "control").message.startswith(
        "--control ")
    error = refused("invalid_source_image", inputs.load, tmp_path, "upscale")  # `imagegen upscale DIR`
    assert "--image" not in error.message and f"{tmp_path}/*.png" in error.hint


def test_size_limits_in_bytes_and_pixels(tmp_path, monkeypatch):
    source = blocks(tmp_path / "in.png", 64, 64)
    monkeypatch.setenv(inputs.MAX_BYTES_ENV, "100")
    assert inputs.MAX_BYTES_ENV in refused("invalid_source_image", inputs.prepare, source).hint
    monkeypatch.delenv(inputs.MAX_BYTES_ENV)
    monkeypatch.setenv(inputs.MAX_PIXELS_ENV, str(64 * 64 - 1))
    assert "64x64 pixels" in refused("invalid_source_image", inputs.prepare, source).message
    monkeypatch.setenv(inputs.MAX_PIXELS_ENV, "lots")
    refused("invalid_argument", inputs.prepare, source)


def test_a_huge_declared_size_is_refused_without_decoding(tmp_path):
    """A PNG that says it is 30000x30000 (a decompression bomb) is refused from its header alone."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bomb = png.PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(bomb)
    error = refused("invalid_source_image", inputs.prepare, tmp_path / "bomb.png")
    assert "900000000 pixels" in error.message and inputs.MAX_PIXELS_ENV in error.hint


def test_masks_of_any_mode_become_luminance(tmp_path):
    source = blocks(tmp_path / "in.png", 32, 32)
    rgba = Image.new("RGBA", (32, 32), (255, 255, 255, 0))  # transparent white: kept
    rgba.paste((255, 255, 255, 255), (8, 8, 24, 24))
    rgba.save(tmp_path / "rgba.png")
    wide = Image.new("I;16", (32, 32), 65535)
    wide.save(tmp_path / "wide.png")
    square_mask(tmp_path / "rgb.png", 32, 32, (8, 8, 24, 24), mode="RGB")
    for name, inside, outside in (("rgba.png", 255, 0), ("wide.png", 255, 255), ("rgb.png", 255, 0)):
        prepared = inputs.prepare(source, tmp_path / name)
        assert prepared.denoise == inputs.INPAINT_DENOISE
        with Image.open(inputs.job_files(prepared.sources())["mask"]) as mask:
            assert mask.mode == "L" and (mask.getpixel((16, 16)), mask.getpixel((1, 1))) == (inside, outside), name


def test_a_mask_of_another_size_is_an_error_not_a_resize(tmp_path):
    source = blocks(tmp_path / "in.png", 64, 64)
    error = refused("invalid_mask", inputs.prepare, source, square_mask(tmp_path / "m.png", 64, 72))
    assert "64x72" in error.message and "64x64" in error.message


def test_an_all_black_mask_is_refused_an_all_white_one_repaints_everything(tmp_path):
    source = blocks(tmp_path / "in.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    error = refused("invalid_mask", inputs.prepare, source, tmp_path / "black.png")
    assert "all black" in error.message
    Image.new("RGBA", (64, 64), (255, 255, 255, 0)).save(tmp_path / "clear.png")  # transparent counts as black
    refused("invalid_mask", inputs.prepare, source, tmp_path / "clear.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "white.png")
    assert inputs.prepare(source, tmp_path / "white.png").denoise == 1.0


def test_options_that_need_an_image_or_a_mask(tmp_path):
    source = blocks(tmp_path / "in.png")
    refused("invalid_argument", inputs.prepare, None, tmp_path / "m.png")
    refused("invalid_argument", inputs.prepare, None, None, 0.5)
    refused("invalid_argument", inputs.prepare, source, None, None, 4)  # --mask-grow without --mask
    refused("invalid_argument", inputs.prepare, source, None, 1.5)
    refused("invalid_argument", inputs.prepare, source, square_mask(tmp_path / "m.png"), None, 999)
    assert inputs.prepare(None) == inputs.Prepared()


def test_plan_takes_the_input_size_and_names_the_inputs(tmp_path, tiny_header):
    source, mask = blocks(tmp_path / "in.png", 100, 70), square_mask(tmp_path / "m.png", 100, 70)
    request = generate.Request(prompt="a boat", checkpoint=tiny_header, image=source, mask=mask, mask_grow=3,
                               seed=1, steps=1)
    planned = generate.plan(request)
    params = planned.jobs[0]
    assert (params.width, params.height, params.denoise, params.mask_grow) == (96, 64, 1.0, 3)
    assert set(params.sources) == {"image", "mask"}
    sized = generate.plan(generate.Request(prompt="a boat", checkpoint=tiny_header, image=source, size="64x64",
                                           denoise=0.3))
    assert (sized.jobs[0].width, sized.jobs[0].height, sized.jobs[0].denoise) == (64, 64, 0.3)
    assert set(inputs.job_files(params.sources)) == {"init_image", "mask"}


@pytest.fixture
def tiny_header(tmp_path) -> Path:
    """An SD1.5-shaped checkpoint header (no real weights): enough for planning."""
    return write_safetensors(tmp_path / "sd15.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": ("F16", [320, 4, 3, 3]),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ("F16", [320, 768]),
    })


def test_inpainting_checkpoints_are_told_from_the_header(tmp_path):
    def checkpoint(name: str, channels: int) -> Path:
        return write_safetensors(tmp_path / name, {
            "model.diffusion_model.input_blocks.0.0.weight": ("F16", [320, channels, 3, 3]),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ("F16", [320, 768]),
        })

    plain, inpaint = checkpoint("plain.safetensors", 4), checkpoint("inpaint.safetensors", 9)
    assert modelfile.detect(modelfile.read_header(inpaint)).details["inpaint"] is True
    assert modelfile.detect(modelfile.read_header(plain)).details["inpaint"] is False
    assert workflows.inpaint_checkpoint(local_bundle(inpaint, "sd15"))
    assert not workflows.inpaint_checkpoint(local_bundle(plain, "sd15"))


def _params(**extra):
    return workflows.Params("a boat", 64, 64, 1, 7.0, "euler", "normal", 1, init_image="in.png", **extra)


def test_graphs_for_img2img_and_both_kinds_of_inpainting(tmp_path):
    from dataclasses import replace

    plain = local_bundle(write_safetensors(tmp_path / "p.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": ("F16", [320, 4, 3, 3])}), "sd15")
    img2img = workflows.build(plain, _params(denoise=0.4))
    assert "keep" not in img2img and img2img["sampler"]["inputs"]["latent_image"] == ["encode", 0]
    masked = workflows.build(plain, _params(mask="m.png", mask_grow=4))
    assert masked["noise_mask"]["inputs"] == {"samples": ["encode", 0], "mask": ["grow_mask", 0]}
    assert masked["save"]["inputs"]["images"] == ["keep", 0]  # the input's own pixels outside the mask
    assert masked["keep"]["inputs"]["destination"] == ["resize", 0]
    inpaint = replace(plain, defaults={"inpaint": True})
    model = workflows.build(inpaint, _params(mask="m.png", batch_size=2))
    assert model["sampler"]["inputs"]["positive"] == ["inpaint_conditioning", 0]
    assert model["sampler"]["inputs"]["latent_image"] == ["repeat", 0]
    assert model["keep"]["inputs"]["destination"] == ["keep_base", 0] and "noise_mask" not in model


def test_extend_takes_one_number_or_four_and_adds_to_the_size(tmp_path):
    source = blocks(tmp_path / "in.png", 64, 48)
    assert inputs.parse_extend("16") == [16, 16, 16, 16] and inputs.parse_extend("0,8,0,0") == [0, 8, 0, 0]
    assert inputs.parse_extend([0, 0, 64, 0]) == [0, 0, 64, 0] and inputs.parse_extend("0") is None
    for bad in ("5", "8,8", "a,b,c,d", "-8", True):
        refused("invalid_argument", inputs.parse_extend, bad)
    prepared = inputs.prepare(source, extend="0,0,32,8")
    assert (prepared.size(), prepared.denoise, prepared.extend) == ((96, 56), 1.0, [0, 0, 32, 8])
    refused("invalid_argument", inputs.prepare, source, square_mask(tmp_path / "m.png", 64, 48), extend="8")
    refused("invalid_argument", inputs.prepare, None, extend="8")
    refused("invalid_argument", inputs.prepare, source, extend=str(workflows.MAX_RESOLUTION))
    graph = workflows.build(local_bundle(write_safetensors(tmp_path / "p.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": ("F16", [320, 4, 3, 3])}), "sd15"),
        workflows.Params("x", 96, 56, 1, 7.0, "euler", "normal", 1, init_image="in.png", extend=[0, 0, 32, 8]))
    assert graph["resize"]["inputs"]["image"] == ["pad", 0] and graph["mask_image"]["inputs"]["mask"] == ["pad", 1]
    assert graph["noise_mask"]["inputs"]["mask"] == ["to_mask", 0] and graph["save"]["inputs"]["images"] == ["keep", 0]


def test_from_finds_the_recorded_input_or_names_what_is_missing(tmp_path):
    source = blocks(tmp_path / "in.png")
    record = inputs.prepare(source).sources()["image"]
    made = tmp_path / "out" / "made.png"
    made.parent.mkdir()
    assert inputs.find_recorded("image", record, made) == source
    source.rename(made.parent / "in.png")  # moved next to the image it made
    assert inputs.find_recorded("image", record, made) == made.parent / "in.png"
    (made.parent / "in.png").write_bytes(b"changed")
    error = refused("input_missing", inputs.find_recorded, "image", record, made)
    assert record["sha256"] in error.message and "in.png" in error.message and "--image" in error.hint


def test_from_merges_the_recorded_inputs_denoise_and_extend(tmp_path):
    source = blocks(tmp_path / "in.png")
    record = {"prompt": "a boat", "seed": 4, "denoise": 0.9, "mask_grow": 8, "extend": [0, 0, 16, 0],
              "inputs": inputs.prepare(source).sources()}
    made = tmp_path / "made.png"
    made.write_bytes(png.add_text_chunks(blocks(tmp_path / "plain.png").read_bytes(),
                                         {"imagegen": json.dumps(record)}))
    merged = generate.merge_source(made, {"prompt": None, "denoise": None, "mask_grow": None}, True)
    assert (merged["image"], merged["denoise"], merged["mask_grow"]) == (source, 0.9, 8)
    assert merged["extend"] == [0, 0, 16, 0]
    given = generate.merge_source(made, {"prompt": None, "denoise": 0.2, "image": tmp_path / "plain.png"}, True)
    assert (given["image"], given["denoise"]) == (tmp_path / "plain.png", 0.2), "what the user gives wins"
    plain = tmp_path / "txt2img.png"
    plain.write_bytes(png.add_text_chunks(blocks(tmp_path / "p2.png").read_bytes(),
                                          {"imagegen": json.dumps({"prompt": "x", "denoise": 1.0})}))
    assert "denoise" not in generate.merge_source(plain, {"prompt": None}, True)


# --- the real CLI on real ComfyUI ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(comfyui_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("inputs-home")
    values = {"IMAGEGEN_HOME": str(home), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir), "IMAGEGEN_KEEP_WARM": "300",
              "IMAGEGEN_RUNTIME": "local"}
    yield values
    run_cli("stop", "--all", env=values)


def cli_json(env, *args, cwd=None) -> dict:
    result = run_cli("generate", *args, "--json", env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout.decode().splitlines()[-1])


def test_a_corrupt_input_exits_2_before_any_worker_starts(tmp_path, tiny_header):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    env = {"IMAGEGEN_HOME": str(tmp_path / "home"), "IMAGEGEN_COMFYUI_DIR": "/nonexistent"}
    result = run_cli("generate", "a boat", "--checkpoint", str(tiny_header), "--image", str(tmp_path / "broken.jpg"),
                     "--json", env=env)
    assert result.returncode == 2
    error = json.loads(result.stderr.decode().splitlines()[-1])
    assert error["code"] == "invalid_source_image" and "broken.jpg" in error["message"]
    assert not (tmp_path / "home" / "state" / "workers").exists()
    result = run_cli("generate", "a boat", "--checkpoint", str(tiny_header), "--denoise", "0.5", "--json", env=env)
    assert result.returncode == 2 and json.loads(result.stderr.decode())["code"] == "invalid_argument"


@pytest.mark.comfyui
def test_img2img_at_denoise_0_returns_the_input_and_from_reproduces_it(env, tiny_sd15_clear, tmp_path):
    source = blocks(tmp_path / "photo.png", 64, 64, seed=3)
    record = cli_json(env, "a boat", "--checkpoint", str(tiny_sd15_clear), "--image", str(source), "--denoise", "0",
                      "--steps", "2", "--seed", "5", "-o", str(tmp_path / "kept.png"))
    assert (record["width"], record["height"], record["denoise"]) == (64, 64, 0.0)
    assert record["inputs"]["image"]["sha256"] == inputs.prepare(source).image.sha256
    difference = abs(pixels(tmp_path / "kept.png") - pixels(source)).mean()
    assert difference < 1.0, f"denoise 0 must return the input closely (mean abs difference {difference:.2f}/255)"
    chunks = png.read_text_chunks((tmp_path / "kept.png").read_bytes())
    assert "Denoising strength: 0.0" in chunks["parameters"]
    assert json.loads(chunks["imagegen"])["inputs"]["image"]["path"] == str(source)

    changed = cli_json(env, "a boat", "--checkpoint", str(tiny_sd15_clear), "--image", str(source), "--denoise",
                       "0.8", "--steps", "2", "--seed", "5", "-o", str(tmp_path / "changed.png"))
    assert changed["denoise"] == 0.8
    assert abs(pixels(tmp_path / "changed.png") - pixels(source)).mean() > difference + 5

    again = cli_json(env, "--from", str(tmp_path / "changed.png"), "--checkpoint", str(tiny_sd15_clear),
                     "-o", str(tmp_path / "again.png"))
    assert again["denoise"] == 0.8 and again["inputs"]["image"]["sha256"] == changed["inputs"]["image"]["sha256"]
    assert (pixels(tmp_path / "again.png") == pixels(tmp_path / "changed.png")).all()

    source.rename(tmp_path / "elsewhere.png")
    result = run_cli("generate", "--from", str(tmp_path / "changed.png"), "--checkpoint", str(tiny_sd15_clear),
                     "--json", env=env)
    assert result.returncode == 2
    error = json.loads(result.stderr.decode().splitlines()[-1])
    assert error["code"] == "input_missing" and changed["inputs"]["image"]["sha256"] in error["message"]
    given = cli_json(env, "--from", str(tmp_path / "changed.png"), "--checkpoint", str(tiny_sd15_clear),
                     "--image", str(tmp_path / "elsewhere.png"), "-o", str(tmp_path / "given.png"))
    assert given["inputs"]["image"]["path"] == str(tmp_path / "elsewhere.png")
    assert (pixels(tmp_path / "given.png") == pixels(tmp_path / "changed.png")).all()


@pytest.mark.comfyui
@pytest.mark.parametrize("model", ["tiny_sd15_clear", "tiny_sd15_inpaint"])
def test_inpainting_keeps_the_pixels_outside_the_mask(env, model, request, tmp_path):
    import numpy as np

    checkpoint = request.getfixturevalue(model)
    source = blocks(tmp_path / "photo.png", 64, 64, seed=4)
    mask = square_mask(tmp_path / "mask.png", 64, 64, (16, 16, 48, 48))
    record = cli_json(env, "a red door", "--checkpoint", str(checkpoint), "--image", str(source), "--mask", str(mask),
                      "--mask-grow", "4", "--steps", "2", "--seed", "9", "-o", str(tmp_path / "inpainted.png"))
    assert record["denoise"] == 1.0 and record["mask_grow"] == 4
    Draft202012Validator(RESULT).validate(record)
    assert set(record["inputs"]) == {"image", "mask"}
    grown = np.zeros((64, 64), dtype=bool)
    grown[12:52, 12:52] = True  # the square grown by 4 pixels
    difference = abs(pixels(tmp_path / "inpainted.png") - pixels(source)).mean(axis=2)
    outside, inside = difference[~grown].mean(), difference[16:48, 16:48].mean()
    assert outside < 1.0, f"pixels outside the mask changed by {outside:.2f}/255 on average"
    assert inside > outside + 10, (inside, outside)
    graph = json.loads(png.read_text_chunks((tmp_path / "inpainted.png").read_bytes())["prompt"])
    kinds = {node["class_type"] for node in graph.values()}
    if model == "tiny_sd15_inpaint":  # detected from the header: 9 input channels
        assert "InpaintModelConditioning" in kinds and "SetLatentNoiseMask" not in kinds
    else:
        assert "SetLatentNoiseMask" in kinds and "InpaintModelConditioning" not in kinds


@pytest.mark.comfyui
def test_a_webp_input_sets_the_size_and_relative_paths_work(env, tiny_sd15_clear, tmp_path):
    blocks(tmp_path / "wide.webp", 80, 48, fmt="WEBP", lossless=True)
    record = cli_json(env, "a field", "--checkpoint", str(tiny_sd15_clear), "--image", "wide.webp", "--denoise", "0.5",
                      "--steps", "1", "-o", str(tmp_path / "out.png"), cwd=tmp_path)
    assert (record["width"], record["height"]) == (80, 48)
    assert record["inputs"]["image"]["path"] == str(tmp_path / "wide.webp")
    assert os.path.getsize(tmp_path / "out.png") > 0 and Image.open(io.BytesIO((tmp_path / "out.png").read_bytes()))


@pytest.mark.comfyui
def test_outpainting_draws_a_border_and_keeps_the_image(env, tiny_sd15_clear, tmp_path):
    source = blocks(tmp_path / "photo.png", 64, 64, seed=6)
    record = cli_json(env, "a wider view", "--checkpoint", str(tiny_sd15_clear), "--image", str(source),
                      "--extend", "0,0,32,0", "--steps", "2", "--seed", "3", "-o", str(tmp_path / "wide.png"))
    assert (record["width"], record["height"], record["extend"], record["denoise"]) == (96, 64, [0, 0, 32, 0], 1.0)
    Draft202012Validator(RESULT).validate(record)
    made = pixels(tmp_path / "wide.png")
    assert abs(made[:, :64] - pixels(source)).mean() < 1.0, "the original part is kept"
    assert abs(made[:, 72:] - 127.5).mean() > 5, "the border is drawn, not left grey"
    graph = json.loads(png.read_text_chunks((tmp_path / "wide.png").read_bytes())["prompt"])
    assert "ImagePadForOutpaint" in {node["class_type"] for node in graph.values()}
