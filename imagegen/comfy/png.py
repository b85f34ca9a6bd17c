"""PNG text chunks: what an image carries (ComfyUI's graph, A1111 `parameters`, imagegen's own record)."""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
