"""Where images go and what they carry: output paths, atomic writes, PNG text chunks.

stdout is data: one absolute path per image, or one JSON object per image with --json.
A file is written under a temporary name and renamed, so a partial file never has the final name.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import time
import zlib
from pathlib import Path

from .errors import ImagegenError

RESULT_SCHEMA = "imagegen.result/1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def slugify(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def default_name(prompt: str, seed: int, index: int = 0) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{slugify(prompt)}-{seed}" + (f"-{index}" if index else "") + ".png"


def plan_outputs(output: str | None, count: int, names: list[str], overwrite: bool, default_dir: Path) -> list[Path | None]:
    """Decide every output path before any work starts; None means stdout."""
    if output == "-":
        if count != 1:
            raise ImagegenError("invalid_argument", "-o - writes a single PNG to stdout, but --count is %d" % count,
                                hint="Use --count 1 with -o -, or -o DIR for several images.")
        return [None]
    if output is None:
        targets = [default_dir / name for name in names]
    else:
        path = Path(output).expanduser()
        if output.endswith(("/", os.sep)) or path.is_dir():
            targets = [path / name for name in names]
        else:
            if path.suffix.lower() != ".png":
                raise ImagegenError("invalid_argument", f"-o {output}: output files are PNG; name it *.png or pass a directory",
                                    hint="For example -o robot.png or -o out/.")
            targets = [path] if count == 1 else [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]
    for target in targets:
        _check_writable(target.absolute(), overwrite)
    return [t.absolute() for t in targets]


def _check_writable(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise ImagegenError("output_not_writable", f"{target} is a directory, not a file name")
    if target.exists() and not overwrite:
        raise ImagegenError("output_exists", f"{target} exists already")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ImagegenError("output_not_writable", f"{parent} is a file, so {target} cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ImagegenError("output_not_writable", f"no permission to write in {parent}")


def write_atomic(target: Path, data: bytes, overwrite: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails if the name appeared meanwhile: never clobber
            os.unlink(tmp)
    except FileExistsError:
        os.unlink(tmp)
        raise ImagegenError("output_exists", f"{target} appeared while the image was rendering") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_stdout(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


# --- PNG text chunks ---------------------------------------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def text_chunk(key: str, value: str) -> bytes:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def iter_chunks(data: bytes):
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        yield kind, data[offset + 8:offset + 8 + length], offset
        offset += 12 + length


def add_text_chunks(data: bytes, entries: dict[str, str]) -> bytes:
    """Insert text chunks before IEND, leaving the pixel data byte for byte as ComfyUI wrote it."""
    for kind, _body, offset in iter_chunks(data):
        if kind == b"IEND":
            extra = b"".join(text_chunk(k, v) for k, v in entries.items())
            return data[:offset] + extra + data[offset:]
    raise ValueError("PNG has no IEND chunk")


def read_text_chunks(data: bytes) -> dict[str, str]:
    found = {}
    for kind, body, _offset in iter_chunks(data):
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            found[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _translated, _, text = rest.partition(b"\0")
            found[key.decode("latin-1")] = (zlib.decompress(text) if compressed else text).decode("utf-8")
    return found


def png_size(data: bytes) -> tuple[int, int]:
    for kind, body, _offset in iter_chunks(data):
        if kind == b"IHDR":
            return struct.unpack(">II", body[:8])
    raise ValueError("PNG has no IHDR chunk")


def a1111_parameters(record: dict) -> str:
    """The `parameters` text A1111-style tools read."""
    negative = f"\nNegative prompt: {record['negative']}" if record.get("negative") else ""
    fields = [f"Steps: {record['steps']}", f"Sampler: {record['sampler']}", f"Schedule type: {record['scheduler']}",
              f"CFG scale: {record['cfg']}", f"Seed: {record['seed']}", f"Size: {record['width']}x{record['height']}",
              f"Model: {record['model']}"]
    if record.get("model_hash"):
        fields.insert(-1, f"Model hash: {record['model_hash'][:10]}")
    if record.get("family") == "flux":
        fields.append(f"Guidance: {record['guidance']}")
    if record.get("denoise", 1.0) < 1.0:
        fields.append(f"Denoising strength: {record['denoise']}")
    return f"{record['prompt']}{negative}\n" + ", ".join(fields) + f", Version: imagegen {record['imagegen_version']}"


def emit_result(record: dict, json_mode: bool, quiet: bool = False) -> None:
    if json_mode:
        print(json.dumps(record), flush=True)
    elif not quiet and record.get("path"):
        print(record["path"], flush=True)
