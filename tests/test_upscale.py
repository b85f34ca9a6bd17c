"""`imagegen upscale`: inputs, model and outputs checked before any worker starts, and real upscales
through the real CLI on a local ComfyUI worker (CPU) with a tiny random-weight ESRGAN."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from conftest import run_cli
from jsonschema import Draft202012Validator
from PIL import Image
from safetensors_util import write_safetensors

from imagegen.comfy import png
from imagegen.engine import upscale
from imagegen.engine.schema import RESULT
from imagegen.util.errors import ImagegenError


def _picture(path: Path, size=(64, 48), exif_rotate: bool = False) -> Path:
    image = Image.new("RGB", size)
    for x in range(size[0]):
        for y in range(size[1]):
            image.putpixel((x, y), ((x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256))
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated 90 degrees: the worker's LoadImage turns it upright
        image.save(path, exif=exif.tobytes())
    else:
        image.save(path)
    return path


@pytest.fixture
def fake_upscaler(tmp_path) -> Path:
    return write_safetensors(tmp_path / "up.safetensors", {"conv_first.weight": ("F32", [8, 3, 3, 3]),
                                                          "body.0.rdb1.conv1.weight": ("F32", [8, 8, 3, 3])})


def test_plan_names_outputs_after_their_inputs_and_sizes_them_by_the_scale(tmp_path, fake_upscaler):
    first = _picture(tmp_path / "cat.png")
    second = _picture(tmp_path / "dog.jpg", size=(40, 64), exif_rotate=True)
    planned = upscale.plan(upscale.UpscaleRequest([first, second], scale=1.5, model=str(fake_upscaler),
                                                  output=str(tmp_path / "big") + "/"))
    assert [t.name for t in planned.targets] == ["cat-x1.5.png", "dog-x1.5.png"]
    assert [(p.width, p.height) for p in planned.jobs] == [(96, 72), (96, 60)]  # the JPEG's EXIF turns it
    assert planned.sources[0].sha256 == hashlib.sha256(first.read_bytes()).hexdigest()
    assert planned.bundle.family == "upscale"


@pytest.mark.parametrize("change, code, words", [
    ({"scale": 9}, "invalid_argument", "outside 1..8"),
    ({"scale": 0.5}, "invalid_argument", "outside 1..8"),
    ({"model": "sd15"}, "invalid_argument", "not an upscale model"),
    ({"model": "no-such-model"}, "unknown_model", "no-such-model"),
    ({"scale": 8, "big": True}, "invalid_argument", "pixel limit"),
])
def test_bad_requests_are_refused_up_front(tmp_path, fake_upscaler, change, code, words):
    image = _picture(tmp_path / "in.png", size=(2048 + 1024, 16) if change.pop("big", False) else (64, 48))
    with pytest.raises(ImagegenError) as caught:
        upscale.plan(upscale.UpscaleRequest([image], output=str(tmp_path), **{"model": str(fake_upscaler), **change}))
    assert caught.value.code == code and words in caught.value.message


def test_stdout_takes_one_image_and_a_folder_is_refused_by_name(tmp_path, fake_upscaler):
    images = [_picture(tmp_path / "a.png"), _picture(tmp_path / "b.png")]
    with pytest.raises(ImagegenError) as caught:
        upscale.plan(upscale.UpscaleRequest(images, output="-", model=str(fake_upscaler)))
    assert "2 images" in caught.value.message and "--count" not in caught.value.message
    with pytest.raises(ImagegenError) as caught:
        upscale.plan(upscale.UpscaleRequest([tmp_path], output=str(tmp_path / "out"), model=str(fake_upscaler)))
    assert caught.value.code == "invalid_source_image" and "--image" not in caught.value.message
    assert f"{tmp_path}/*.png" in caught.value.hint


def test_existing_outputs_and_name_clashes_are_refused(tmp_path, fake_upscaler):
    image = _picture(tmp_path / "in.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "in-x2.png").write_bytes(b"mine")
    request = upscale.UpscaleRequest([image], model=str(fake_upscaler), output=str(tmp_path / "out"))
    with pytest.raises(ImagegenError) as caught:
        upscale.plan(request)
    assert caught.value.code == "output_exists"
    request.overwrite = True
    assert upscale.plan(request).targets == [tmp_path / "out" / "in-x2.png"]
    (tmp_path / "b").mkdir()
    twin = _picture(tmp_path / "b" / "in.png")
    with pytest.raises(ImagegenError) as caught:
        upscale.plan(upscale.UpscaleRequest([image, twin], model=str(fake_upscaler), output=str(tmp_path / "c")))
    assert "would both be written" in caught.value.message


def test_a_corrupt_input_is_exit_2_before_any_worker_starts(tmp_path, fake_upscaler):
    bad = tmp_path / "broken.png"
    bad.write_bytes(_picture(tmp_path / "good.png").read_bytes()[:90])  # a truncated PNG
    done = run_cli("upscale", str(bad), "-m", str(fake_upscaler), "-o", str(tmp_path / "out"), "--json",
                   env={"IMAGEGEN_RUNTIME": "remote", "IMAGEGEN_REMOTE_WORKERS": "http://127.0.0.1:9#x"})
    assert done.returncode == 2, done.stderr.decode()
    error = json.loads(done.stderr.decode().strip().splitlines()[-1])
    assert "broken.png" in error["message"] and error["hint"]
    assert not (tmp_path / "out").exists()


# --- real upscales ---------------------------------------------------------------------------
@pytest.mark.comfyui
def test_upscale_doubles_the_size_through_the_real_cli(comfyui_dir, tiny_esrgan, tmp_path):
    env = {"IMAGEGEN_HOME": str(tmp_path / "home"), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir),
           "IMAGEGEN_RUNTIME": "local", "IMAGEGEN_KEEP_WARM": "60"}
    source = _picture(tmp_path / "fox.png", size=(64, 48))
    rotated = _picture(tmp_path / "owl.jpg", size=(40, 64), exif_rotate=True)
    try:
        done = run_cli("upscale", str(source), str(rotated), "--scale", "2", "-m", str(tiny_esrgan),
                       "-o", str(tmp_path / "out"), "--json", env=env)
        assert done.returncode == 0, done.stderr.decode()
        first, second = (json.loads(line) for line in done.stdout.decode().splitlines())
        assert not [e for r in (first, second) for e in Draft202012Validator(RESULT).iter_errors(r)]
        assert first["path"] == str(tmp_path / "out" / "fox-x2.png")
        assert (first["width"], first["height"]) == (128, 96)
        assert (second["width"], second["height"]) == (128, 80)  # EXIF orientation applied: 64x40 upright
        with Image.open(first["path"]) as image:
            assert image.size == (128, 96)
        chunk = json.loads(png.read_text_chunks(Path(first["path"]).read_bytes())["imagegen"])
        assert chunk["family"] == "upscale" and chunk["model"] == tiny_esrgan.stem
        assert chunk["upscale"]["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert chunk["upscale"]["scale"] == 2.0 and chunk["upscale"]["model"] == tiny_esrgan.stem

        again = run_cli("upscale", str(source), "-m", str(tiny_esrgan), "-o", str(tmp_path / "out"), env=env)
        assert again.returncode == 2 and b"exists already" in again.stderr, "never overwritten without --overwrite"
        piped = run_cli("upscale", str(source), "--scale", "1.5", "-m", str(tiny_esrgan), "-o", "-", env=env)
        assert piped.returncode == 0, piped.stderr.decode()
        with Image.open(io.BytesIO(piped.stdout)) as image:
            assert image.size == (96, 72)
    finally:
        run_cli("stop", "--all", env=env)
