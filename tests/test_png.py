"""PNG chunks (comfy/png) and `--from IMAGE` (comfy/provenance) on hostile files: bounded, never a hang
or an internal_error."""

import json
import os
import struct
import time
import zlib

import pytest
from conftest import run_cli
from test_output import PNG_1x1

from imagegen.comfy import png, provenance
from imagegen.util.errors import ImagegenError


def chunk(kind: bytes, body: bytes, crc: int | None = None, length: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF if crc is None else crc
    return struct.pack(">I", len(body) if length is None else length) + kind + body + struct.pack(">I", crc)


def with_chunks(*chunks: bytes) -> bytes:
    """PNG_1x1 with these chunks inserted before IEND."""
    iend = PNG_1x1.rindex(b"IEND") - 4
    return PNG_1x1[:iend] + b"".join(chunks) + PNG_1x1[iend:]


def itxt(key: str, text: bytes, compressed: bool = True) -> bytes:
    blob = zlib.compress(text, 9) if compressed else text
    return chunk(b"iTXt", key.encode() + b"\0" + bytes([int(compressed), 0]) + b"\0\0" + blob)


BOMB = itxt("imagegen", b"{" + b" " * (10 * 1024 * 1024) + b"}")
RECORD = json.dumps({"prompt": "a fox", "seed": 3, "steps": 2, "width": 64, "height": 64}).encode()
HOSTILE = {  # name: (file bytes, what the message must say)
    "zip-bomb-itxt": (with_chunks(BOMB), "inflates to more than"),
    "zip-bomb-ztxt": (with_chunks(chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"x" * 10**7, 9))),
                      "inflates to more than"),
    "chunk-past-end": (PNG_1x1[:33] + chunk(b"tEXt", b"k\0v", length=10**6), "past the end"),
    "chunk-length-huge": (PNG_1x1[:33] + chunk(b"tEXt", b"k\0v", length=2**32 - 1), "past the end"),
    "bad-crc": (with_chunks(chunk(b"tEXt", b"imagegen\0" + RECORD, crc=1)), "CRC"),
    "itxt-truncated": (with_chunks(chunk(b"iTXt", b"imagegen\0")), "truncated"),
    "itxt-not-zlib": (with_chunks(chunk(b"iTXt", b"imagegen\0\1\0\0\0not zlib at all")), "not valid compressed"),
    "itxt-cut-zlib": (with_chunks(chunk(b"iTXt", b"imagegen\0\1\0\0\0" + zlib.compress(RECORD)[:-6])), "truncated"),
    "itxt-not-utf8": (with_chunks(itxt("imagegen", b"\xff\xfe", compressed=False)), "not UTF-8"),
    "no-keyword": (with_chunks(chunk(b"tEXt", b"no separator")), "no valid keyword"),
    "imagegen-list": (with_chunks(chunk(b"tEXt", b"imagegen\0[1, 2]")), "not a JSON object"),
    "imagegen-not-json": (with_chunks(chunk(b"tEXt", b"imagegen\0{oops")), "malformed"),
    "seed-a-list": (with_chunks(chunk(b"tEXt", b'imagegen\0{"prompt": "x", "seed": [1]}')), "'seed' parameter"),
    "prompt-a-number": (with_chunks(chunk(b"tEXt", b'imagegen\0{"prompt": 5}')), "'prompt' parameter"),
    "a1111-bad-size": (with_chunks(chunk(b"tEXt", b"parameters\0a fox\nSteps: 2, Size: 512")), "malformed"),
    "a1111-bad-seed": (with_chunks(chunk(b"tEXt", b"parameters\0a fox\nSteps: 2, Seed: 1e5x")), "malformed"),
    "a1111-long-settings": (with_chunks(chunk(b"tEXt", b"parameters\0a fox\nSteps: 2, " + b"a" * 500_000)),
                            "settings line"),
    "comfy-graph-list": (with_chunks(chunk(b"tEXt", b"prompt\0[1]")), "not a ComfyUI graph"),
    "not-a-png": (b"GIF89a" + bytes(100), "not a PNG"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_pngs_are_invalid_source_image(tmp_path, case):
    data, fragment = HOSTILE[case]
    image = tmp_path / f"{case}.png"
    image.write_bytes(data)
    started = time.monotonic()
    with pytest.raises(ImagegenError) as caught:
        provenance.read_parameters(image)
    assert caught.value.code == "invalid_source_image" and fragment in caught.value.message, caught.value.message
    assert caught.value.hint and time.monotonic() - started < 30


def test_the_zip_bomb_is_small_on_disk():
    assert len(BOMB) < 20_000  # 10 MB of text in a ~10 KB file


def _from_error(tmp_path, source) -> dict:
    result = run_cli("generate", "--from", str(source), "-o", str(tmp_path / "out.png"), "--json", timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert b"Traceback" not in result.stderr
    return json.loads(result.stderr.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["zip-bomb-itxt", "chunk-past-end", "bad-crc", "itxt-truncated", "seed-a-list",
                                  "a1111-long-settings"])
def test_hostile_png_through_the_cli(tmp_path, case):
    image = tmp_path / f"{case}.png"
    image.write_bytes(HOSTILE[case][0])
    error = _from_error(tmp_path, image)
    assert error["code"] == "invalid_source_image" and HOSTILE[case][1] in error["message"] and error["hint"]
    assert not (tmp_path / "out.png").exists()


def test_from_dev_zero_a_fifo_or_a_folder_returns_at_once(tmp_path):
    """--from /dev/zero used to read for ever."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for source, fragment in (("/dev/zero", "not a regular file"), (fifo, "not a regular file"),
                             (tmp_path, "is a directory"), (tmp_path / "missing.png", "no such file")):
        error = _from_error(tmp_path, source)
        assert error["code"] == "invalid_source_image" and fragment in error["message"], error


def test_a_huge_file_is_refused_without_reading_it(tmp_path):
    big = tmp_path / "big.png"
    with big.open("wb") as handle:  # sparse: 65 MiB on paper, nothing on disk
        handle.write(PNG_1x1)
        handle.truncate(65 * 1024 * 1024)
    with pytest.raises(ImagegenError, match="larger than the 64 MiB"):
        provenance.read_parameters(big)


def test_good_chunks_still_read_and_ztxt_is_understood():
    data = with_chunks(itxt("imagegen", RECORD), chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"a fox")))
    chunks = png.read_text_chunks(data)
    assert json.loads(chunks["imagegen"])["seed"] == 3 and chunks["parameters"] == "a fox"
    assert png.png_size(data) == (1, 1)


def test_a_good_source_image_still_reproduces(tmp_path):
    image = tmp_path / "ok.png"
    image.write_bytes(with_chunks(chunk(b"tEXt", b"imagegen\0" + RECORD)))
    assert provenance.read_parameters(image) == {"prompt": "a fox", "seed": 3, "steps": 2, "width": 64, "height": 64}
