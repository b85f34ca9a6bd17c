"""A funnel's LoRAs (`funnel --lora`, `<lora:...>` in its prompt): a LoRA is trained for one model family and the
stages draw with several, so each LoRA applies on every stage whose model is of its family, and the other stages
render without it (a note each). The per-stage stack goes into funnel.json (stage records' `loras` and
`without_loras`), so `funnel resume` applies the same one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imagegen.engine import addon_names, addons
from imagegen.funnel.stages import Stage, resolve
from imagegen.models import addon_files
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError

DRAWING = ("sd15", "sdxl", "flux")


def plan(prompt: str, loras: list | None, stages: list[Stage], registry: Registry) -> tuple[str, list[dict]]:
    """The prompt without its <lora:...> tags, and for each stage {"loras": [{name, strength}], "without_loras":
    [{name, family}]}. A LoRA that no stage can apply is refused (lora_mismatch) before anything starts."""
    text, tags = addons.split_prompt(prompt)
    wanted = [addons.parse_lora(spec) for spec in (loras or [])] + tags
    if len(wanted) > addons.MAX_LORAS:
        raise ImagegenError("invalid_argument", f"at most {addons.MAX_LORAS} LoRAs per image")
    stack: list[dict[str, Any]] = []
    for name, strength in wanted:
        strength = addons.lora_strength(name, strength)
        bundle = addon_names.resolve(name, "lora", registry)
        path = Path(name).expanduser()
        kept = str(path.resolve()) if path.exists() else name  # funnel.json works from any folder
        stack.append({"name": kept, "strength": strength, "family": addon_names.family_of(bundle, "lora")})
    if not stack:
        return text, []
    families = [resolve(stage.model, registry).family for stage in stages]
    for entry in stack:
        if entry["family"] is not None and entry["family"] not in families:
            found = ", ".join(f"{stage.name}: {'upscaler' if family == 'upscale' else addon_files.family_name(family)}"
                              for stage, family in zip(stages, families, strict=True))
            raise ImagegenError("lora_mismatch", f"LoRA {label(entry['name'])} is for "
                                f"{addon_files.family_name(entry['family'])} models, and no stage of this funnel "
                                f"draws with one ({found})",
                                hint=f"Use a LoRA made for one of those families, or give a stage a model of the "
                                     f"{addon_files.family_name(entry['family'])} family (--draft-model, "
                                     "--refine-model, --polish-model or --stages).",
                                addon=entry["name"], addon_family=entry["family"], stage_families=families)
    per_stage = []
    for family in families:
        applies = [e for e in stack if family in DRAWING and e["family"] in (family, None)]
        per_stage.append({"loras": [{"name": e["name"], "strength": e["strength"]} for e in applies],
                          "without_loras": [{"name": e["name"], "family": e["family"]} for e in stack
                                            if e not in applies]})
    return text, per_stage


def label(name: str) -> str:
    """How a LoRA is named in messages: a file by its file name, else the name the user gave."""
    return Path(name).name if name.endswith(".safetensors") else name


def notes(record: dict, number: int, family: str) -> list[str]:
    """One line per stage that renders without some of the funnel's LoRAs."""
    without = record.get("without_loras") or []
    if not without:
        return []
    names = ", ".join(f"{label(entry['name'])} ({entry['family'] or 'unknown family'})" for entry in without)
    return [f"stage {number} {record['name']} ({family}): renders without LoRA {names}"]


def check_record(record: dict) -> str | None:
    """Why a stage record's `loras` / `without_loras` cannot be used (a hand-edited funnel.json), or None."""
    for key, fields in (("loras", ("name", "strength")), ("without_loras", ("name", "family"))):
        entries = record.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list) or len(entries) > addons.MAX_LORAS:
            return f"{key}: {entries!r} must be a list of at most {addons.MAX_LORAS}"
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) != set(fields) or not isinstance(entry["name"], str):
                return f"{key}: {entry!r} must be an object with {' and '.join(fields)}"
            if key == "loras" and (isinstance(entry["strength"], bool)
                                   or not isinstance(entry["strength"], (int, float))):
                return f"{key}: the strength {entry['strength']!r} is not a number"
            if key == "without_loras" and not isinstance(entry["family"], (str, type(None))):
                return f"{key}: the family {entry['family']!r} is not a string"
    return None
