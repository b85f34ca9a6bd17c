#!/usr/bin/env python3
"""Full-size random-weight models for the GPU benchmark, built on the machine that runs it.

    IMAGEGEN_COMFYUI_DIR=... python bench/full_models.py OUT_DIR [--models sd15,sdxl,flux-dev]
        [--scale full|small] [--flux-dtype bf16|fp8] [--seed N] [--device auto|cpu|cuda]
    python bench/full_models.py --describe [--models ...] [--scale ...] [--flux-dtype ...]

Files land in ComfyUI's folders under OUT_DIR, with the real files' names, key layouts and dtypes:

  sd15      checkpoints/bench-sd15.safetensors        fp16, 2.13 GB    CheckpointLoaderSimple
  sdxl      checkpoints/bench-sdxl.safetensors        fp16, 6.94 GB    CheckpointLoaderSimple
  flux-dev  diffusion_models/flux1-dev.safetensors     bf16, 23.8 GB    UNETLoader
              (--flux-dtype fp8: flux1-dev-fp8_e4m3fn.safetensors, matrices fp8_e4m3fn, 11.9 GB)
            text_encoders/t5xxl_fp8_e4m3fn.safetensors  fp8 (embedding fp16), 4.89 GB  DualCLIPLoader (flux)
            text_encoders/clip_l.safetensors           fp16, 247 MB     DualCLIPLoader (flux)
            vae/ae.safetensors                         fp32, 335 MB     VAELoader

Checkpoints hold model.diffusion_model.*, first_stage_model.* and the text encoders as the real
files do: SD1.5 cond_stage_model.transformer.text_model.*; SDXL conditioner.embedders.0.transformer.
text_model.* (CLIP-L) and conditioner.embedders.1.model.* (OpenCLIP bigG in open_clip names:
transformer.resblocks.N.attn.in_proj_weight, positional_embedding, text_projection, ...), made by
ComfyUI's own saving conversion. Sizes match the real files to within their headers, except
clip_l.safetensors: the real one lacks text_projection.weight (ComfyUI then warns "clip missing"),
ours carries it (+1.2 MB). `--describe` runs ComfyUI's detection and key processing on meta tensors
of every file and prints what it detects and any missing/unexpected keys (none), plus sizes and
parameter counts, without allocating anything.

OUT_DIR/models.yaml registers them as imagegen user models (bench-sd15, bench-sdxl, bench-flux-dev,
bench-flux-dev-fp8) with `local:` paths: copy it to $IMAGEGEN_HOME/models.yaml (or merge it into
~/.config/imagegen/models.yaml) and `imagegen generate -m bench-sdxl ...` uses the files in place.

Names, shapes and dtypes come from ComfyUI's model classes built on the meta device; each tensor is
made just before a small streaming safetensors writer writes it, so memory stays at about one
tensor whatever the file's size. Weights are N(0, 0.02²), norm weights 1, biases 0 (as
tests/tiny_models.py): activations stay finite (below 100 in the full UNets, so fp16 is safe) and
the decoded image is noise, not NaN-black. With a GPU every tensor is a fresh draw made there; on a
CPU (about 0.2 G draws/s) tensors are windows of a per-file pool of 33.5M draws, which writes at
disk speed. A file already present with the right size is kept (idempotent); a new one is written
to NAME.partial and renamed. Progress (per file: size, seconds) goes to stderr.

--scale small keeps each family's key structure with fewer blocks, so that a CPU can show that
ComfyUI detects and renders it (tests/test_full_models.py): the SD1.5 UNet with one res block per
level and channels 320/320/640/640 (0.75 GB file); the SDXL UNet with the input transformer depths
its detection requires ([0,0,2,2,10,10]) but 320 channels at every level and one-deep middle and
output transformers (2.12 GB file: 1.64 GB of it the whole CLIP-L and CLIP-G); Flux with one double
and one single block at the real hidden size 3072 (1.09 GB). Text encoders and VAEs stay whole:
ComfyUI builds them from fixed configs (CLIP-L 12 layers, CLIP-G 32, T5-XXL 24) and would report
each missing layer, so the small set's T5 is the full 4.9 GB file (same name: either scale reuses it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

MODELS = ("sd15", "sdxl", "flux-dev")
SCALES = ("full", "small")
STD = 0.02
VAE_REGULARIZER = "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"  # the SD3/Flux VAE's latent sampling
# safetensors dtype codes and sizes
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I64": 8}
# Published sizes of the real files (the built-in models.yaml), which the full builds match to within their headers
REAL_SIZES = {"sd15": {"checkpoint": 2132625894}, "sdxl": {"checkpoint": 6938078334},
              "flux-dev": {"diffusion_model": 23802932552, "t5": 4893934904, "clip_l": 246144152, "vae": 335304388}}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str          # safetensors code: F32, F16, BF16, F8_E4M3
    init: str           # "normal" (N(0, STD²)), "ones", "zeros"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class FileSpec:
    role: str           # checkpoint, diffusion_model, t5, clip_l, vae (imagegen's bundle roles)
    folder: str         # ComfyUI folder
    filename: str
    tensors: tuple[TensorSpec, ...]
    parts: dict         # component -> parameter count (unet, vae, clip_l, clip_g, transformer, t5)

    @property
    def size(self) -> int:
        header = _header_bytes(self.tensors)
        return 8 + len(header) + sum(t.nbytes for t in self.tensors)


# --- ComfyUI on the path ----------------------------------------------------------------------

def _comfy_dir() -> Path:
    value = os.environ.get("IMAGEGEN_COMFYUI_DIR")
    if not value:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from imagegen import paths  # noqa: PLC0415 - only for the default checkout location

        found = [c for c in paths.comfyui_dir_candidates() if (c / "main.py").is_file()]
        if not found:
            raise SystemExit("set IMAGEGEN_COMFYUI_DIR to a ComfyUI 0.3.75 checkout")
        value = str(found[0])
    return Path(value).expanduser()


def _comfy_on_path() -> Path:
    comfy = _comfy_dir()
    if str(comfy) not in sys.path:
        sys.path.insert(0, str(comfy))
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: only torch itself uses the GPU here
    return comfy


def _want_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# --- tensor lists from ComfyUI's own classes, on the meta device -------------------------------

def _module_specs(module, dtype: str, prefix: str = "") -> list[TensorSpec]:
    """(name, shape, dtype, init) of every state-dict entry of a module built on meta: weights of
    norm layers (any class named *Norm*) 1, biases 0, everything else N(0, STD²)."""
    owner = {}
    for module_name, sub in module.named_modules():
        for param_name, _ in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False)):
            owner[f"{module_name}.{param_name}" if module_name else param_name] = type(sub).__name__
    specs = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        is_norm = "norm" in owner.get(name, "").lower()
        if name.endswith("bias"):
            init = "zeros"
        elif is_norm:
            init = "ones"
        else:
            init = "normal"
        specs.append(TensorSpec(prefix + name, tuple(tensor.shape), dtype, init))
    return specs


def _meta():
    import torch

    return torch.device("meta")


def _ops():
    _comfy_on_path()
    import comfy.ops

    return comfy.ops.disable_weight_init  # no init work: shapes only


SD15_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False,
             "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
             "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False}
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False,
             "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
             "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
             "num_head_channels": 64,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False}
# small: what ComfyUI's detection still takes as the same family. SD15's detection pins only
# model_channels 320, context 768 and conv (not linear) proj_in, so: one res block per level and
# channel multipliers [1,1,2,2] (four levels, attention on the first three, as SD1.5). SDXL's pins
# the input transformer depths [0,0,2,2,10,10] (and 320 / 2048 / adm 2816), not the channel
# multipliers nor the middle and output depths.
SMALL_UNET = {
    "sd15": {**SD15_UNET, "num_res_blocks": [1, 1, 1, 1], "channel_mult": [1, 1, 2, 2],
             "transformer_depth": [1, 1, 1, 0],
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0]},
    "sdxl": {**SDXL_UNET, "channel_mult": [1, 1, 1], "transformer_depth_middle": 1,
             "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1]},
}
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def unet_specs(family: str, scale: str, prefix: str = "model.diffusion_model.") -> list[TensorSpec]:
    import torch

    _comfy_on_path()
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = (SD15_UNET if family == "sd15" else SDXL_UNET) if scale == "full" else SMALL_UNET[family]
    with _meta():
        unet = UNetModel(**config, dtype=torch.float16, device="meta", operations=_ops())
    return _module_specs(unet, "F16", prefix)


def sd_vae_specs(dtype: str = "F16", prefix: str = "first_stage_model.") -> list[TensorSpec]:
    _comfy_on_path()
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with _meta():
        vae = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
    return _module_specs(vae, dtype, prefix)


def flux_vae_specs(dtype: str = "F32") -> list[TensorSpec]:
    """The Flux ae: ComfyUI's VAELoader builds an AutoencodingEngine (no quant convs) with 16 latent channels."""
    _comfy_on_path()
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {**SD_VAE, "z_channels": 16}
    with _meta():
        vae = AutoencodingEngine(regularizer_config={"target": VAE_REGULARIZER},
                                 encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder",
                                                 "params": ddconfig},
                                 decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder",
                                                 "params": ddconfig})
    return _module_specs(vae, dtype)


def _clip_text(config_name: str):
    import torch

    comfy_dir = _comfy_on_path()
    from comfy.clip_model import CLIPTextModel

    config = json.loads((comfy_dir / "comfy" / config_name).read_text())
    with _meta():
        return CLIPTextModel(config, dtype=torch.float16, device="meta", operations=_ops())


def clip_l_specs(prefix: str = "", projection: bool = True) -> list[TensorSpec]:
    """CLIP-L text model in HF names (text_model.*); the standalone clip_l file also has text_projection."""
    specs = _module_specs(_clip_text("sd1_clip_config.json"), "F16", prefix)
    return [s for s in specs if projection or not s.name.endswith("text_projection.weight")]


def clip_g_open_clip_specs(prefix: str = "conditioner.embedders.1.model.") -> list[TensorSpec]:
    """OpenCLIP bigG text tower in open_clip names, as in sd_xl_base_1.0.safetensors, made with
    ComfyUI's own saving conversion (the inverse of what SDXL.process_clip_state_dict loads)."""
    model = _clip_text("clip_config_bigg.json")
    from comfy import diffusers_convert

    init = {s.name: s.init for s in _module_specs(model, "F16")}
    state = {f"clip_g.transformer.{k}": v for k, v in model.state_dict(keep_vars=True).items()}
    with _meta():
        converted = diffusers_convert.convert_text_enc_state_dict_v20(state, "clip_g")
    specs = []
    for name, tensor in converted.items():
        short = name[len("clip_g."):]
        kind = ("zeros" if short.endswith("bias") else "ones" if "ln_" in short and short.endswith("weight")
                else "normal")
        specs.append(TensorSpec(prefix + short, tuple(tensor.shape), "F16", kind))
    layers = model.num_layers
    assert len(specs) == len(init) - 4 * layers, "q/k/v weights and biases should merge into in_proj_*"
    # open_clip's; ComfyUI loads it into clip_g.logit_scale
    specs.append(TensorSpec(prefix + "logit_scale", (), "F16", "ones"))
    return specs


def flux_specs(scale: str, dtype: str) -> list[TensorSpec]:
    """The Flux.1-dev transformer in BFL names (as flux1-dev.safetensors). dtype bf16, or fp8:
    matrices fp8_e4m3fn, vectors (biases, norm scales) bf16."""
    import torch

    _comfy_on_path()
    from comfy.ldm.flux.model import Flux

    config = dict(FLUX_DEV)
    if scale == "small":
        config.update(depth=1, depth_single_blocks=1)
    with _meta():
        model = Flux(dtype=torch.bfloat16, device="meta", operations=_ops(), **config)
    specs = _module_specs(model, "BF16")
    if dtype == "fp8":
        specs = [TensorSpec(s.name, s.shape, "F8_E4M3" if len(s.shape) >= 2 else "BF16", s.init) for s in specs]
    return specs


def t5xxl_specs() -> list[TensorSpec]:
    """T5-XXL encoder (24 blocks: fixed by ComfyUI's t5_config_xxl.json) as t5xxl_fp8_e4m3fn.safetensors:
    every tensor fp8_e4m3fn except the fp16 token embedding (shared.weight)."""
    import torch

    comfy_dir = _comfy_on_path()
    from comfy.text_encoders.t5 import T5

    config = json.loads((comfy_dir / "comfy" / "text_encoders" / "t5_config_xxl.json").read_text())
    with _meta():
        model = T5(config, dtype=torch.float8_e4m3fn, device="meta", operations=_ops())
    return [TensorSpec(s.name, s.shape, "F16" if s.name == "shared.weight" else "F8_E4M3", s.init)
            for s in _module_specs(model, "F8_E4M3")]


def _count(specs) -> int:
    return sum(s.numel for s in specs)


def model_files(model: str, scale: str = "full", flux_dtype: str = "bf16") -> list[FileSpec]:
    """The files of one benchmark model: each with its tensors (in write order) and parameter counts."""
    if model not in MODELS or scale not in SCALES or flux_dtype not in ("bf16", "fp8"):
        raise ValueError(f"unknown model/scale/dtype {model}/{scale}/{flux_dtype}")
    suffix = "-small" if scale == "small" else ""
    if model in ("sd15", "sdxl"):
        unet = unet_specs(model, scale)
        vae = sd_vae_specs()
        parts = {"unet": _count(unet), "vae": _count(vae)}
        if model == "sd15":
            clip = clip_l_specs("cond_stage_model.transformer.", projection=False)
            parts["clip_l"] = _count(clip)
        else:
            clip_l = clip_l_specs("conditioner.embedders.0.transformer.", projection=False)
            clip_g = clip_g_open_clip_specs()
            clip = clip_l + clip_g
            parts.update(clip_l=_count(clip_l), clip_g=_count(clip_g))
        tensors = _ordered(unet + vae + clip)
        return [FileSpec("checkpoint", "checkpoints", f"bench-{model}{suffix}.safetensors", tensors, parts)]
    transformer = flux_specs(scale, flux_dtype)
    name = "flux1-dev" + ("-fp8_e4m3fn" if flux_dtype == "fp8" else "") + suffix
    t5 = t5xxl_specs()
    clip = clip_l_specs()
    vae = flux_vae_specs()
    return [FileSpec("diffusion_model", "diffusion_models", f"{name}.safetensors", _ordered(transformer),
                     {"transformer": _count(transformer)}),
            FileSpec("t5", "text_encoders", "t5xxl_fp8_e4m3fn.safetensors", _ordered(t5), {"t5": _count(t5)}),
            FileSpec("clip_l", "text_encoders", "clip_l.safetensors", _ordered(clip), {"clip_l": _count(clip)}),
            FileSpec("vae", "vae", "ae.safetensors", _ordered(vae), {"vae": _count(vae)})]


def param_count(model: str, scale: str = "full", flux_dtype: str = "bf16") -> dict[str, int]:
    """Parameters per component (unet, vae, clip_l, clip_g / transformer, t5, clip_l, vae), no allocation."""
    counts: dict[str, int] = {}
    for spec in model_files(model, scale, flux_dtype):
        counts.update(spec.parts)
    return counts


def _ordered(specs: list[TensorSpec]) -> tuple[TensorSpec, ...]:
    """safetensors' own order: widest dtype first (keeps every tensor aligned), then by name."""
    names = [s.name for s in specs]
    assert len(set(names)) == len(names), "duplicate tensor names"
    return tuple(sorted(specs, key=lambda s: (-DTYPE_BYTES[s.dtype], s.name)))


# --- the streaming writer -----------------------------------------------------------------------

def _header_bytes(tensors, metadata: dict | None = None) -> bytes:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the spec allows trailing spaces; 8-byte alignment for the data


def _torch_dtype(code: str):
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
            "I64": torch.int64}[code]


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 1000003 + zlib.crc32(name.encode())) & 0x7FFFFFFFFFFFFFFF


class ExactSource:
    """A fresh N(0, STD²) draw per tensor, on the GPU (tens of GB/s), cast there and copied back."""

    def __init__(self, seed: int, device: str = "cuda"):
        self.seed, self.device = seed, device

    def chunks(self, spec: TensorSpec):
        import torch

        dtype = _torch_dtype(spec.dtype)
        if spec.init != "normal":
            tensor = (torch.zeros if spec.init == "zeros" else torch.ones)(spec.shape, dtype=dtype)
        else:
            generator = torch.Generator(device=self.device).manual_seed(_tensor_seed(self.seed, spec.name))
            value = torch.empty(spec.shape, dtype=torch.bfloat16, device=self.device).normal_(0.0, STD,
                                                                                              generator=generator)
            tensor = value.to(dtype).cpu()
        yield tensor.reshape(-1).view(torch.uint8).numpy().data


class PoolSource:
    """On the CPU, torch's generator makes ~0.2 G values/s on two cores (T5-XXL alone: ~40 s), so
    values come from one pool of POOL N(0, STD²) draws per file, cast once per dtype: each tensor
    is the pool read cyclically from an offset of its own (seeded by its name). The marginals are
    the same normal; the build runs at disk speed."""

    POOL = (1 << 25) + 11  # odd: tensors whose offsets differ by a multiple of a row length are rare

    def __init__(self, seed: int):
        import torch

        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.values = torch.empty(self.POOL, dtype=torch.float32).normal_(0.0, STD, generator=generator)
        self.cast: dict[str, memoryview] = {}

    def _bytes(self, code: str) -> memoryview:
        import torch

        if code not in self.cast:
            self.cast[code] = self.values.to(_torch_dtype(code)).view(torch.uint8).numpy().data
        return self.cast[code]

    def chunks(self, spec: TensorSpec):
        import torch

        if spec.init != "normal":
            tensor = (torch.zeros if spec.init == "zeros" else torch.ones)(spec.shape, dtype=_torch_dtype(spec.dtype))
            yield tensor.reshape(-1).view(torch.uint8).numpy().data
            return
        data, item = self._bytes(spec.dtype), DTYPE_BYTES[spec.dtype]
        position, remaining = _tensor_seed(self.seed, spec.name) % self.POOL, spec.numel
        while remaining:
            take = min(remaining, self.POOL - position)
            yield data[position * item:(position + take) * item]
            remaining -= take
            position = 0


def write_file(target: Path, spec: FileSpec, seed: int = 0, device: str = "cpu", source=None) -> tuple[Path, bool]:
    """Write one file tensor by tensor; (path, built) — built False when it was already there.
    Values come from `source` when given, else the CPU pool (device "cpu") or fresh draws on `device`."""
    expected = spec.size
    if target.is_file() and target.stat().st_size == expected:
        log(f"{target}: present ({expected / 1e9:.2f} GB), kept")
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    header = _header_bytes(spec.tensors)
    started = time.monotonic()
    if source is None:
        source = PoolSource(seed) if device == "cpu" else ExactSource(seed, device)
    written = 0
    next_report = started + 30
    with open(partial, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for tensor_spec in spec.tensors:
            size = 0
            for chunk in source.chunks(tensor_spec):
                handle.write(chunk)
                size += chunk.nbytes
            if size != tensor_spec.nbytes:
                raise RuntimeError(f"{tensor_spec.name}: wrote {size} bytes, expected {tensor_spec.nbytes}")
            written += size
            if time.monotonic() > next_report:
                log(f"  {target.name}: {written / 1e9:.1f} / {expected / 1e9:.1f} GB")
                next_report = time.monotonic() + 30
    if partial.stat().st_size != expected:
        raise RuntimeError(f"{partial}: wrote {partial.stat().st_size} bytes, expected {expected}")
    os.replace(partial, target)
    seconds = time.monotonic() - started
    log(f"{target}: {expected / 1e9:.2f} GB in {seconds:.1f}s ({expected / 1e9 / max(seconds, 1e-9):.2f} GB/s, "
        f"{type(source).__name__}, {device})")
    return target, True


# --- models.yaml --------------------------------------------------------------------------------

FAMILY = {"sd15": "sd15", "sdxl": "sdxl", "flux-dev": "flux"}
RENDER_DEFAULTS = {"sd15": {"width": 512, "height": 512}, "sdxl": {"width": 1024, "height": 1024},
                   "flux-dev": {"width": 1024, "height": 1024}}


def bundle_name(model: str, flux_dtype: str = "bf16") -> str:
    return f"bench-{model}" + ("-fp8" if model == "flux-dev" and flux_dtype == "fp8" else "")


def registry_document(built: dict[str, tuple[str, list[tuple[FileSpec, Path]]]], scale: str) -> dict:
    """imagegen's user models.yaml: one bundle per model, its files `local:` (used in place)."""
    models = {}
    for name, (model, files) in built.items():
        entry: dict = {"family": FAMILY[model],
                       "description": f"random-weight {model} ({scale} size) for the GPU benchmark; built by "
                       "bench/full_models.py",
                       "files": {spec.role: {"local": str(path.resolve()), "folder": spec.folder,
                                             "size": path.stat().st_size}
                                 for spec, path in files}}
        if scale == "full":
            entry["defaults"] = dict(RENDER_DEFAULTS[model])
        models[name] = entry
    return {"schema": 1, "models": models}


def write_registry(out_dir: Path, built: dict, scale: str) -> Path:
    import yaml

    target = out_dir / "models.yaml"
    document = registry_document(built, scale)
    if target.is_file():  # keep the bundles an earlier call built with other --models
        try:
            previous = yaml.safe_load(target.read_text()) or {}
            for name, entry in (previous.get("models") or {}).items():
                document["models"].setdefault(name, entry)
        except (yaml.YAMLError, AttributeError):
            pass
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text("# imagegen user models: random-weight benchmark models (bench/full_models.py). Copy to\n"
                   "# $IMAGEGEN_HOME/models.yaml or merge into ~/.config/imagegen/models.yaml.\n"
                   + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    os.replace(tmp, target)
    return target


def check_registry(target: Path) -> list[str]:
    """Load the file as imagegen does (built-in registry + this user file); the bench bundles' names."""
    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from imagegen.models.registry import Registry

    registry = Registry.load(user=target)
    return sorted(name for name, bundle in registry.bundles.items() if bundle.source == str(target))


def build(out_dir: Path, models=MODELS, scale: str = "full", flux_dtype: str = "bf16", seed: int = 0,
          device: str = "auto") -> Path:
    """Build (or keep) every file of `models` under out_dir and write out_dir/models.yaml."""
    if device == "auto":
        device = "cuda" if _want_cuda() else "cpu"
    _comfy_on_path()
    out_dir = Path(out_dir)
    built: dict[str, tuple[str, list[tuple[FileSpec, Path]]]] = {}
    total = time.monotonic()
    for model in models:
        files = []
        for spec in model_files(model, scale, flux_dtype):
            file_seed = seed * 7919 + zlib.crc32(spec.filename.encode())  # a file's bytes do not depend on --models
            path, _ = write_file(out_dir / spec.folder / spec.filename, spec, file_seed, device)
            files.append((spec, path))
        built[bundle_name(model, flux_dtype)] = (model, files)
    target = write_registry(out_dir, built, scale)
    log(f"{target}: {', '.join(check_registry(target))} ({time.monotonic() - total:.1f}s in all)")
    return target


# --- describe: sizes, counts and ComfyUI's own verdict on the layouts, without allocating -----

def verify_layout(model: str, scale: str = "full", flux_dtype: str = "bf16") -> dict:
    """Run ComfyUI's detection and key processing on meta tensors of each file: what model class it
    detects, and the keys its loaders would report missing or unexpected. Nothing is allocated."""
    import torch

    _comfy_on_path()
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    def meta_sd(spec: FileSpec) -> dict:
        return {t.name: torch.empty(t.shape, dtype=_torch_dtype(t.dtype), device="meta") for t in spec.tensors}

    def keys_of(module) -> dict:
        return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}

    def compare(expected: dict, given: dict, ignore_missing=()) -> dict:
        missing = sorted(k for k in expected if k not in given and not k.endswith(tuple(ignore_missing)))
        unexpected = sorted(k for k in given if k not in expected)
        wrong = sorted(k for k in given if k in expected and tuple(given[k].shape) != expected[k])
        return {"missing": missing, "unexpected": unexpected, "wrong_shape": wrong}

    report: dict = {}
    for spec in model_files(model, scale, flux_dtype):
        sd = meta_sd(spec)
        if spec.role in ("checkpoint", "diffusion_model"):
            prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
            # load_diffusion_model_state_dict: prefixed keys if any, else as they are
            if spec.role == "diffusion_model":
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} or sd
                prefix = ""
            config = comfy.model_detection.model_config_from_unet(sd, prefix)
            entry = {"detected": type(config).__name__ if config else None, "prefix": prefix}
            if config is not None:
                unet_config = dict(config.unet_config)
                unet_config.pop("dtype", None)
                with _meta():
                    if entry["detected"].startswith("Flux"):
                        from comfy.ldm.flux.model import Flux as Net
                    else:
                        from comfy.ldm.modules.diffusionmodules.openaimodel import (
                            UNetModel as Net,
                        )
                    net = Net(**unet_config, dtype=torch.float16, device="meta", operations=_ops())
                # what load_state_dict_guess_config / load_diffusion_model_state_dict do, key for key
                work = dict(sd)
                to_load = {k[len(prefix):]: work.pop(k) for k in list(work) if k.startswith(prefix)}
                to_load = config.process_unet_state_dict(to_load)
                entry["unet"] = compare(keys_of(net), to_load)
                if spec.role == "checkpoint":
                    vae_sd = comfy.utils.state_dict_prefix_replace(work, {k: "" for k in config.vae_key_prefix},
                                                                   filter_keys=True)
                    entry["vae"] = _vae_compare(config.process_vae_state_dict(vae_sd), compare)
                    clip_target = config.clip_target(state_dict=work)
                    clip_sd = config.process_clip_state_dict(work)
                    with _meta():
                        clip = clip_target.clip(device="meta", dtype=torch.float16)
                    # ComfyUI itself only logs these two at debug level: real checkpoints lack them too
                    entry["clip"] = compare(keys_of(clip), clip_sd,
                                            ignore_missing=(".logit_scale", ".transformer.text_projection.weight"))
                entry["left_over"] = sorted(work)
        elif spec.role in ("t5", "clip_l"):
            te = comfy.sd.detect_te_model(sd)
            entry = {"detected": te.name if te else None}
            import comfy.text_encoders.flux

            target = comfy.text_encoders.flux.flux_clip(**comfy.sd.t5xxl_detect([sd]))
            with _meta():
                clip = target(device="meta", dtype=torch.float16)
            sub = (clip.clip_l.transformer if "text_model.encoder.layers.1.mlp.fc1.weight" in sd
                   else clip.t5xxl.transformer)
            entry["routed_to"] = "clip_l" if sub is clip.clip_l.transformer else "t5xxl"
            entry["keys"] = compare(keys_of(sub), sd)
            if spec.role == "t5":
                entry["dtype_t5"] = str(comfy.sd.t5xxl_detect([sd]).get("dtype_t5"))
        else:
            entry = {"detected": "vae", "vae": _vae_compare(sd, compare)}
        entry.update(file=spec.filename, size=spec.size, params=spec.parts, tensors=len(spec.tensors))
        report[spec.role] = entry
    return report


def _vae_compare(sd: dict, compare) -> dict:
    """The class ComfyUI's VAE() picks for these keys (the SD/Flux branch), built on meta, against them."""
    _comfy_on_path()
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine

    ddconfig = {**SD_VAE, "z_channels": sd["decoder.conv_in.weight"].shape[1]}
    with _meta():
        if "post_quant_conv.weight" in sd:
            vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=sd["post_quant_conv.weight"].shape[1])
        else:
            vae = AutoencodingEngine(regularizer_config={"target": VAE_REGULARIZER},
                                     encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder",
                                                     "params": ddconfig},
                                     decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder",
                                                     "params": ddconfig})
    expected = {k: tuple(v.shape) for k, v in vae.state_dict(keep_vars=True).items()}
    return {**compare(expected, sd), "latent_channels": ddconfig["z_channels"]}


def describe(models=MODELS, scale: str = "full", flux_dtype: str = "bf16") -> dict:
    return {model: verify_layout(model, scale, flux_dtype) for model in models}


# --- CLI ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, help="where the ComfyUI folders and models.yaml go")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--scale", choices=SCALES, default="full")
    parser.add_argument("--flux-dtype", choices=("bf16", "fp8"), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where random weights are generated")
    parser.add_argument("--describe", action="store_true",
                        help="print the files, sizes, parameter counts and ComfyUI's "
                        "verdict on each layout (meta tensors: nothing allocated or written) as JSON")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.describe:
        print(json.dumps(describe(models, args.scale, args.flux_dtype), indent=1))
        return 0
    if args.out_dir is None:
        parser.error("OUT_DIR is required (or --describe)")
    print(build(args.out_dir, models, args.scale, args.flux_dtype, args.seed, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
