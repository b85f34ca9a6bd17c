"""The request side of upscaling: which upscale model a name or file means, and `--hires` checked and resolved.

Used by `generate --hires` (and batch items with `hires`), which sample a second pass in the same
graph (comfy/hires.py), and by `imagegen upscale` (engine/upscale.py). Nothing here starts a worker.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

from imagegen.comfy import workflows
from imagegen.comfy.hires import LANCZOS, LATENT, MAX_SCALE, HiresFix
from imagegen.engine.addon_names import is_file_name, local_addon
from imagegen.models import modelfile
from imagegen.models.registry import Bundle, Registry
from imagegen.util.errors import ImagegenError

DEFAULT_UPSCALE_MODEL = os.environ.get("IMAGEGEN_UPSCALE_MODEL", "realesrgan-x4")


def upscale_model(name: str | None, registry: Registry | None = None) -> Bundle:
    """A registered model of family upscale, or a local .safetensors file detected as one."""
    name = name or DEFAULT_UPSCALE_MODEL
    if is_file_name(name):
        path = Path(name).expanduser().resolve()
        detected = modelfile.detect(modelfile.read_header(path))
        if detected.family != "upscale":
            raise ImagegenError("invalid_model_file",
                                f"{path.name} is not an upscale model (looks like {detected.family or 'unknown'} "
                                f"{detected.kind})",
                                hint="Pass an ESRGAN-style .safetensors upscaler, or a registered one by name.")
        return local_addon(path, "upscale_model", family="upscale", name=path.stem)
    registry = registry or Registry.load()
    upscalers = sorted(n for n, b in registry.bundles.items() if b.family == "upscale")
    hint = "Upscale models: " + (", ".join(upscalers) or "none registered") + "; or pass an upscaler .safetensors file."
    if name not in registry.bundles:
        raise ImagegenError("unknown_model", f"unknown upscale model {name!r}", hint=hint)
    bundle = registry.bundles[name]
    if bundle.family != "upscale":
        raise ImagegenError("invalid_argument", f"{name!r} is a {bundle.family} model, not an upscale model",
                            hint=hint)
    return bundle


def _number(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    bad = (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
           or value < low or value > high or (low_open and value <= low))
    if bad:
        raise ImagegenError("invalid_argument", f"{name} {value!r} is outside {low:g}..{high:g}",
                            hint="The hires fix is usually --hires-scale 1.5..2 with --hires-denoise 0.3..0.5.")
    return float(value)


def check(fix: HiresFix | None, width: int, height: int, has_image: bool = False,
          registry: Registry | None = None) -> HiresFix | None:
    """--hires with its scale, denoise, steps and upscaler checked, and the upscale model's file resolved."""
    if fix is None:
        return None
    if has_image:
        raise ImagegenError("invalid_argument", "--hires is for text-to-image; it cannot be combined with --image",
                            hint="Upscale the result instead: imagegen upscale OUT.png --scale 2, or pass --size.")
    scale = _number("--hires-scale", fix.scale, 1.0, MAX_SCALE, low_open=True)
    denoise = _number("--hires-denoise", fix.denoise, 0.0, 1.0)
    steps = fix.steps
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool)
                              or not 1 <= steps <= workflows.MAX_STEPS):
        raise ImagegenError("invalid_argument", f"--hires-steps {steps!r} is outside 1..{workflows.MAX_STEPS}")
    upscaler = (fix.upscaler or LANCZOS).strip()
    model_filename = None
    if upscaler.lower() in (LANCZOS, LATENT):
        upscaler = upscaler.lower()
    else:
        model_filename = upscale_model(upscaler, registry).files["upscale_model"].filename
    checked = replace(fix, scale=scale, denoise=denoise, steps=steps, upscaler=upscaler, model_filename=model_filename)
    final = checked.size(width, height)
    if max(final) > workflows.MAX_RESOLUTION:
        raise ImagegenError("invalid_size", f"--hires-scale {scale:g} makes {width}x{height} into "
                                            f"{final[0]}x{final[1]}, over {workflows.MAX_RESOLUTION} a side",
                            hint="Pass a smaller --hires-scale or --size.")
    return checked


def model_bundles(params_list: list[workflows.Params]) -> list[Bundle]:
    """The upscale models the jobs' hires passes load (each once), to fetch and mount with the jobs' own."""
    found: dict[str, Bundle] = {}
    for params in params_list:
        fix = params.hires
        if fix is not None and fix.model_filename and fix.upscaler not in found:
            found[fix.upscaler] = upscale_model(fix.upscaler)
    return list(found.values())


def record(params: workflows.Params) -> dict:
    """What an image's parameters record says of its hires pass (the record's width and height are the final
    image's; first_width and first_height the first pass's, which A1111 calls Size)."""
    fix = params.hires
    if fix is None:
        return {}
    upscaler = Path(fix.upscaler).stem if fix.model_filename and is_file_name(fix.upscaler) else fix.upscaler
    return {"hires": {"scale": fix.scale, "denoise": fix.denoise, "steps": fix.steps or params.steps,
                      "upscaler": upscaler, "first_width": params.width, "first_height": params.height}}


ITEM_FIELDS = {"scale", "denoise", "steps", "model"}


def from_item(value, where: str) -> HiresFix | None:
    """A batch item's `hires`: true (the defaults), false/null, or {"scale", "denoise", "steps", "model"}."""
    if value is None or value is False:
        return None
    if value is True:
        return HiresFix()
    if not isinstance(value, dict) or set(value) - ITEM_FIELDS:
        raise ImagegenError("invalid_argument", f"{where}: hires must be true or an object with "
                                                f"{', '.join(sorted(ITEM_FIELDS))}, not {value!r}",
                            hint='For example "hires": {"scale": 2, "denoise": 0.35}.')
    defaults = HiresFix()
    model = value.get("model")
    if model is not None and not isinstance(model, str):
        raise ImagegenError("invalid_argument", f"{where}: hires.model must be a model name or file, not {model!r}")
    return HiresFix(scale=value.get("scale", defaults.scale), denoise=value.get("denoise", defaults.denoise),
                    steps=value.get("steps"), upscaler=model or LANCZOS)


def from_record(recorded: dict) -> tuple[HiresFix, str | None]:
    """`--from IMAGE` of a hires-fixed image: the same second pass, and the first pass's size (the record's
    width and height are the final image's). Values are checked later, like the flags'."""
    defaults = HiresFix()
    first = (recorded.get("first_width"), recorded.get("first_height"))
    size = f"{first[0]}x{first[1]}" if all(isinstance(v, int) and not isinstance(v, bool) for v in first) else None
    upscaler = recorded.get("upscaler")
    return HiresFix(scale=recorded.get("scale", defaults.scale), denoise=recorded.get("denoise", defaults.denoise),
                    steps=recorded.get("steps"), upscaler=upscaler if isinstance(upscaler, str) else LANCZOS), size
