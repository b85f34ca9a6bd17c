"""Build tiny random-weight model files that the real ComfyUI recognises (never committed).

Run with the Python that has torch and ComfyUI's requirements:
    python tests/tiny_models.py sd15 OUT.safetensors
An SD1.5-architecture checkpoint with a one-level UNet (model_channels 320, context 768, one res
block, one transformer block) plus random CLIP-L and VAE tensors: ComfyUI detects it as SD15 and
renders 64x64 in a couple of steps in about a second on CPU.
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
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight", "ln_1.weight", "ln_2.weight",
                          "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight")) or ".norm" in name and name.endswith(".weight"):
            value = torch.ones_like(tensor)
        elif name.endswith(".bias"):
            value = torch.zeros_like(tensor)
        else:
            value = torch.randn(tensor.shape, generator=generator) * 0.02
        out[name] = value.to(dtype).contiguous()
    return out


def build_sd15(target: Path, seed: int = 0) -> Path:
    comfy_dir = _comfy_on_path()
    import torch
    from safetensors.torch import save_file
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.clip_model import CLIPTextModel
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                     channel_mult=(1,), num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                     transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768,
                     use_linear_in_transformer=False, operations=ops, dtype=torch.float32)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    config = json.loads((comfy_dir / "comfy" / "sd1_clip_config.json").read_text())
    clip = CLIPTextModel(config, dtype=torch.float32, device="cpu", operations=ops)
    state = {}
    state.update({f"model.diffusion_model.{k}": v for k, v in _randomize(unet.state_dict(), seed, torch.float16).items()})
    state.update({f"first_stage_model.{k}": v for k, v in _randomize(vae.state_dict(), seed + 1, torch.float16).items()})
    clip_state = _randomize(clip.state_dict(), seed + 2, torch.float16)
    state.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_state.items()})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    save_file(state, str(tmp))
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    kind, out = sys.argv[1], Path(sys.argv[2])
    {"sd15": build_sd15}[kind](out)
    print(out)
