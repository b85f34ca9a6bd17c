"""Build tiny random-weight model files that the real ComfyUI recognises (never committed).

Run with the Python that has torch and ComfyUI's requirements:
    python tests/tiny_models.py sd15 OUT.safetensors
An SD1.5-architecture checkpoint with a one-level UNet (model_channels 320, context 768, one res
block, one transformer block) plus random CLIP-L and VAE tensors: ComfyUI detects it as SD15 and
renders 64x64 in a couple of steps in about a second on CPU.
    python tests/tiny_models.py sd15-clear OUT.safetensors
    python tests/tiny_models.py sd15-inpaint OUT.safetensors
The same with a VAE that passes an image through (each 8x8 block keeps its mean colour), for img2img and
inpainting checks; sd15-inpaint has a 9-channel UNet input, so ComfyUI treats it as an inpainting model.
    python tests/tiny_models.py esrgan OUT.safetensors [SCALE]
An ESRGAN (RRDBNet, Real-ESRGAN key names: conv_first, body.N.rdbK.convJ, conv_body, conv_up1/2,
conv_hr, conv_last) with 8 features and one block, scale 4 (or 2): ComfyUI's spandrel-based
UpscaleModelLoader takes it like RealESRGAN_x4plus.safetensors, and it upscales in milliseconds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _comfy_on_path() -> Path:
    comfy = Path(os.environ["IMAGEGEN_COMFYUI_DIR"])
    sys.path.insert(0, str(comfy))
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: no GPU is needed to build weights
    return comfy


def _randomize(state: dict, seed: int, dtype) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone().contiguous()
            continue
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight",
                          "ln_1.weight", "ln_2.weight",
                          "layer_norm1.weight", "layer_norm2.weight",
                          "final_layer_norm.weight")) or ".norm" in name and name.endswith(".weight"):
            value = torch.ones_like(tensor)
        elif name.endswith(".bias"):
            value = torch.zeros_like(tensor)
        else:
            value = torch.randn(tensor.shape, generator=generator) * 0.02
        out[name] = value.to(dtype).contiguous()
    return out


def _identity_vae(state: dict) -> dict:
    """Weights for the SD VAE's architecture that pass an image through the 8x-smaller latent almost
    unchanged (each 8x8 block becomes its mean colour), so img2img at denoise 0 can be checked: every
    residual branch and attention output is zero, downsampling averages 2x2, upsampling repeats.
    Colour c travels in a GroupNorm group of G channels as [c, -c, K, -K, 0...], which makes the group's
    mean 0 and its deviation K*sqrt(2/G) whatever the image; after SiLU, silu(c) - silu(-c) is c again."""
    import math

    import torch

    big = 100.0
    out = {}
    for name, tensor in state.items():
        value = torch.zeros_like(tensor, dtype=torch.float32)
        if ("norm" in name.rsplit(".", 2)[-2]) and name.endswith(".weight"):
            value = torch.ones_like(value)
        if name.endswith("nin_shortcut.weight"):
            for c in range(min(value.shape[0], value.shape[1])):
                value[c, c, 0, 0] = 1.0
        elif name.endswith("downsample.conv.weight"):
            for c in range(value.shape[0]):
                value[c, c, 0:2, 0:2] = 0.25
        elif name.endswith("upsample.conv.weight"):
            for c in range(value.shape[0]):
                value[c, c, 1, 1] = 1.0
        elif name.endswith("quant_conv.weight"):  # quant_conv and post_quant_conv: 1x1 identities
            for c in range(value.shape[0]):
                value[c, c, 0, 0] = 1.0
        out[name] = value
    for part in ("encoder", "decoder"):
        conv_in, norm = out[f"{part}.conv_in.weight"], f"{part}.norm_out"
        group = out[f"{norm}.weight"].shape[0] // 32  # channels per GroupNorm group at norm_out
        out[f"{norm}.weight"].zero_()
        for colour in range(3):
            first = colour * 16  # channels keep their index throughout; 16 apart: one colour per group
            conv_in[first, colour, 1, 1], conv_in[first + 1, colour, 1, 1] = 1.0, -1.0
            out[f"{part}.conv_in.bias"][first + 2], out[f"{part}.conv_in.bias"][first + 3] = big, -big
            out[f"{norm}.weight"][first:first + 2] = big * math.sqrt(2 / group)
            out[f"{part}.conv_out.weight"][colour, first, 1, 1] = 1.0
            out[f"{part}.conv_out.weight"][colour, first + 1, 1, 1] = -1.0
    return {name: value.to(state[name].dtype).contiguous() for name, value in out.items()}


def build_sd15(target: Path, seed: int = 0, in_channels: int = 4, identity_vae: bool = False) -> Path:
    comfy_dir = _comfy_on_path()
    import comfy.ops
    import torch
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file

    ops = comfy.ops.disable_weight_init
    unet = UNetModel(image_size=32, in_channels=in_channels, model_channels=320, out_channels=4, num_res_blocks=[1],
                     channel_mult=(1,), num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                     transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768,
                     use_linear_in_transformer=False, operations=ops, dtype=torch.float32)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    config = json.loads((comfy_dir / "comfy" / "sd1_clip_config.json").read_text())
    clip = CLIPTextModel(config, dtype=torch.float32, device="cpu", operations=ops)
    state = {}
    state.update({f"model.diffusion_model.{k}": v for k,
                  v in _randomize(unet.state_dict(), seed, torch.float16).items()})
    vae_state = _randomize(vae.state_dict(), seed + 1, torch.float16)
    state.update({f"first_stage_model.{k}": v for k,
                  v in (_identity_vae(vae_state) if identity_vae else vae_state).items()})
    clip_state = _randomize(clip.state_dict(), seed + 2, torch.float16)
    state.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_state.items()})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    save_file(state, str(tmp))
    os.replace(tmp, target)
    return target


def build_esrgan(target: Path, scale: int = 4, features: int = 8, blocks: int = 1, seed: int = 0) -> Path:
    """Random small weights, plus a 0.5 bias on the last conv so the output is mid-grey, not black."""
    import torch
    from safetensors.torch import save_file

    if scale not in (2, 4):
        raise ValueError("scale must be 2 or 4")
    growth = 32  # spandrel's RRDB growth channels are fixed
    generator = torch.Generator().manual_seed(seed)
    state: dict = {}

    def conv(name: str, out_ch: int, in_ch: int, bias: float = 0.0) -> None:
        state[f"{name}.weight"] = (torch.randn(out_ch, in_ch, 3, 3, generator=generator) * 0.02).contiguous()
        state[f"{name}.bias"] = torch.full((out_ch,), bias)

    # scale 2 Real-ESRGAN models see a pixel-unshuffled input (12 channels) and upsample twice
    conv("conv_first", features, 3 if scale == 4 else 12)
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for index in range(1, 5):
                conv(f"body.{block}.rdb{rdb}.conv{index}", growth, features + (index - 1) * growth)
            conv(f"body.{block}.rdb{rdb}.conv5", features, features + 4 * growth)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, features, features)
    conv("conv_last", 3, features, bias=0.5)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    save_file(state, str(tmp))
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    kind, out = sys.argv[1], Path(sys.argv[2])
    if kind == "esrgan":
        build_esrgan(out, int(sys.argv[3]) if len(sys.argv) > 3 else 4)
    elif kind == "sd15-clear":  # an SD1.5 checkpoint whose VAE passes images through (img2img checks)
        build_sd15(out, identity_vae=True)
    elif kind == "sd15-inpaint":  # the same with a 9-channel UNet: an inpainting checkpoint
        build_sd15(out, in_channels=9, identity_vae=True)
    else:
        {"sd15": build_sd15}[kind](out)
    print(out)
