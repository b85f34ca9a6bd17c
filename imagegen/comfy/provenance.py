"""Read the parameters an image was made with, for `generate --from IMAGE.png`.

Sources, best first: imagegen's own `imagegen` chunk; an A1111-style `parameters` chunk; the
ComfyUI `prompt` chunk (the API graph) of an image saved by plain ComfyUI.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from imagegen.comfy import png
from imagegen.util.errors import ImagegenError

A1111_SAMPLERS = {"euler a": "euler_ancestral", "euler": "euler", "heun": "heun", "lms": "lms", "ddim": "ddim",
                  "dpm2": "dpm_2", "dpm2 a": "dpm_2_ancestral", "dpm++ 2m": "dpmpp_2m", "dpm++ sde": "dpmpp_sde",
                  "dpm++ 2m sde": "dpmpp_2m_sde", "dpm++ 2s a": "dpmpp_2s_ancestral", "dpm++ 3m sde": "dpmpp_3m_sde",
                  "unipc": "uni_pc", "lcm": "lcm"}
KEYS = ("prompt", "negative", "model", "seed", "width", "height", "steps", "cfg", "sampler", "scheduler", "guidance")


def read_parameters(path: Path) -> dict:
    try:
        chunks = png.read_text_chunks(Path(path).read_bytes())
    except FileNotFoundError:
        raise ImagegenError("invalid_source_image", f"{path}: no such file", hint="Check the path given to --from.") from None
    except ValueError as exc:
        raise ImagegenError("invalid_source_image", f"{path}: not a PNG file ({exc})") from None
    if "imagegen" in chunks:
        record = json.loads(chunks["imagegen"])
        return {key: record[key] for key in KEYS if record.get(key) is not None}
    if "parameters" in chunks:
        return parse_a1111(chunks["parameters"])
    if "prompt" in chunks:
        return parse_comfy_graph(json.loads(chunks["prompt"]))
    raise ImagegenError("invalid_source_image", f"{path}: carries no generation parameters (no imagegen, parameters or prompt chunk)")


def parse_a1111(text: str) -> dict:
    lines = text.strip().split("\n")
    settings_line = lines.pop() if lines and re.match(r"^Steps: \d+", lines[-1]) else ""
    prompt_lines, negative_lines, target = [], [], None
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:"):].strip()
        (target if target is not None else prompt_lines).append(line)
    found: dict = {"prompt": "\n".join(prompt_lines).strip()}
    if negative_lines:
        found["negative"] = "\n".join(negative_lines).strip()
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
    return found


def parse_comfy_graph(graph: dict) -> dict:
    """The sampling parameters of a plain ComfyUI text-to-image graph."""
    found: dict = {}
    for node in graph.values():
        kind, inputs = node.get("class_type"), node.get("inputs", {})
        if kind == "KSampler":
            found.update(seed=inputs.get("seed"), steps=inputs.get("steps"), cfg=inputs.get("cfg"),
                         sampler=inputs.get("sampler_name"), scheduler=inputs.get("scheduler"))
            for key, link in (("prompt", inputs.get("positive")), ("negative", inputs.get("negative"))):
                source = graph.get(str(link[0])) if isinstance(link, list) else None
                if source and isinstance(source.get("inputs", {}).get("text"), str):
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
