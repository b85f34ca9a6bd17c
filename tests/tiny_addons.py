"""Build a tiny LoRA and a tiny ControlNet that fit the tiny SD1.5 checkpoint of tests/tiny_models.py.

    python tests/tiny_addons.py lora CHECKPOINT OUT.safetensors
A kohya-style LoRA (lora_unet_* / lora_te_*, lora_down/lora_up/alpha) with a rank-4 pair for every
cross- and self-attention projection of the checkpoint's UNet and every attention/MLP projection of its
CLIP-L: every key maps onto a weight ComfyUI's comfy/lora.py knows, so the worker logs no
"lora key not loaded". Its weights are large enough to change the pixels.
    python tests/tiny_addons.py controlnet OUT.safetensors
A ControlNet (original `control_model.*` layout) of the tiny UNet's architecture, random weights:
ComfyUI's ControlNetLoader detects its config from the keys, as it does for ControlNet 1.1 files.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

UNET = "model.diffusion_model."
CLIP = "cond_stage_model.transformer."
UNET_LAYER = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")
CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")


def build_lora(checkpoint: Path, target: Path, rank: int = 4, seed: int = 0) -> Path:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = {}
    with safe_open(str(checkpoint), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            if key.startswith(UNET) and UNET_LAYER.search(key):
                name = "lora_unet_" + key[len(UNET):-len(".weight")].replace(".", "_")
            elif key.startswith(CLIP) and CLIP_LAYER.search(key):
                name = "lora_te_" + key[len(CLIP):-len(".weight")].replace(".", "_")
            else:
                continue
            out_dim, in_dim = handle.get_slice(key).get_shape()
            state[f"{name}.lora_down.weight"] = (torch.randn(rank, in_dim, generator=generator) * 0.3).half()
            state[f"{name}.lora_up.weight"] = (torch.randn(out_dim, rank, generator=generator) * 0.3).half()
            state[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    _save(save_file, state, target)
    return target


def build_controlnet(target: Path, seed: int = 0) -> Path:
    sys.path.insert(0, os.environ["IMAGEGEN_COMFYUI_DIR"])
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ops
    import torch
    from comfy.cldm.cldm import ControlNet
    from safetensors.torch import save_file

    net = ControlNet(image_size=32, in_channels=4, model_channels=320, hint_channels=3, num_res_blocks=[1],
                     channel_mult=(1,), num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                     transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False,
                     operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in net.state_dict().items():
        if name.endswith(".bias"):
            value = torch.zeros_like(tensor)
        elif "norm" in name and name.endswith(".weight"):
            value = torch.ones_like(tensor)
        else:
            value = torch.randn(tensor.shape, generator=generator) * 0.05
        state[f"control_model.{name}"] = value.half().contiguous()
    _save(save_file, state, target)
    return target


def _save(save_file, state: dict, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    save_file(state, str(tmp))
    os.replace(tmp, target)


if __name__ == "__main__":
    if sys.argv[1] == "lora":
        build_lora(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        build_controlnet(Path(sys.argv[2]))
    print(sys.argv[-1])
