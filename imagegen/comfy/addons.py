"""Graph pieces for LoRA stacks and ControlNets (ComfyUI core nodes), and the worker-log lines that say a
LoRA key was not applied.

The builders in comfy/workflows.py call apply_loras on the loaded model and CLIP before anything reads
them, and apply_controls on the encoded prompts before the sampler. Node ids are numbered by position
in the stack (lora_0, lora_1, ...; control_0_...), so a graph stays readable. The stacks are lists of
workflows.LoraUse / ControlUse (not imported here: workflows imports this module).
"""

from __future__ import annotations

from typing import Any

MAX_LORA_STRENGTH = 100.0      # LoraLoader's strength_model/strength_clip range is -100..100
MAX_CONTROL_STRENGTH = 10.0    # ControlNetApplyAdvanced's strength range is 0..10
CANNY_THRESHOLDS = (0.4, 0.8)  # the Canny node's defaults (low, high)
PREPROCESSORS = ("canny",)
UNLOADED_LORA_KEY = "lora key not loaded: "  # what comfy/lora.py logs for a key it cannot map


def _node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def apply_loras(graph: dict, model_ref: list, clip_ref: list | None, loras: list[Any]) -> tuple[list, list | None]:
    """Chain one LoraLoader per LoRA (LoraLoaderModelOnly where there is no CLIP to patch, as for Flux,
    whose text encoders LoRAs rarely train); returns the patched model and CLIP to use from then on."""
    for index, lora in enumerate(loras):
        node = f"lora_{index}"
        if clip_ref is None:
            graph[node] = _node("LoraLoaderModelOnly", model=model_ref, lora_name=lora.filename,
                                strength_model=lora.strength)
            model_ref = [node, 0]
        else:
            graph[node] = _node("LoraLoader", model=model_ref, clip=clip_ref, lora_name=lora.filename,
                                strength_model=lora.strength, strength_clip=lora.strength)
            model_ref, clip_ref = [node, 0], [node, 1]
    return model_ref, clip_ref


def apply_controls(graph: dict, positive_ref: list, negative_ref: list, vae_ref: list,
                   controls: list[Any]) -> tuple[list, list]:
    """One ControlNetLoader + ControlNetApplyAdvanced per ControlNet, each on the conditioning the one
    before it gave (so they stack), with a Canny node on the control image first when asked."""
    for index, control in enumerate(controls):
        if not control.image:
            raise ValueError(f"ControlNet {index} ({control.name or control.filename}) has no uploaded image")
        prefix = f"control_{index}"
        graph[f"{prefix}_image"] = _node("LoadImage", image=control.image)
        image = [f"{prefix}_image", 0]
        if control.preprocess == "canny":
            low, high = CANNY_THRESHOLDS
            graph[f"{prefix}_canny"] = _node("Canny", image=image, low_threshold=low, high_threshold=high)
            image = [f"{prefix}_canny", 0]
        elif control.preprocess:
            raise ValueError(f"unknown ControlNet preprocessor {control.preprocess!r} (known: {PREPROCESSORS})")
        graph[f"{prefix}_model"] = _node("ControlNetLoader", control_net_name=control.filename)
        graph[f"{prefix}_apply"] = _node("ControlNetApplyAdvanced", positive=positive_ref, negative=negative_ref,
                                         control_net=[f"{prefix}_model", 0], image=image, strength=control.strength,
                                         start_percent=control.start, end_percent=control.end, vae=vae_ref)
        positive_ref, negative_ref = [f"{prefix}_apply", 0], [f"{prefix}_apply", 1]
    return positive_ref, negative_ref


def log_marker(entries: list[dict]) -> str:
    """The time stamp of the worker log's last entry (ComfyUI's /internal/logs/raw): later entries are new."""
    return str(entries[-1].get("t", "")) if entries else ""


def unloaded_lora_keys(entries: list[dict], since: str = "") -> list[str]:
    """The LoRA keys ComfyUI logged it could not load, in entries stamped after `since` (its own clock's
    ISO times, which sort as text)."""
    keys: list[str] = []
    for entry in entries:
        if since and str(entry.get("t", "")) <= since:
            continue
        for line in str(entry.get("m", "")).splitlines():
            if line.startswith(UNLOADED_LORA_KEY):
                keys.append(line[len(UNLOADED_LORA_KEY):].strip())
    return keys
