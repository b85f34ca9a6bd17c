import errno
import json
import os
import subprocess

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
    assert output.plan_outputs(str(tmp_path) + "/", 2, names, False, tmp_path) == \
        [tmp_path / "a.png", tmp_path / "b.png"]
    assert output.plan_outputs(str(tmp_path / "x.png"), 2, names, False, tmp_path) == \
        [tmp_path / "x-1.png", tmp_path / "x-2.png"]
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
              "cfg": 7.0, "seed": 42, "width": 512, "height": 768, "model": "sd15", "family": "sd15",
              "imagegen_version": "0.1.0"}
    text = png.a1111_parameters(record)
    assert text.startswith("a fox\nNegative prompt: blurry\nSteps: 20, Sampler: euler")
    assert "Seed: 42" in text and "Size: 512x768" in text


def test_unwritable_output_dir_stops_before_anything_starts(tmp_path):
    """-o /proc/x.png used to render the image and then lose it with internal_error."""
    from conftest import run_cli

    result = run_cli("generate", "a cat", "-o", "/proc/x.png", "--json", timeout=120)
    assert result.returncode == 2, result.stderr
    error = json.loads(result.stderr.decode().strip().splitlines()[-1])
    assert error["code"] == "output_not_writable" and "/proc" in error["message"] and error["hint"]
    assert not (tmp_path / "imagegen-home" / "state" / "workers").exists()  # no worker was started
    plain = run_cli("generate", "a cat", "-o", "/proc/x.png", timeout=120)
    assert plain.returncode == 2 and b"error:" in plain.stderr and b"hint:" in plain.stderr


def test_write_atomic_falls_back_to_rename_where_links_are_unsupported(tmp_path, monkeypatch):
    """exFAT/SMB refuse os.link: the image must still land, without clobbering and without a temp file."""
    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "img.png"
    output.write_atomic(target, b"first", overwrite=False)
    assert target.read_bytes() == b"first"
    with pytest.raises(ImagegenError) as caught:
        output.write_atomic(target, b"second", overwrite=False)
    assert caught.value.code == "output_exists" and target.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["img.png"]


def test_write_atomic_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(ImagegenError) as caught:
        output.write_atomic(tmp_path / "img.png", b"data", overwrite=True)
    assert caught.value.code == "output_not_writable"
    assert os.listdir(tmp_path) == []


def test_full_disk_is_disk_full_with_a_hint(tmp_path):
    """A real full file system (a 64 KiB tmpfs): disk_full naming the folder, and no .partial left."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode().strip()}")
    try:
        with pytest.raises(ImagegenError) as caught:
            output.write_atomic(mount / "img.png", bytes(1024 * 1024), overwrite=False)
        assert caught.value.code == "disk_full" and str(mount) in caught.value.hint
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)
