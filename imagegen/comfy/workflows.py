"""ComfyUI API-format graphs, one builder per family and task, with readable node ids.

Limits below are those of the pinned ComfyUI 0.3.75's node definitions (its /object_info);
tests/test_workflows.py holds them to the real server so they cannot drift. Sampler and scheduler
names are a worker's own (comfy/choices.py), with the pinned lists as the fallback.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from imagegen.comfy import addons, choices, hires
from imagegen.models import cache, modelfile
from imagegen.models.registry import Bundle

MAX_RESOLUTION = 16384
SIZE_MULTIPLE = 8
MAX_STEPS = 10000
MAX_CFG = 100.0
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_BATCH = 4096
MAX_GUIDANCE = 100.0
# The pinned ComfyUI's names, the fallback before a worker is known; a worker's own come from its /object_info.
SAMPLERS, SCHEDULERS = choices.SAMPLERS, choices.SCHEDULERS


@dataclass
class LoraUse:
    """One LoRA of a stack: its file in the worker's loras folder and its strength."""
    filename: str
    strength: float = 1.0
    name: str = ""                    # the registry name, or the local file's name
    sha256: str | None = None         # for provenance (filled once the file is on disk, or from the registry)


@dataclass
class ControlUse:
    """One ControlNet: its model file, the control image (an input-folder name once uploaded) and
    how strongly and over which part of the sampling it steers."""
    filename: str
    image: str | None = None
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str | None = None     # "canny": ComfyUI's core Canny node on the image first
    name: str = ""
    sha256: str | None = None         # the model file's, for provenance
    image_sha256: str | None = None   # the local control image's


@dataclass
class Params:
    prompt: str
    width: int
    height: int
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    seed: int
    negative: str = ""
    guidance: float = 3.5
    batch_size: int = 1
    denoise: float = 1.0
    init_image: str | None = None     # an image already in the worker's input folder (img2img)
    mask: str | None = None           # an input-folder mask (inpainting): white repaints, black keeps
    mask_grow: int = 0
    loras: list[LoraUse] = field(default_factory=list)
    controls: list[ControlUse] = field(default_factory=list)
    filename_prefix: str = "imagegen/image"
    sources: dict = field(default_factory=dict)  # provenance of the inputs: {"image"|"mask": {name, path, sha256}}
    extend: list[int] | None = None   # outpainting: pixels added left, top, right, bottom (multiples of 8)
    fast: bool = False                # torch.compile the diffusion model; fp8 matmul for fp8 weights
    hires: hires.HiresFix | None = None  # a second, low-denoise pass at a larger size (comfy/hires.py)

    def to_dict(self) -> dict:
        return asdict(self)


INPUT_KEYS = ("init_image", "mask", "control:N")  # what a Job's inputs may name (engine/jobs.py)


def with_inputs(params: Params, uploaded: dict[str, str]) -> Params:
    """The job with its local input files replaced by the names the worker's input folder gives them:
    keys "init_image" and "mask" set those fields, "control:N" the image of the Nth ControlNet."""
    controls = list(params.controls)
    fields: dict = {}
    for key, name in uploaded.items():
        if key.startswith("control:"):
            index = int(key.split(":", 1)[1])
            controls[index] = replace(controls[index], image=name)
        elif key in ("init_image", "mask"):
            fields[key] = name
        else:
            raise ValueError(f"unknown input key {key!r} (expected one of {INPUT_KEYS})")
    return replace(params, controls=controls, **fields)


def build(bundle: Bundle, params: Params) -> dict:
    """The graph for one job: text-to-image, or image-to-image when params.init_image is set."""
    if bundle.family == "flux":
        return hires.apply(_flux(bundle, params, flux_weight_dtype(bundle, params.fast)), params.hires,
                           params.width, params.height)
    if bundle.family in ("sd15", "sdxl"):
        return hires.apply(_checkpoint(bundle, params), params.hires, params.width, params.height)
    if bundle.family == "upscale":
        if not params.init_image:
            raise ValueError("an upscale job needs the image to upscale (params.init_image)")
        size = (params.width, params.height) if params.width and params.height else None
        return upscale(bundle.files["upscale_model"].filename, params.init_image, params.filename_prefix, size)
    raise ValueError(f"no text-to-image graph for family {bundle.family!r}")


def inpaint_checkpoint(bundle: Bundle) -> bool:
    """Whether the bundle's checkpoint is an inpainting model (a UNet with 9 input channels), read from
    the file's header where the file is here; a registry entry may say so (`defaults: {inpaint: true}`)."""
    declared = bundle.default("inpaint")
    if declared is not None:
        return bool(declared)
    file = bundle.files.get("checkpoint")
    path = cache.present_path(file) if file is not None else None
    if path is None:
        return False
    info = path.stat()
    return _inpaint_header(str(path.resolve()), info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _inpaint_header(path: str, size: int, mtime_ns: int) -> bool:
    return bool(modelfile.detect(modelfile.read_header(Path(path))).details.get("inpaint"))


FAST_ON_CPU = "IMAGEGEN_FAST_ON_CPU"
FAST_ON_CPU_NOTE = ("--fast has no effect on a CPU worker: compiled models sampled slower than plain ones there "
                    "(docs/benchmarks.md); set IMAGEGEN_FAST_ON_CPU=1 to compile anyway")


def compiles_on(device: str) -> bool:
    """Whether fast mode compiles on a worker of `device`. On a CPU, torch.compile made sampling slower
    in every measurement (docs/benchmarks.md), so only with IMAGEGEN_FAST_ON_CPU=1."""
    return device != "cpu" or os.environ.get(FAST_ON_CPU, "").lower() in ("1", "true", "yes")


def for_device(params: Params, device: str) -> Params:
    """The job as a worker on `device` runs it."""
    return params if not params.fast or compiles_on(device) else replace(params, fast=False)


def flux_weight_dtype(bundle: Bundle, fast: bool) -> str:
    """fp8 weights run their matmuls in fp8 in fast mode (`fp8_e4m3fn_fast`) where the GPU can
    (compute capability 8.9+: Ada, Hopper, Blackwell); elsewhere ComfyUI treats it as plain fp8
    storage, exactly like `fp8_e4m3fn`. Fast mode never lowers the precision of bf16/fp16 weights."""
    dtype = bundle.default("weight_dtype", "default")
    return "fp8_e4m3fn_fast" if fast and dtype == "fp8_e4m3fn" else dtype


def compiled(graph: dict, model_source: list, fast: bool) -> list:
    """Where the sampler takes its model from: in fast mode through a TorchCompileModel node
    (inductor; ComfyUI compiles on the first step, and the worker keeps inductor's cache in the
    model cache, so a later worker reuses the compiled kernels)."""
    if not fast:
        return model_source
    graph["compile"] = {"class_type": "TorchCompileModel", "inputs": {"model": model_source, "backend": "inductor"}}
    return ["compile", 0]


def _node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def _latent(params: Params, vae: list, empty_node: str) -> tuple[dict, list]:
    """The latent to sample: empty (text-to-image), the encoded input image (img2img), or that with a
    noise mask (inpainting with an ordinary model: only the masked part is sampled)."""
    if params.init_image:
        nodes = _source_image(params)
        nodes["encode"] = _node("VAEEncode", pixels=["resize", 0], vae=vae)
        latent = ["encode", 0]
        if masked(params):
            mask_nodes, mask = _mask(params)
            nodes.update(mask_nodes)
            nodes["noise_mask"] = _node("SetLatentNoiseMask", samples=latent, mask=mask)
            latent = ["noise_mask", 0]
        if params.batch_size > 1:
            nodes["repeat"] = _node("RepeatLatentBatch", samples=latent, amount=params.batch_size)
            return nodes, ["repeat", 0]
        return nodes, latent
    empty = _node(empty_node, width=params.width, height=params.height, batch_size=params.batch_size)
    return {"latent": empty}, ["latent", 0]


OUTPAINT_FEATHER = 40  # ImagePadForOutpaint's default: the new border fades into the image over 40 pixels


def masked(params: Params) -> bool:
    """Whether only part of the input image is repainted: inpainting (a mask) or outpainting (extend)."""
    return bool(params.init_image and (params.mask or params.extend))


def _source_image(params: Params) -> dict:
    nodes = {"load_image": _node("LoadImage", image=params.init_image)}
    image = ["load_image", 0]
    if params.extend:  # outpainting: a grey border to draw into, and the mask of it (output 1)
        left, top, right, bottom = params.extend
        nodes["pad"] = _node("ImagePadForOutpaint", image=image, left=left, top=top, right=right, bottom=bottom,
                             feathering=OUTPAINT_FEATHER)
        image = ["pad", 0]
    nodes["resize"] = _node("ImageScale", image=image, upscale_method="lanczos", width=params.width,
                            height=params.height, crop="center")
    return nodes


def _mask(params: Params) -> tuple[dict, list]:
    """The mask (the user's greyscale PNG, whose red channel is its luminance, or the outpainting border)
    scaled and cropped exactly as the image is, grown by params.mask_grow pixels."""
    if params.mask:
        nodes = {"load_mask": _node("LoadImage", image=params.mask)}
        image = ["load_mask", 0]
    else:  # outpainting: the padding node's mask
        nodes = {"mask_image": _node("MaskToImage", mask=["pad", 1])}
        image = ["mask_image", 0]
    nodes["resize_mask"] = _node("ImageScale", image=image, upscale_method="bilinear", width=params.width,
                                 height=params.height, crop="center")
    nodes["to_mask"] = _node("ImageToMask", image=["resize_mask", 0], channel="red")
    if params.mask_grow > 0:
        nodes["grow_mask"] = _node("GrowMask", mask=["to_mask", 0], expand=params.mask_grow, tapered_corners=True)
        return nodes, ["grow_mask", 0]
    return nodes, ["to_mask", 0]


def _inpaint_model(graph: dict, params: Params, vae: list, positive: list, negative: list) -> tuple[list, list, list]:
    """An inpainting checkpoint (9 input channels) sees the masked image and the mask beside the latent:
    InpaintModelConditioning makes both conditionings and the (noise-masked) latent."""
    graph.update(_source_image(params))
    mask_nodes, mask = _mask(params)
    graph.update(mask_nodes)
    graph["inpaint_conditioning"] = _node("InpaintModelConditioning", positive=positive, negative=negative, vae=vae,
                                          pixels=["resize", 0], mask=mask, noise_mask=True)
    latent = ["inpaint_conditioning", 2]
    if params.batch_size > 1:
        graph["repeat"] = _node("RepeatLatentBatch", samples=latent, amount=params.batch_size)
        latent = ["repeat", 0]
    return ["inpaint_conditioning", 0], ["inpaint_conditioning", 1], latent


def _keep_unmasked(graph: dict, params: Params, decoded: list) -> list:
    """Inpainting: the input's own pixels outside the mask (the VAE's round trip would blur them), the new
    ones inside it."""
    if not masked(params):
        return decoded
    destination = ["resize", 0]
    if params.batch_size > 1:
        graph["keep_base"] = _node("RepeatImageBatch", image=destination, amount=params.batch_size)
        destination = ["keep_base", 0]
    mask = ["grow_mask", 0] if params.mask_grow > 0 else ["to_mask", 0]
    graph["keep"] = _node("ImageCompositeMasked", destination=destination, source=decoded, x=0, y=0,
                          resize_source=False, mask=mask)
    return ["keep", 0]


def _checkpoint(bundle: Bundle, params: Params) -> dict:
    vae = ["load_checkpoint", 2]
    graph: dict = {
        "load_checkpoint": _node("CheckpointLoaderSimple", ckpt_name=bundle.files["checkpoint"].filename),
        "positive": _node("CLIPTextEncode", text=params.prompt, clip=["load_checkpoint", 1]),
        "negative": _node("CLIPTextEncode", text=params.negative, clip=["load_checkpoint", 1]),
    }
    if "vae" in bundle.files:
        graph["load_vae"] = _node("VAELoader", vae_name=bundle.files["vae"].filename)
        vae = ["load_vae", 0]
    model, clip = addons.apply_loras(graph, ["load_checkpoint", 0], ["load_checkpoint", 1], params.loras)
    graph["positive"]["inputs"]["clip"] = graph["negative"]["inputs"]["clip"] = clip
    positive, negative = addons.apply_controls(graph, ["positive", 0], ["negative", 0], vae, params.controls)
    if masked(params) and inpaint_checkpoint(bundle):
        positive, negative, latent = _inpaint_model(graph, params, vae, positive, negative)
    else:
        latent_nodes, latent = _latent(params, vae, "EmptyLatentImage")
        graph.update(latent_nodes)
    graph["sampler"] = _node("KSampler", model=compiled(graph, model, params.fast),
                             positive=positive, negative=negative, latent_image=latent,
                             seed=params.seed, steps=params.steps, cfg=params.cfg, sampler_name=params.sampler,
                             scheduler=params.scheduler, denoise=params.denoise)
    graph["decode"] = _node("VAEDecode", samples=["sampler", 0], vae=vae)
    graph["save"] = _node("SaveImage", images=_keep_unmasked(graph, params, ["decode", 0]),
                          filename_prefix=params.filename_prefix)
    return graph


def _flux(bundle: Bundle, params: Params, weight_dtype: str = "default") -> dict:
    files = bundle.files
    graph: dict = {
        "load_unet": _node("UNETLoader", unet_name=files["diffusion_model"].filename, weight_dtype=weight_dtype),
        "load_clip": _node("DualCLIPLoader", clip_name1=files["t5"].filename, clip_name2=files["clip_l"].filename,
                           type="flux"),
        "load_vae": _node("VAELoader", vae_name=files["vae"].filename),
        "positive": _node("CLIPTextEncode", text=params.prompt, clip=["load_clip", 0]),
        "guidance": _node("FluxGuidance", conditioning=["positive", 0], guidance=params.guidance),
    }
    latent_nodes, latent = _latent(params, ["load_vae", 0], "EmptySD3LatentImage")
    graph.update(latent_nodes)
    patched, _ = addons.apply_loras(graph, ["load_unet", 0], None, params.loras)
    model = compiled(graph, patched, params.fast)
    conditioning = ["guidance", 0]
    if params.controls:  # ControlNetApplyAdvanced takes a negative too; Flux's guider ignores it
        graph["negative"] = _node("CLIPTextEncode", text="", clip=["load_clip", 0])
        conditioning, _ = addons.apply_controls(graph, conditioning, ["negative", 0], ["load_vae", 0], params.controls)
    graph.update({
        "noise": _node("RandomNoise", noise_seed=params.seed),
        "guider": _node("BasicGuider", model=model, conditioning=conditioning),
        "sampler_select": _node("KSamplerSelect", sampler_name=params.sampler),
        "schedule": _node("BasicScheduler", model=patched, scheduler=params.scheduler, steps=params.steps,
                          denoise=params.denoise),
        "sample": _node("SamplerCustomAdvanced", noise=["noise", 0], guider=["guider", 0],
                        sampler=["sampler_select", 0], sigmas=["schedule", 0], latent_image=latent),
        "decode": _node("VAEDecode", samples=["sample", 0], vae=["load_vae", 0]),
    })
    graph["save"] = _node("SaveImage", images=_keep_unmasked(graph, params, ["decode", 0]),
                          filename_prefix=params.filename_prefix)
    return graph


def upscale(model_filename: str, image_name: str, filename_prefix: str = "imagegen/upscaled",
            size: tuple[int, int] | None = None) -> dict:
    """The model's own factor (x4 for RealESRGAN_x4plus); with `size`, its output resized to that
    size (e.g. a x4 model's output halved for a x2 upscale, as ComfyUI users usually do)."""
    graph = {
        "load_image": _node("LoadImage", image=image_name),
        "load_upscaler": _node("UpscaleModelLoader", model_name=model_filename),
        "upscale": _node("ImageUpscaleWithModel", upscale_model=["load_upscaler", 0], image=["load_image", 0]),
        "save": _node("SaveImage", images=["upscale", 0], filename_prefix=filename_prefix),
    }
    if size:
        graph["resize"] = _node("ImageScale", image=["upscale", 0], upscale_method="lanczos",
                                width=size[0], height=size[1], crop="disabled")
        graph["save"]["inputs"]["images"] = ["resize", 0]
    return graph
