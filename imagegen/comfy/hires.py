"""The hires fix in one graph: the first pass as usual, its result enlarged, then a second low-denoise pass.

`apply` rewires a finished one-pass graph (its `decode` node reads the first sampler): the first
pass's latent is enlarged (decoded, resized with lanczos or an upscale model, and encoded again;
or resized in latent space) and sampled again at `denoise` with the same model, conditioning and
seed, as A1111's "Hires. fix" does. Works for KSampler graphs (SD1.5, SDXL) and for Flux's
SamplerCustomAdvanced. Only ComfyUI core nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

LANCZOS, LATENT = "lanczos", "latent"
DEFAULT_SCALE = 2.0
DEFAULT_DENOISE = 0.35
MAX_SCALE = 4.0
A1111_UPSCALERS = {LANCZOS: "Lanczos", LATENT: "Latent"}  # the names A1111 gives them in `parameters`
SIZE_MULTIPLE = 8


@dataclass
class HiresFix:
    """The second pass: how much larger, how much is redrawn, and how the first pass is enlarged."""

    scale: float = DEFAULT_SCALE
    denoise: float = DEFAULT_DENOISE
    steps: int | None = None              # the second pass's steps; the first pass's when None
    upscaler: str = LANCZOS               # lanczos, latent, or the name of an upscale model
    model_filename: str | None = None     # that model's file in the worker's upscale_models folder

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The final size: the first pass's times the scale, rounded to a multiple of 8."""
        return (max(SIZE_MULTIPLE, round(width * self.scale / SIZE_MULTIPLE) * SIZE_MULTIPLE),
                max(SIZE_MULTIPLE, round(height * self.scale / SIZE_MULTIPLE) * SIZE_MULTIPLE))


def _node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def apply(graph: dict, hires: HiresFix | None, width: int, height: int) -> dict:
    """The graph with a second pass between its first sampler and its `decode` node (unchanged without hires)."""
    if hires is None:
        return graph
    decode = graph["decode"]["inputs"]
    first_id = decode["samples"][0]
    first, vae = graph[first_id], decode["vae"]
    target_width, target_height = hires.size(width, height)
    latent = _enlarged(graph, hires, [first_id, 0], vae, target_width, target_height)
    if first["class_type"] == "KSampler":
        steps = hires.steps or first["inputs"]["steps"]
        graph["hires_sampler"] = _node("KSampler", **{**first["inputs"], "latent_image": latent, "steps": steps,
                                                      "denoise": hires.denoise})
        decode["samples"] = ["hires_sampler", 0]
    elif first["class_type"] == "SamplerCustomAdvanced":
        schedule = graph[first["inputs"]["sigmas"][0]]["inputs"]
        graph["hires_schedule"] = _node("BasicScheduler", model=schedule["model"], scheduler=schedule["scheduler"],
                                        steps=hires.steps or schedule["steps"], denoise=hires.denoise)
        graph["hires_sample"] = _node("SamplerCustomAdvanced", **{**first["inputs"], "latent_image": latent,
                                                                   "sigmas": ["hires_schedule", 0]})
        decode["samples"] = ["hires_sample", 0]
    else:
        raise ValueError(f"no hires fix for a graph sampled by {first['class_type']}")
    return graph


def _enlarged(graph: dict, hires: HiresFix, latent: list, vae: list, width: int, height: int) -> list:
    if hires.upscaler == LATENT:
        graph["hires_upscale"] = _node("LatentUpscale", samples=latent, upscale_method="nearest-exact",
                                       width=width, height=height, crop="disabled")
        return ["hires_upscale", 0]
    graph["hires_decode"] = _node("VAEDecode", samples=latent, vae=vae)
    pixels = ["hires_decode", 0]
    if hires.model_filename:
        graph["hires_load_upscaler"] = _node("UpscaleModelLoader", model_name=hires.model_filename)
        graph["hires_model_upscale"] = _node("ImageUpscaleWithModel", upscale_model=["hires_load_upscaler", 0],
                                             image=pixels)
        pixels = ["hires_model_upscale", 0]
    graph["hires_resize"] = _node("ImageScale", image=pixels, upscale_method="lanczos", width=width, height=height,
                                  crop="disabled")
    graph["hires_encode"] = _node("VAEEncode", pixels=["hires_resize", 0], vae=vae)
    return ["hires_encode", 0]


def a1111_size(record: dict) -> str:
    """A1111's Size: the first pass's, for a hires-fixed image (whose own size is the second pass's)."""
    recorded = record.get("hires")
    first: dict = recorded if isinstance(recorded, dict) else {}
    return f"{first.get('first_width', record['width'])}x{first.get('first_height', record['height'])}"


def a1111_fields(record: dict) -> list[str]:
    """The `parameters` fields A1111 writes for a hires-fixed image (its Size is the first pass's), or for an
    upscaled one (its "Extras" fields)."""
    upscaled = record.get("upscale")
    if isinstance(upscaled, dict):
        return [f"Postprocess upscale by: {upscaled.get('scale')}", f"Postprocess upscaler: {upscaled.get('model')}"]
    hires = record.get("hires")
    if not isinstance(hires, dict):
        return []
    fields = [f"Denoising strength: {hires.get('denoise')}", f"Hires upscale: {hires.get('scale')}"]
    if hires.get("steps"):
        fields.append(f"Hires steps: {hires['steps']}")
    upscaler = str(hires.get("upscaler"))
    fields.append(f"Hires upscaler: {A1111_UPSCALERS.get(upscaler, upscaler)}")
    return fields
