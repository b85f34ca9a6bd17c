"""The folder layouts of model trees: ComfyUI's own, and an A1111 tree shared read-only."""

from __future__ import annotations

from pathlib import Path

COMFY_LAYOUT = {"checkpoints": ["checkpoints"], "diffusion_models": ["diffusion_models", "unet"],
                "text_encoders": ["text_encoders", "clip"], "vae": ["vae"], "upscale_models": ["upscale_models"],
                "loras": ["loras"], "clip_vision": ["clip_vision"],
                "controlnet": ["controlnet"]}
A1111_LAYOUT = {"checkpoints": ["Stable-diffusion"], "vae": ["VAE"], "loras": ["Lora"],
                "upscale_models": ["ESRGAN", "RealESRGAN"], "text_encoders": ["text_encoder"],
                "controlnet": ["ControlNet"]}


def tree_layout(root: Path) -> dict[str, list[str]]:
    return A1111_LAYOUT if (root / "Stable-diffusion").is_dir() else COMFY_LAYOUT
