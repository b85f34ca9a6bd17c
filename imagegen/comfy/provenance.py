"""Read the parameters an image was made with, for `generate --from IMAGE.png`.

Sources, best first: imagegen's own `imagegen` chunk; an A1111-style `parameters` chunk; the
ComfyUI `prompt` chunk (the API graph) of an image saved by plain ComfyUI.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

from imagegen.comfy import png
from imagegen.util.errors import ImagegenError

A1111_SAMPLERS = {"euler a": "euler_ancestral", "euler": "euler", "heun": "heun", "lms": "lms", "ddim": "ddim",
                  "dpm2": "dpm_2", "dpm2 a": "dpm_2_ancestral", "dpm++ 2m": "dpmpp_2m", "dpm++ sde": "dpmpp_sde",
                  "dpm++ 2m sde": "dpmpp_2m_sde", "dpm++ 2s a": "dpmpp_2s_ancestral", "dpm++ 3m sde": "dpmpp_3m_sde",
                  "unipc": "uni_pc", "lcm": "lcm"}
KEYS = ("prompt", "negative", "model", "seed", "width", "height", "steps", "cfg", "sampler", "scheduler", "guidance",
        "denoise", "mask_grow", "extend", "inputs", "loras", "controls", "hires")


MAX_IMAGE_BYTES = 64 * 1024 * 1024  # a PNG larger than this is not one imagegen or ComfyUI wrote
TYPES = {"prompt": str, "negative": str, "model": str, "model_file": str, "sampler": str, "scheduler": str,
         "seed": int, "width": int, "height": int, "steps": int, "cfg": float, "guidance": float,
         "denoise": float, "mask_grow": int, "extend": list, "inputs": dict, "loras": list, "controls": list,
         "hires": dict}
_NUMBER: tuple[type, ...] = (int, float)
ADDON_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {  # what each recorded LoRA/ControlNet must hold
    "loras": {"name": str, "strength": _NUMBER},
    "controls": {"model": str, "strength": _NUMBER, "start": _NUMBER, "end": _NUMBER}}
MAX_SETTINGS_LINE = 8192
HINT = "Pass a PNG written by imagegen (or by ComfyUI with its prompt chunk)."


def _refuse(path: Path, why: str, hint: str = HINT) -> ImagegenError:
    return ImagegenError("invalid_source_image", f"{path}: {why}", hint=hint)


def read_image(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_IMAGE_BYTES: never a device, pipe or folder."""
    path = Path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise _refuse(path, "is a directory, not an image", hint="Pass the PNG file itself to --from.")
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(path, "is not a regular file (a device or a pipe)", hint="Pass a PNG file to --from.")
        if info.st_size > MAX_IMAGE_BYTES:
            raise _refuse(path, f"is {info.st_size} bytes, larger than the {MAX_IMAGE_BYTES // 2**20} MiB a PNG with "
                                "parameters can be")
        with path.open("rb") as handle:
            data = handle.read(MAX_IMAGE_BYTES + 1)
    except FileNotFoundError:
        raise _refuse(path, "no such file", hint="Check the path given to --from.") from None
    except OSError as exc:
        raise _refuse(path, f"cannot be read: {exc.strerror or exc}", hint="Check the path given to --from.") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise _refuse(path, f"grew past {MAX_IMAGE_BYTES // 2**20} MiB while being read")
    return data


def read_parameters(path: Path) -> dict:
    data = read_image(path)
    try:
        chunks = png.read_text_chunks(data)
        if "imagegen" in chunks:
            record = json.loads(chunks["imagegen"])
            if not isinstance(record, dict):
                raise ValueError("the imagegen chunk is not a JSON object")
            found = {key: record[key] for key in KEYS if record.get(key) is not None}
        elif "parameters" in chunks:
            found = parse_a1111(chunks["parameters"])
        elif "prompt" in chunks:
            graph = json.loads(chunks["prompt"])
            if not isinstance(graph, dict):
                raise ValueError("the prompt chunk is not a ComfyUI graph (a JSON object)")
            found = parse_comfy_graph(graph)
        else:
            raise _refuse(path, "carries no generation parameters (no imagegen, parameters or prompt chunk)")
    except png.BadPNG as exc:
        raise _refuse(path, f"not a valid PNG file ({exc})") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise _refuse(path, f"its parameters are malformed ({exc.__class__.__name__}: {exc})") from None
    return _checked(path, found)


def _checked(path: Path, found: dict) -> dict:
    """Refuse a value of the wrong type (a seed that is a list, a prompt that is a number) up front."""
    for key, value in found.items():
        expected = TYPES.get(key)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            found[key] = value = float(value)
        if expected is not None and (not isinstance(value, expected) or isinstance(value, bool)):
            raise _refuse(path, f"its {key!r} parameter is {value!r}, not a {expected.__name__}")
    for key, required in ADDON_FIELDS.items():
        for entry in found.get(key, []):
            if not isinstance(entry, dict) or any(not isinstance(entry.get(name), kind)
                                                  or isinstance(entry.get(name), bool)
                                                  for name, kind in required.items()):
                raise _refuse(path, f"its {key} entry {entry!r} lacks {', '.join(required)}")
    for role, source in found.get("inputs", {}).items():  # the input image and mask: {name, path, sha256}
        if not (isinstance(source, dict) and isinstance(source.get("name"), str)
                and isinstance(source.get("path", ""), str)
                and re.fullmatch(r"[0-9a-f]{64}", str(source.get("sha256")))):
            raise _refuse(path, f"its input {role!r} is {source!r}, not a name, path and sha256")
    return found


def parse_a1111(text: str) -> dict:
    lines = text.strip().split("\n")
    settings_line = lines.pop() if lines and re.match(r"^Steps: \d+", lines[-1]) else ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target: list[str] | None = None
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:"):].strip()
        (target if target is not None else prompt_lines).append(line)
    found: dict = {"prompt": "\n".join(prompt_lines).strip()}
    if negative_lines:
        found["negative"] = "\n".join(negative_lines).strip()
    if len(settings_line) > MAX_SETTINGS_LINE:  # the pattern below is quadratic on a long line
        raise ValueError(f"the settings line has {len(settings_line)} characters (at most {MAX_SETTINGS_LINE})")
    settings = dict(re.findall(r"([A-Za-z][A-Za-z0-9 ]*): ([^,]+)", settings_line))
    if "Steps" in settings:
        found["steps"] = int(settings["Steps"])
    if "Seed" in settings:
        found["seed"] = int(settings["Seed"])
    if "CFG scale" in settings:
        found["cfg"] = float(settings["CFG scale"])
    if "Size" in settings:
        width, height = settings["Size"].lower().split("x")
        found["width"], found["height"] = int(width), int(height)
    if "Guidance" in settings:
        found["guidance"] = float(settings["Guidance"])
    sampler = settings.get("Sampler", "").strip()
    lowered = sampler.lower()
    if lowered.endswith(" karras"):
        found["scheduler"], lowered = "karras", lowered[: -len(" karras")]
    if "Schedule type" in settings:
        found["scheduler"] = settings["Schedule type"].strip().lower()
    if lowered:
        found["sampler"] = A1111_SAMPLERS.get(lowered, lowered)
    if "Model" in settings:
        found["model"] = settings["Model"].strip()
    if "Hires upscale" in settings and "width" in found:  # A1111's hires fix; its Size is the first pass's
        steps = int(settings.get("Hires steps", "0"))
        upscaler = settings.get("Hires upscaler", "").strip().lower()
        found["hires"] = {"scale": float(settings["Hires upscale"]),
                          "denoise": float(settings.get("Denoising strength", "0.35")), "steps": steps or None,
                          "upscaler": "latent" if upscaler.startswith("latent") else "lanczos",
                          "first_width": found["width"], "first_height": found["height"]}
    return found


def parse_comfy_graph(graph: dict) -> dict:
    """The sampling parameters of a plain ComfyUI text-to-image graph."""
    found: dict = {}
    for node in graph.values():
        if not isinstance(node, dict) or not isinstance(node.get("inputs", {}), dict):
            continue
        kind, inputs = node.get("class_type"), node.get("inputs", {})
        if kind == "KSampler":
            found.update(seed=inputs.get("seed"), steps=inputs.get("steps"), cfg=inputs.get("cfg"),
                         sampler=inputs.get("sampler_name"), scheduler=inputs.get("scheduler"))
            for key, link in (("prompt", inputs.get("positive")), ("negative", inputs.get("negative"))):
                source = graph.get(str(link[0])) if isinstance(link, list) and link else None
                if isinstance(source, dict) and isinstance(source.get("inputs"), dict) and \
                        isinstance(source["inputs"].get("text"), str):
                    found[key] = source["inputs"]["text"]
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            found.update(width=inputs.get("width"), height=inputs.get("height"))
        elif kind == "RandomNoise":
            found["seed"] = inputs.get("noise_seed")
        elif kind == "FluxGuidance":
            found["guidance"] = inputs.get("guidance")
        elif kind == "CLIPTextEncode" and "prompt" not in found and isinstance(inputs.get("text"), str):
            found.setdefault("prompt", inputs["text"])
        elif kind in ("CheckpointLoaderSimple", "UNETLoader"):
            name = inputs.get("ckpt_name") or inputs.get("unet_name")
            if isinstance(name, str):
                found["model_file"] = name
    return {key: value for key, value in found.items() if value is not None}
