"""Tell which base family (sd15, sdxl, flux) a LoRA or ControlNet file is for, from its safetensors header alone.

Only tensor names and shapes are read (modelfile.read_header): no weights load. The layouts are
the ones the pinned ComfyUI maps (comfy/lora.py, comfy/controlnet.py): kohya `lora_unet_*` /
`lora_te*_*`, diffusers/PEFT `unet.*` / `text_encoder*.*` / `transformer.*`, ComfyUI's own
`diffusion_model.*`, XLabs Flux `double_blocks.*`; ControlNets in the original `control_model.*`
layout, diffusers `controlnet_cond_embedding.*`, and Flux ones (`controlnet_blocks.*`).
SD1.5 and SDXL differ in the width of the text features cross-attention reads: 768 and 2048.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from imagegen.models.modelfile import Header

CONTEXT_FAMILIES = {768: "sd15", 1024: "sd2", 2048: "sdxl", 4096: "flux"}
TEXT_WIDTH_FAMILIES = {768: "sd15", 1024: "sd2"}
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "Flux", "sd2": "SD2"}
# the down (input-side) projection of a LoRA pair, in each naming: its shape[1] is the layer's input width
DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".down.weight")
CROSS_ATTN_KEY = re.compile(r"attn2[._](processor[._])?to_k")
FLUX_KEY = re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]")
FLUX_DIFFUSERS_KEY = re.compile(
    r"^(transformer\.)?transformer_blocks\.\d+\.(attn\.(to_|add_)|ff_context|norm1_context)")


@dataclass
class AddonDetected:
    kind: str                 # "lora", "controlnet" or "unknown"
    family: str | None        # sd15, sdxl, flux, sd2, or None when the header does not say
    layout: str = ""          # kohya, diffusers, peft, comfy, xlabs, ldm, control-lora, instantx, ...
    details: dict = field(default_factory=dict)


def family_name(family: str | None) -> str:
    return FAMILY_NAMES.get(family or "", family or "an unknown family")


def _names(header: Header) -> list[str]:
    return list(header.tensors)


def _cross_attention_width(header: Header) -> int | None:
    """The input width of a cross-attention key projection's LoRA down matrix: the text features' width."""
    for name, tensor in header.tensors.items():
        if CROSS_ATTN_KEY.search(name) and name.endswith(DOWN_SUFFIXES) and len(tensor["shape"]) >= 2:
            return int(tensor["shape"][1])
    return None


def _text_encoder_width(header: Header, prefixes: tuple[str, ...]) -> int | None:
    for name, tensor in header.tensors.items():
        if name.startswith(prefixes) and ("q_proj" in name) and name.endswith(DOWN_SUFFIXES) \
                and len(tensor["shape"]) >= 2:
            return int(tensor["shape"][1])
    return None


def detect_lora(header: Header) -> AddonDetected:
    """A LoRA's layout and base family; family None when it has none of the known layouts or no telling shape."""
    names = _names(header)
    details: dict = {"tensors": len(names)}
    if not names:
        return AddonDetected("unknown", None, "", details)
    if any(FLUX_KEY.search(n) for n in names) or any(FLUX_DIFFUSERS_KEY.match(n) for n in names):
        layout = ("kohya" if any(n.startswith("lora_unet_") for n in names)
                  else "xlabs" if any(".processor.proj_lora" in n or ".processor.qkv_lora" in n for n in names)
                  else "comfy" if any(n.startswith("diffusion_model.") for n in names)
                  else "diffusers")
        return AddonDetected("lora", "flux", layout, details)
    kohya = any(n.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for n in names)
    peft = any(n.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for n in names)
    comfy = any(n.startswith(("diffusion_model.", "text_encoders.")) for n in names)
    if not (kohya or peft or comfy):
        return AddonDetected("unknown", None, "", details)
    layout = "kohya" if kohya else "peft" if peft else "comfy"
    width = details["context_dim"] = _cross_attention_width(header)
    second_encoder = any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in names)
    details["text_encoder_2"] = second_encoder
    family = CONTEXT_FAMILIES.get(width or 0)
    if family == "flux":
        family = None  # a 4096-wide cross-attention is no UNet we know
    if family is None and second_encoder:
        family = "sdxl"
    if family is None:
        text = details["text_width"] = _text_encoder_width(header, ("lora_te_", "lora_te1_", "text_encoder."))
        family = TEXT_WIDTH_FAMILIES.get(text or 0)
    if family is None and any(n.startswith("lora_unet_input_blocks_") or n.startswith("lora_unet_output_blocks_")
                              for n in names):
        family = "sdxl"  # kohya names SDXL UNet blocks the ldm way, SD1.5 ones the diffusers way
    return AddonDetected("lora", family, layout, details)


def _context_dim(header: Header, prefix: str = "") -> int | None:
    for name, tensor in header.tensors.items():
        if name.startswith(prefix) and name.endswith("attn2.to_k.weight") and len(tensor["shape"]) >= 2:
            return int(tensor["shape"][1])
    return None


def detect_controlnet(header: Header) -> AddonDetected:
    """A ControlNet's layout and base family; family None when the layout is unknown or no shape tells."""
    names = set(_names(header))
    details: dict = {"tensors": len(names)}
    if {"controlnet_blocks.0.weight", "controlnet_blocks.0.linear.weight", "controlnet_x_embedder.weight"} & names:
        if "pos_embed_input.proj.weight" in names:
            return AddonDetected("controlnet", "sd3", "diffusers", details)
        layout = "instantx" if "controlnet_x_embedder.weight" in names else "xlabs"
        flux = any(FLUX_KEY.search(n) or n.startswith("transformer_blocks.") for n in names)
        return AddonDetected("controlnet", "flux" if flux else None, layout, details)
    if "lora_controlnet" in names:
        layout, prefix = "control-lora", ""
    elif any(n.startswith("controlnet_cond_embedding.") for n in names):
        layout, prefix = "diffusers", ""
    elif any(n.startswith("control_model.input_hint_block.") for n in names):
        layout, prefix = "ldm", "control_model."
    elif any(n.startswith("input_hint_block.") for n in names) and any(n.startswith("zero_convs.") for n in names):
        layout, prefix = "ldm", ""
    else:
        return AddonDetected("unknown", None, "", details)
    context = details["context_dim"] = _context_dim(header, prefix)
    family = CONTEXT_FAMILIES.get(context or 0)
    if family == "flux":
        family = None
    adm = header.shape(prefix + "label_emb.0.0.weight") or header.shape("add_embedding.linear_1.weight")
    if family is None and adm and len(adm) == 2 and adm[1] == 2816:
        family = "sdxl"  # SDXL's pooled text + size conditioning; the small SDXL ControlNets have no attention
    return AddonDetected("controlnet", family, layout, details)


def detect_addon(header: Header) -> AddonDetected:
    """A LoRA or a ControlNet, whichever layout the header has (kind "unknown" when neither)."""
    found = detect_lora(header)
    return found if found.kind != "unknown" else detect_controlnet(header)
