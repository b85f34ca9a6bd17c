"""Write .safetensors files by hand: headers with chosen tensor names and shapes, zero data."""

from __future__ import annotations

import json
import struct
from pathlib import Path

SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I64": 8}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + count * SIZES[dtype]]}
        offset += count * SIZES[dtype]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path
