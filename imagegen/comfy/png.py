"""PNG text chunks: what an image carries (ComfyUI's graph, A1111 `parameters`, imagegen's own record)."""

from __future__ import annotations

import struct
import zlib

from imagegen.comfy import hires

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def text_chunk(key: str, value: str) -> bytes:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


MAX_CHUNK = 2**31 - 1              # the format's own limit on a chunk's length
MAX_INFLATED = 1024 * 1024          # one compressed text chunk may inflate to at most this
MAX_TEXT_TOTAL = 8 * 1024 * 1024    # all text chunks of one image together


class BadPNG(ValueError):
    """A PNG whose chunk structure or text chunks are malformed."""


def iter_chunks(data: bytes):
    """(kind, body, offset) of each chunk; BadPNG when a chunk runs past the end of the data."""
    if not data.startswith(PNG_SIGNATURE):
        raise BadPNG("not a PNG file")
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        if length > MAX_CHUNK or offset + 12 + length > len(data):
            raise BadPNG(f"chunk {kind!r} at byte {offset} claims {length} bytes, past the end of the file")
        yield kind, data[offset + 8:offset + 8 + length], offset
        offset += 12 + length


def _crc_ok(data: bytes, offset: int, length: int) -> bool:
    (stored,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
    return zlib.crc32(data[offset + 4:offset + 8 + length]) & 0xFFFFFFFF == stored


def _inflate(blob: bytes, key: str) -> bytes:
    """Inflate a compressed text chunk, refusing one that grows past MAX_INFLATED (a zip bomb)."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(blob, MAX_INFLATED)
    except zlib.error as exc:
        raise BadPNG(f"text chunk {key!r} is not valid compressed data ({exc})") from None
    if inflater.unconsumed_tail:
        raise BadPNG(f"text chunk {key!r} inflates to more than {MAX_INFLATED // 1024} KiB")
    if not inflater.eof:
        raise BadPNG(f"text chunk {key!r} is truncated compressed data")
    return text


def add_text_chunks(data: bytes, entries: dict[str, str]) -> bytes:
    """Insert text chunks before IEND, leaving the pixel data byte for byte as ComfyUI wrote it."""
    for kind, _body, offset in iter_chunks(data):
        if kind == b"IEND":
            extra = b"".join(text_chunk(k, v) for k, v in entries.items())
            return data[:offset] + extra + data[offset:]
    raise ValueError("PNG has no IEND chunk")


def read_text_chunks(data: bytes) -> dict[str, str]:
    """tEXt, zTXt and iTXt chunks as {key: text}; BadPNG for a malformed, corrupt or oversized one."""
    found: dict[str, str] = {}
    total = 0
    for kind, body, offset in iter_chunks(data):
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            continue
        if not _crc_ok(data, offset, len(body)):
            raise BadPNG(f"{kind.decode()} chunk at byte {offset} fails its CRC check (a corrupt file)")
        raw_key, separator, rest = body.partition(b"\0")
        key = raw_key.decode("latin-1")
        if not separator or not 1 <= len(raw_key) <= 79:
            raise BadPNG(f"{kind.decode()} chunk at byte {offset} has no valid keyword")
        if kind == b"tEXt":
            text = rest.decode("latin-1")
        elif kind == b"zTXt":
            if not rest or rest[0] != 0:
                raise BadPNG(f"zTXt chunk {key!r} uses an unknown compression method")
            text = _inflate(rest[1:], key).decode("latin-1")
        else:
            if len(rest) < 2:
                raise BadPNG(f"iTXt chunk {key!r} is truncated")
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _translated, _, blob = rest.partition(b"\0")
            try:
                text = (_inflate(blob, key) if compressed else blob).decode("utf-8")
            except UnicodeDecodeError:
                raise BadPNG(f"iTXt chunk {key!r} is not UTF-8 text") from None
        total += len(text)
        if total > MAX_TEXT_TOTAL:
            raise BadPNG(f"the text chunks hold more than {MAX_TEXT_TOTAL // (1024 * 1024)} MiB")
        found[key] = text
    return found


def png_size(data: bytes) -> tuple[int, int]:
    for kind, body, _offset in iter_chunks(data):
        if kind == b"IHDR" and len(body) >= 8:
            return struct.unpack(">II", body[:8])
    raise BadPNG("PNG has no IHDR chunk")


def a1111_parameters(record: dict) -> str:
    """The `parameters` text A1111-style tools read."""
    negative = f"\nNegative prompt: {record['negative']}" if record.get("negative") else ""
    fields = [f"Steps: {record['steps']}", f"Sampler: {record['sampler']}", f"Schedule type: {record['scheduler']}",
              f"CFG scale: {record['cfg']}", f"Seed: {record['seed']}", f"Size: {hires.a1111_size(record)}",
              f"Model: {record['model']}"]
    if record.get("model_hash"):
        fields.insert(-1, f"Model hash: {record['model_hash'][:10]}")
    if record.get("family") == "flux":
        fields.append(f"Guidance: {record['guidance']}")
    if record.get("denoise", 1.0) < 1.0:
        fields.append(f"Denoising strength: {record['denoise']}")
    fields += hires.a1111_fields(record)
    tags = "".join(f" <lora:{_lora_tag_name(lora['name'])}:{lora['strength']:g}>" for lora in record.get("loras") or [])
    return f"{record['prompt']}{tags}{negative}\n" + ", ".join(fields) + \
        f", Version: imagegen {record['imagegen_version']}"


def _lora_tag_name(name: str) -> str:
    """A1111 names a LoRA by its file's stem; a registered one keeps its registry name."""
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name
