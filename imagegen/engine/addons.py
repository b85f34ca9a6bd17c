"""LoRA stacks and ControlNets on a request: parse `--lora`/`--control` and A1111 `<lora:name:0.8>` prompt tags,
resolve each (engine/addon_names.py: a registry entry, a .safetensors file, or a file's name in the model folders),
refuse one made for another model family before anything loads, and make their files loadable and hashed for
provenance.

A LoRA or ControlNet is a one-file bundle (family `lora` or `controlnet`, registry.py) that a job carries beside
its model (Job.addons); the graph loads it by its file name (comfy/addons.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from imagegen.comfy import addons as graph_addons
from imagegen.comfy.workflows import ControlUse, LoraUse, Params
from imagegen.engine import addon_names
from imagegen.engine.addon_names import check_family, is_file_name, resolve
from imagegen.models import cache
from imagegen.models.registry import ROLE_FOLDERS, Bundle, Registry
from imagegen.util.errors import ImagegenError

MAX_LORAS = 16
MAX_CONTROLS = 8
# <lora:NAME>, <lora:NAME:0.8> and A1111's <lora:NAME:TE:UNET> (the first multiplier is the strength here)
LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>", re.IGNORECASE)
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


@dataclass
class Chosen:
    """What a request's LoRAs and ControlNets add to its jobs."""
    prompt: str                                              # with <lora:...> tags taken out
    loras: list[LoraUse] = field(default_factory=list)
    controls: list[ControlUse] = field(default_factory=list)  # image: the local file until uploaded
    bundles: list[Bundle] = field(default_factory=list)       # one per distinct LoRA / ControlNet file
    notes: list[str] = field(default_factory=list)            # warnings for the user (a family not told)


def split_prompt(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its <lora:name:strength> tags, and the tags' (name, strength) in order."""
    tags = []
    for match in LORA_TAG.finditer(prompt):
        name, strength = match.group(1).strip(), (match.group(2) or "").strip()
        tags.append((name, _number(strength, f"<lora:{name}:{strength}>") if strength else 1.0))
    if not tags:
        return prompt, []
    text = LORA_TAG.sub(" ", prompt)
    text = re.sub(r"\s*,(\s*,)+", ",", text)          # "a, <lora:x>, b" -> "a, b"
    text = re.sub(r"[ \t]{2,}", " ", text).strip().strip(",").strip()
    return text, tags


def _number(text: str, what: str) -> float:
    if not NUMBER.fullmatch(text.strip()):
        raise ImagegenError("invalid_argument", f"{what}: {text!r} is not a number",
                            hint="A strength is a number such as 0.8, e.g. --lora style:0.8.")
    return float(text)


def _in_range(value: Any, low: float, high: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ImagegenError("invalid_argument", f"{what} {value!r} is outside {low:g}..{high:g}")
    return float(value)


def lora_strength(name: str, strength: Any) -> float:
    """A LoRA's strength, checked against LoraLoader's range."""
    bound = graph_addons.MAX_LORA_STRENGTH
    return _in_range(strength, -bound, bound, f"LoRA {name} strength")


def parse_lora(spec: Any) -> tuple[str, float]:
    """NAME_OR_FILE[:STRENGTH] (a path may hold ':', so the strength is taken from the right), or a
    {"name", "strength"} mapping (batch JSONL, MCP)."""
    if isinstance(spec, dict):
        unknown = set(spec) - {"name", "strength"}
        if unknown or not isinstance(spec.get("name"), str):
            raise ImagegenError("invalid_argument", f"a LoRA {spec!r} needs a \"name\" and at most a \"strength\"")
        return spec["name"], lora_strength(spec["name"], spec.get("strength", 1.0))
    if not isinstance(spec, str) or not spec.strip():
        raise ImagegenError("invalid_argument", f"a LoRA is NAME_OR_FILE[:STRENGTH], not {spec!r}")
    head, separator, tail = spec.rpartition(":")
    if separator and head and NUMBER.fullmatch(tail.strip()):
        return head, float(tail)
    return spec, 1.0


@dataclass
class ControlSpec:
    model: str
    image: str
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str | None = None


def parse_control(spec: Any, registry: Registry, preprocess: str | None = None) -> ControlSpec:
    """MODEL:IMAGE[:STRENGTH[:START:END]] (numbers taken from the right, MODEL from the left: a registered
    name or a .safetensors file; IMAGE may hold ':'), or a mapping {model, image, strength, start, end,
    preprocess}."""
    if isinstance(spec, dict):
        allowed = {"model", "image", "strength", "start", "end", "preprocess"}
        if set(spec) - allowed or not isinstance(spec.get("model"), str) or not isinstance(spec.get("image"), str):
            raise ImagegenError("invalid_argument", f"a ControlNet {spec!r} needs \"model\" and \"image\" strings "
                                f"(and may have {', '.join(sorted(allowed - {'model', 'image'}))})")
        return ControlSpec(spec["model"], spec["image"], spec.get("strength", 1.0), spec.get("start", 0.0),
                           spec.get("end", 1.0), spec.get("preprocess", preprocess))
    if not isinstance(spec, str):
        raise ImagegenError("invalid_argument", f"a ControlNet is MODEL:IMAGE[:STRENGTH[:START:END]], not {spec!r}")
    parts = spec.split(":")
    numbers: list[float] = []
    while len(parts) > 2 and len(numbers) < 3 and NUMBER.fullmatch(parts[-1].strip()):
        numbers.insert(0, float(parts.pop()))
    if len(numbers) == 2:
        raise ImagegenError("invalid_argument", f"--control {spec}: give STRENGTH, or STRENGTH:START:END",
                            hint="For example --control canny-sd15:edges.png:0.8:0.0:0.6.")
    rest = ":".join(parts)
    for index in range(1, len(parts)):
        model, image = ":".join(parts[:index]), ":".join(parts[index:])
        if model in registry.bundles or (model.endswith(".safetensors") and Path(model).expanduser().is_file()):
            break
    else:
        model, _, image = rest.partition(":")
    if not model or not image:
        raise ImagegenError("invalid_argument", f"--control {spec}: expected MODEL:IMAGE[:STRENGTH[:START:END]]",
                            hint="For example --control canny-sd15:edges.png:0.8.")
    strength, start, end = (numbers + [0.0, 1.0])[:3] if numbers else (1.0, 0.0, 1.0)
    return ControlSpec(model, image, strength, start, end, preprocess)


def anchored(loras: Any, controls: Any, folder: Path | None, registry: Registry | None = None) -> tuple[Any, Any]:
    """The local files of a LoRA stack and ControlNets (a .safetensors path, a control image) made absolute
    against `folder`, a batch file's folder (as its items' image and mask are). With no folder (an MCP tool:
    the server's working folder means nothing to its client) a relative path is refused. A spec that does not
    parse is left for choose() to report."""
    if not isinstance(loras, list) and not isinstance(controls, list):
        return loras, controls
    registry = registry or Registry.load()

    def place(value: str, what: str) -> str:
        path = Path(value).expanduser()
        if path.is_absolute():
            return value
        if folder is None:
            raise ImagegenError("invalid_argument", f"{what} {value!r} is not an absolute path",
                                hint=f"Pass the {what} as an absolute path (the server's working folder is not yours).")
        return str(folder / path)

    def is_file(name: str, kind: str) -> bool:
        if name in registry.bundles or not is_file_name(name):
            return False
        path = Path(name).expanduser()
        if path.is_absolute() or (folder is not None and (folder / path).exists()):
            return True
        if cache.find_by_name(name, ROLE_FOLDERS[kind]).matches:  # `sub/name` in the model folders
            return False
        return name.endswith(".safetensors") or path.exists()

    stack = []
    for spec in loras if isinstance(loras, list) else []:
        try:
            name, strength = parse_lora(spec)
        except ImagegenError:
            stack.append(spec)
            continue
        stack.append({"name": place(name, "LoRA file"), "strength": strength} if is_file(name, "lora") else spec)
    steering = []
    for spec in controls if isinstance(controls, list) else []:
        try:
            control = parse_control(spec, registry)
        except ImagegenError:
            steering.append(spec)
            continue
        model = place(control.model, "ControlNet file") if is_file(control.model, "controlnet") else control.model
        placed = {"model": model,
                  "image": place(control.image, "control image"), "strength": control.strength,
                  "start": control.start, "end": control.end}
        if isinstance(spec, dict) and "preprocess" in spec:
            placed["preprocess"] = spec["preprocess"]
        steering.append(placed)
    return (stack if isinstance(loras, list) else loras), (steering if isinstance(controls, list) else controls)


def choose(prompt: str, loras: list | None, controls: list | None, preprocess: str | None, model: Bundle,
           registry: Registry | None = None, where: str = "") -> Chosen:
    """Parse, resolve and check a request's LoRAs (flags first, then prompt tags) and ControlNets."""
    from imagegen.engine import inputs

    prefix = f"{where}: " if where else ""
    text, tags = split_prompt(prompt)
    wanted = [parse_lora(spec) for spec in (loras or [])] + tags
    if not wanted and not controls and not preprocess:
        return Chosen(prompt)
    if model.family not in ("sd15", "sdxl", "flux"):
        raise ImagegenError("invalid_argument", f"{prefix}LoRAs and ControlNets apply to drawing models, "
                            f"not to {model.name} ({model.family})")
    if preprocess not in (None, *graph_addons.PREPROCESSORS):
        raise ImagegenError("invalid_argument", f"{prefix}--control-preprocess {preprocess!r} is not one of "
                            f"{', '.join(graph_addons.PREPROCESSORS)}")
    if preprocess and not controls:
        raise ImagegenError("invalid_argument", f"{prefix}--control-preprocess needs a --control MODEL:IMAGE")
    if len(wanted) > MAX_LORAS or len(controls or []) > MAX_CONTROLS:
        raise ImagegenError("invalid_argument", f"{prefix}at most {MAX_LORAS} LoRAs and {MAX_CONTROLS} ControlNets "
                            "per image")
    registry = registry or Registry.load()
    chosen = Chosen(text)
    seen: dict[str, Bundle] = {}
    try:
        for name, strength in wanted:
            strength = lora_strength(name, strength)
            bundle = _once(seen, resolve(name, "lora", registry), "lora", model, chosen)
            file = bundle.files["lora"]
            chosen.loras.append(LoraUse(file.filename, strength, bundle.name, sha256=file.sha256))
        for spec in controls or []:
            control = parse_control(spec, registry, preprocess)
            bundle = _once(seen, resolve(control.model, "controlnet", registry), "controlnet", model, chosen)
            strength = _in_range(control.strength, 0.0, graph_addons.MAX_CONTROL_STRENGTH,
                                 f"ControlNet {bundle.name} strength")
            start = _in_range(control.start, 0.0, 1.0, f"ControlNet {bundle.name} start")
            end = _in_range(control.end, 0.0, 1.0, f"ControlNet {bundle.name} end")
            if start > end:
                raise ImagegenError("invalid_argument", f"ControlNet {bundle.name}: start {start:g} is after "
                                    f"end {end:g}", hint="START and END are fractions of the sampling, 0 <= START <= "
                                                         "END <= 1.")
            if control.preprocess not in (None, *graph_addons.PREPROCESSORS):
                raise ImagegenError("invalid_argument", f"ControlNet {bundle.name}: preprocess "
                                    f"{control.preprocess!r} is not one of {', '.join(graph_addons.PREPROCESSORS)}")
            image = inputs.load(Path(control.image), "control")
            file = bundle.files["controlnet"]
            chosen.controls.append(ControlUse(file.filename, str(image.path), strength, start, end,
                                              control.preprocess, bundle.name, sha256=file.sha256,
                                              image_sha256=image.sha256))
    except ImagegenError as error:
        error.message = prefix + error.message
        raise
    return chosen


def _once(seen: dict[str, Bundle], bundle: Bundle, kind: str, model: Bundle, chosen: Chosen) -> Bundle:
    """Each distinct file is checked and carried once, however often the stack names it."""
    key = bundle.files[kind].filename
    if key not in seen:
        check_family(bundle, kind, model, chosen.notes)
        seen[key] = bundle
        chosen.bundles.append(bundle)
    return seen[key]


def job_files(params: Params) -> dict[str, Path]:
    """A job's control images (Job.inputs "control:N"): the normalized PNG of each, made again from the
    user's file when this process has none."""
    from imagegen.engine import inputs

    files: dict[str, Path] = {}
    for index, control in enumerate(params.controls):
        if control.image and control.image_sha256:
            record = {"path": control.image, "sha256": control.image_sha256}
            files[f"control:{index}"] = inputs.normalized_for("control", record)
    return files


def make_loadable(bundles: list[Bundle], runtime, fetch) -> None:
    """Fetch registered LoRAs/ControlNets and link local ones into the cache the workers read. A remote
    worker reads its own models folders: a local file cannot reach it."""
    for bundle in bundles:
        local = [f.local_path for f in bundle.files.values() if f.local_path]
        if local and not getattr(runtime, "reads_local_files", True):
            raise ImagegenError("invalid_argument", f"remote workers cannot read the local file {local[0]}",
                                hint="Register it in models.yaml with a repo and file (the remote workers must hold "
                                     "it under that name), or use another --runtime.")
        if getattr(runtime, "uses_host_cache", True):
            cache.ensure_bundle(bundle, fetch=fetch)
        elif hasattr(runtime, "ensure_bundle"):  # workers with caches of their own that the runtime fills (Ray nodes)
            runtime.ensure_bundle(bundle)


def local_files(bundles: list[Bundle]) -> set[str]:
    """The local files a container must see (mounted read-only at the same path)."""
    return {str(Path(f.local_path).absolute()) for b in bundles for f in b.files.values() if f.local_path}


def hashed(params: Params, bundles: list[Bundle]) -> Params:
    """The job with each LoRA's and ControlNet's sha256 (the registry's, the ledger's, or computed once
    for a local file), now that the files are in place."""
    if not bundles:
        return params
    digests: dict[str, str | None] = {}
    for bundle in bundles:
        for role, digest in cache.file_hashes(bundle).items():
            digests[bundle.files[role].filename] = digest
    loras = [replace(lora, sha256=digests.get(lora.filename) or lora.sha256) for lora in params.loras]
    controls = [replace(c, sha256=digests.get(c.filename) or c.sha256) for c in params.controls]
    return replace(params, loras=loras, controls=controls)


def records(params: Params) -> dict:
    """What the image's record says of its LoRAs and ControlNets (only the keys that apply)."""
    found: dict = {}
    if params.loras:
        found["loras"] = [{"name": lora.name, "file": lora.filename, "sha256": lora.sha256,
                           "strength": lora.strength} for lora in params.loras]
    if params.controls:
        found["controls"] = [{"model": c.name, "file": c.filename, "sha256": c.sha256,
                              "image": Path(c.image).name if c.image else None, "image_path": c.image,
                              "image_sha256": c.image_sha256, "strength": c.strength, "start": c.start,
                              "end": c.end, "preprocess": c.preprocess} for c in params.controls]
    return found


def from_record(found: dict, given: dict, image: Path, registry: Registry | None = None) -> dict:
    """For `--from IMAGE`: the LoRAs and ControlNets the image records, as --lora/--control values, where the
    user gave none. A file that is not here is an error naming it and its sha256."""
    merged: dict = {}
    if found.get("loras") and not given.get("loras"):
        registry = registry or Registry.load()
        merged["loras"] = [{"name": addon_names.recorded_name(entry, "lora", image, registry),
                            "strength": entry["strength"]} for entry in found["loras"]]
    if found.get("controls") and not given.get("controls"):
        from imagegen.engine import inputs

        registry = registry or Registry.load()
        merged["controls"] = []
        for entry in found["controls"]:
            # where it was, else next to the image, and only while its sha256 matches (as --image's)
            picture = inputs.find_recorded("control", {"name": str(entry.get("image") or ""),
                                                       "path": entry.get("image_path"),
                                                       "sha256": entry.get("image_sha256")}, image)
            merged["controls"].append({"model": addon_names.recorded_name(entry, "controlnet", image, registry),
                                       "image": str(picture), "strength": entry["strength"],
                                       "start": entry["start"], "end": entry["end"],
                                       "preprocess": entry.get("preprocess")})
    return merged


def log_marker(client, params: Params) -> str | None:
    """Before a job with LoRAs is queued: where the worker's log stands (None: no LoRAs, or no log to read)."""
    if not params.loras:
        return None
    entries = client.log_entries()
    return None if entries is None else graph_addons.log_marker(entries)


def unapplied_warning(client, params: Params, marker: str | None) -> str | None:
    """After the job: a warning naming the LoRA keys ComfyUI logged it could not apply ("lora key not
    loaded") since `marker`. Several jobs queued on one worker share the log, so a key is reported by
    the job during which its LoRA loaded (ComfyUI loads a LoRA once and keeps it)."""
    if marker is None:
        return None
    keys = graph_addons.unloaded_lora_keys(client.log_entries() or [], marker)
    if not keys:
        return None
    names = ", ".join(lora.name for lora in params.loras)
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return (f"the worker could not apply {len(keys)} key(s) of LoRA {names} (ComfyUI: \"lora key not loaded\": "
            f"{shown}): the LoRA is only partly applied; it may be for another model or in a layout ComfyUI "
            "does not map")
