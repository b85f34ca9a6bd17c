"""Read a .safetensors header without torch: validate it and tell what model it holds.

Layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the tensor data. Nothing here loads tensor data, so a pickle or a crafted file cannot run code.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from imagegen.util.errors import ImagegenError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own reference limit
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class Header:
    path: Path
    tensors: dict[str, dict]
    metadata: dict = field(default_factory=dict)

    def shape(self, name: str) -> list[int] | None:
        tensor = self.tensors.get(name)
        return tensor["shape"] if tensor else None

    def find(self, suffix: str) -> tuple[str, list[int]] | None:
        for name, tensor in self.tensors.items():
            if name.endswith(suffix):
                return name, tensor["shape"]
        return None

    def dim(self, name: str, index: int, ndim: int = 2) -> int | None:
        """Dimension `index` of tensor `name` (None when absent), refusing a tensor of the wrong rank."""
        shape = self.shape(name)
        if shape is None:
            return None
        if len(shape) < ndim:
            raise _invalid(self.path, f"tensor {name!r} has shape {shape}, but a {ndim}-D weight is expected")
        return shape[index]

    def has_prefix(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self.tensors)

    def dtypes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + 1
        return counts


def _invalid(path: Path, why: str) -> ImagegenError:
    return ImagegenError("invalid_model_file", f"{path}: {why}",
                         hint=f"Use an intact .safetensors file (`imagegen models inspect {path}` checks one); "
                              "a partial download must be fetched again.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: Path) -> Header:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ImagegenError("invalid_model_file", f"{path.name}: only .safetensors files are accepted "
                            "(pickle formats like .ckpt/.pt can run code on load)",
                            hint="Convert the model to .safetensors, or download its .safetensors release.")
    try:
        if not path.is_file() and path.exists():
            if path.is_dir():
                raise ImagegenError("invalid_model_file", f"{path}: is a directory, not a model file",
                                    hint="Pass the .safetensors file itself.")
            raise _invalid(path, "is not a regular file")
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _invalid(path, "too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise _invalid(path, f"header length {length} is out of bounds for a {size}-byte file")
            raw = handle.read(length)
    except FileNotFoundError as exc:
        raise ImagegenError("invalid_model_file", f"{path}: no such file", hint="Check the path.") from exc
    except IsADirectoryError as exc:
        raise ImagegenError("invalid_model_file", f"{path}: is a directory, not a model file",
                            hint="Pass the .safetensors file itself.") from exc
    except OSError as exc:
        raise _invalid(path, f"cannot be read: {exc.strerror or exc}") from exc
    if len(raw) != length:
        raise _invalid(path, f"header is {len(raw)} bytes, but its length field says {length} (truncated?)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _invalid(path, f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _invalid(path, f"header is a JSON {type(header).__name__}, not an object of tensors")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _invalid(path, "__metadata__ is not an object of strings")
    _check_tensors(path, header, size - 8 - length)
    return Header(path=path, tensors=header, metadata=metadata)


def _check_tensors(path: Path, header: dict, data_size: int) -> None:
    """Every field detect() and ComfyUI rely on: types, ranks, sizes, and offsets that neither overlap
    nor point past the end of the file."""
    spans = []
    for name, tensor in header.items():
        if not isinstance(tensor, dict):
            raise _invalid(path, f"tensor {name!r} is a JSON {type(tensor).__name__}, not an object")
        missing = [key for key in ("dtype", "shape", "data_offsets") if key not in tensor]
        if missing:
            raise _invalid(path, f"tensor {name!r} has no {', '.join(missing)}")
        dtype, shape, offsets = tensor["dtype"], tensor["shape"], tensor["data_offsets"]
        if not isinstance(dtype, str) or not dtype.isascii() or not dtype.replace("_", "").isalnum():
            raise _invalid(path, f"tensor {name!r} has dtype {dtype!r}, not a dtype name such as F16")
        if not isinstance(shape, list) or not all(_is_int(dim) and dim >= 0 for dim in shape):
            raise _invalid(path, f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if len(shape) > 8:
            raise _invalid(path, f"tensor {name!r} has {len(shape)} dimensions (at most 8 are expected)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) for x in offsets)):
            raise _invalid(path, f"tensor {name!r} has data_offsets {offsets!r}, not a [start, end] pair of integers")
        start, end = offsets
        if not 0 <= start <= end <= data_size:
            raise _invalid(path, f"tensor {name!r} has data offsets {start}..{end} outside the file's "
                                 f"{data_size} data bytes (truncated?)")
        count = 1
        for dim in shape:
            count *= dim
        if dtype in DTYPE_BYTES and count * DTYPE_BYTES[dtype] != end - start:
            raise _invalid(path, f"tensor {name!r}: shape {shape} of {dtype} does not match its {end - start} bytes")
        if start < end:
            spans.append((start, end, name))
    spans.sort()
    for (_s1, end1, name1), (start2, _e2, name2) in zip(spans, spans[1:], strict=False):
        if start2 < end1:
            raise _invalid(path, f"tensors {name1!r} and {name2!r} overlap in the file's data")


@dataclass
class Detected:
    family: str | None         # sd15, sdxl, flux, upscale, t5, clip_l, vae, or None
    kind: str                  # checkpoint, diffusion_model, text_encoder, vae, upscale_model, unknown
    details: dict = field(default_factory=dict)


def detect(header: Header) -> Detected:
    """Tell the model family and kind from tensor names and shapes alone."""
    details: dict = {"tensors": len(header.tensors), "dtypes": header.dtypes()}
    unet = "model.diffusion_model."
    if header.has_prefix(unet + "double_blocks.") or header.has_prefix("double_blocks."):
        prefix = unet if header.has_prefix(unet + "double_blocks.") else ""
        details.update(hidden_size=header.dim(prefix + "img_in.weight", 0),
                       context_dim=header.dim(prefix + "txt_in.weight", 1),
                       guidance_embed=header.has_prefix(prefix + "guidance_in."))
        return Detected("flux", "checkpoint" if prefix else "diffusion_model", details)
    if header.has_prefix(unet + "input_blocks."):
        found = header.find("attn2.to_k.weight")
        context = header.dim(found[0], 1) if found else None
        details["context_dim"] = context
        family = {768: "sd15", 2048: "sdxl", 1024: "sd2"}.get(context or 0)
        conv_in = header.shape(unet + "input_blocks.0.0.weight") or []
        in_channels = conv_in[1] if len(conv_in) == 4 else None
        details.update(in_channels=in_channels, inpaint=in_channels == 9)  # latent + mask + masked image
        if header.has_prefix(unet + "label_emb.") and context == 2048:
            family = "sdxl"
        return Detected(family, "checkpoint", details)
    if header.has_prefix("encoder.block.") or header.has_prefix("shared.weight"):
        details["d_model"] = header.dim("shared.weight", 1)
        return Detected("t5", "text_encoder", details)
    found = header.find("text_model.embeddings.token_embedding.weight")
    if found:
        width = details["width"] = header.dim(found[0], 1)
        return Detected({768: "clip_l", 1280: "clip_g"}.get(width or 0), "text_encoder", details)
    if header.has_prefix("encoder.down.") or header.has_prefix("decoder.up."):
        details["latent_channels"] = header.dim("decoder.conv_in.weight", 1, ndim=4)
        return Detected("vae", "vae", details)
    if (header.has_prefix("body.") or header.has_prefix("model.") and header.find("conv_first.weight")
            or header.has_prefix("conv_first.")):
        return Detected("upscale", "upscale_model", details)
    return Detected(None, "unknown", details)


def check_bundle_files(bundle, resolve) -> None:
    """Refuse a Flux bundle whose encoders cannot feed its model, before ComfyUI fails deep inside.

    `resolve(model_file)` gives the on-disk path of a file, or None when it is not present yet.
    """
    if bundle.family != "flux":
        return
    present = {role: resolve(f) for role, f in bundle.files.items()}
    if any(p is None for p in present.values()):
        return
    model = detect(read_header(present["diffusion_model"]))
    t5 = detect(read_header(present["t5"]))
    clip = detect(read_header(present["clip_l"]))
    vae = detect(read_header(present["vae"]))
    problems = []
    if model.family != "flux":
        problems.append(f"diffusion_model {present['diffusion_model'].name} is not a Flux model "
                        f"(looks like {model.family or 'unknown'})")
    if t5.family != "t5":
        problems.append(f"t5 {present['t5'].name} is not a T5 text encoder (looks like {t5.family or t5.kind})")
    elif model.details.get("context_dim") and t5.details.get("d_model") and \
            model.details["context_dim"] != t5.details["d_model"]:
        problems.append(f"the model expects {model.details['context_dim']}-wide text features but T5 "
                        f"{present['t5'].name} gives {t5.details['d_model']}")
    if clip.family != "clip_l":
        problems.append(f"clip_l {present['clip_l'].name} is not a CLIP-L text encoder "
                        f"(looks like {clip.family or clip.kind})")
    if vae.family != "vae" or vae.details.get("latent_channels") not in (None, 16):
        problems.append(f"vae {present['vae'].name} is not the 16-channel Flux VAE")
    if problems:
        raise ImagegenError("incompatible_bundle", f"model {bundle.name!r} cannot load: " + "; ".join(problems),
                            hint="Fix the bundle's files in models.yaml; "
                                 "`imagegen models inspect FILE` shows what each file is.")
