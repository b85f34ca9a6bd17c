import os

import pytest

from imagegen.comfy import png
from imagegen.engine import output
from imagegen.util.errors import ImagegenError

PNG_1x1 = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108020000009077"
                        "53de0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082")


def test_text_chunks_round_trip_and_leave_pixels_alone():
    tagged = png.add_text_chunks(PNG_1x1, {"parameters": "a robot\nSteps: 2", "imagegen": '{"prompt": "北京の猫"}'})
    chunks = png.read_text_chunks(tagged)
    assert chunks["parameters"] == "a robot\nSteps: 2" and chunks["imagegen"] == '{"prompt": "北京の猫"}'
    idat = [body for kind, body, _ in png.iter_chunks(tagged) if kind == b"IDAT"]
    assert idat == [body for kind, body, _ in png.iter_chunks(PNG_1x1) if kind == b"IDAT"]
    assert png.png_size(tagged) == (1, 1)


def test_plan_outputs(tmp_path):
    names = ["a.png", "b.png"]
    assert output.plan_outputs(str(tmp_path) + "/", 2, names, False, tmp_path) == [tmp_path / "a.png", tmp_path / "b.png"]
    assert output.plan_outputs(str(tmp_path / "x.png"), 2, names, False, tmp_path) == [tmp_path / "x-1.png", tmp_path / "x-2.png"]
    assert output.plan_outputs("-", 1, names[:1], False, tmp_path) == [None]
    with pytest.raises(ImagegenError, match="single PNG"):
        output.plan_outputs("-", 2, names, False, tmp_path)
    (tmp_path / "x.png").write_bytes(b"old")
    with pytest.raises(ImagegenError) as caught:
        output.plan_outputs(str(tmp_path / "x.png"), 1, names[:1], False, tmp_path)
    assert caught.value.code == "output_exists"
    assert output.plan_outputs(str(tmp_path / "x.png"), 1, names[:1], True, tmp_path) == [tmp_path / "x.png"]
    with pytest.raises(ImagegenError) as caught:
        output.plan_outputs(str(tmp_path / "x.png" / "y.png"), 1, names[:1], False, tmp_path)
    assert caught.value.code == "output_not_writable"
    with pytest.raises(ImagegenError, match="PNG"):
        output.plan_outputs(str(tmp_path / "x.jpg"), 1, names[:1], False, tmp_path)


def test_write_atomic_never_clobbers_and_leaves_no_partial(tmp_path):
    target = tmp_path / "out" / "img.png"
    output.write_atomic(target, b"first", overwrite=False)
    with pytest.raises(ImagegenError):
        output.write_atomic(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first"
    output.write_atomic(target, b"third", overwrite=True)
    assert target.read_bytes() == b"third"
    assert os.listdir(target.parent) == ["img.png"]


def test_a1111_parameters_text():
    record = {"prompt": "a fox", "negative": "blurry", "steps": 20, "sampler": "euler", "scheduler": "normal",
              "cfg": 7.0, "seed": 42, "width": 512, "height": 768, "model": "sd15", "family": "sd15", "imagegen_version": "0.1.0"}
    text = png.a1111_parameters(record)
    assert text.startswith("a fox\nNegative prompt: blurry\nSteps: 20, Sampler: euler")
    assert "Seed: 42" in text and "Size: 512x768" in text
