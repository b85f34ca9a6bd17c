"""Which file a LoRA or ControlNet name means: a registered entry, a .safetensors path, or, as A1111 and ComfyUI users
name them, a file's bare name (`watercolor`, `styles/watercolor`) in the model cache or a shared model tree; and the
family check every one of them goes through before anything loads.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from pathlib import Path

from imagegen.models import addon_files, cache, modelfile
from imagegen.models.registry import LOCAL_SUBFOLDER, ROLE_FOLDERS, Bundle, ModelFile, Registry
from imagegen.util import paths
from imagegen.util.errors import ImagegenError

KINDS = {"lora": "LoRA", "controlnet": "ControlNet"}
SUGGESTIONS = 3


def is_file_name(name: str) -> bool:
    """Whether a model named on the command line is a file's path rather than a registered name."""
    return name.endswith(".safetensors") or "/" in name or os.sep in name


def local_addon(path: Path, kind: str, family: str | None = None, name: str | None = None) -> Bundle:
    """A one-file bundle for a local LoRA/ControlNet (or upscale model: kind upscale_model, family upscale),
    linked into the cache under a name unique to its path (two files named alike in different folders never
    replace each other's link)."""
    path = path.expanduser().absolute()
    tag = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    file = ModelFile(key=f"{path.stem}.{kind}", folder=ROLE_FOLDERS[kind],
                     filename=f"{LOCAL_SUBFOLDER}/{tag}-{path.name}", local_path=str(path), size=path.stat().st_size)
    return Bundle(name=name or path.name, family=family or kind, files={kind: file}, source=str(path))


def resolve(name: str, kind: str, registry: Registry) -> Bundle:
    """A registered LoRA/ControlNet by name, else a local .safetensors file, else NAME.safetensors in the model
    folders (the bundle keeps the user's NAME: the record and `--from` name it so)."""
    label = KINDS[kind]
    if name in registry.bundles:
        bundle = registry.bundles[name]
        if bundle.family != kind:
            raise ImagegenError("unknown_addon", f"{name!r} is a {bundle.family} model, not a {label}",
                                hint=f"Pass a {label} registered with `family: {kind}`, or its .safetensors file.")
        return bundle
    path = Path(name).expanduser()
    if path.is_file():
        modelfile.read_header(path)  # refuses a non-safetensors or malformed file
        return local_addon(path, kind)
    head, separator, tail = name.rpartition(":")
    if kind == "lora" and separator and (head in registry.bundles or Path(head).suffix == ".safetensors"):
        raise ImagegenError("invalid_argument", f"LoRA {head}: the strength {tail!r} is not a number",
                            hint=f"Give the strength as a number, e.g. --lora {head}:0.8.")
    search = cache.find_by_name(name, ROLE_FOLDERS[kind])
    if len(search.matches) == 1:
        found = search.matches[0]
        modelfile.read_header(found)
        return local_addon(found, kind, name=name)
    if search.matches:
        relative = sorted({_relative_name(match, search.folders) for match in search.matches})
        flag = "--lora" if kind == "lora" else "--control"
        example = f"{flag} {search.matches[0]}{'' if kind == 'lora' else ':IMAGE'}"
        raise ImagegenError("ambiguous_addon", f"{label} {name!r} names {len(search.matches)} different files: "
                            + ", ".join(map(str, search.matches)),
                            hint=f"Pick one: pass its path ({example})"
                                 + (f", or its name with its subfolder ({', '.join(relative)})"
                                    if len(relative) == len(search.matches) else "") + ".",
                            matches=[str(match) for match in search.matches])
    if path.is_absolute() or name.startswith(("~", "./", "../")) or path.exists():
        raise ImagegenError("unknown_addon", f"{label} {name}: {'not a file' if path.exists() else 'no such file'}",
                            hint="Check the path.")
    raise _unknown(name, kind, registry, search)


def _unknown(name: str, kind: str, registry: Registry, search: cache.FolderSearch) -> ImagegenError:
    """unknown_addon: where the name was looked for, and the names close to it (registered ones and the files
    found in those folders)."""
    label = KINDS[kind]
    known = sorted(n for n, b in registry.bundles.items() if b.family == kind)
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    candidates = {*known, *search.names, *(found.rsplit("/", 1)[-1] for found in search.names)}
    close = difflib.get_close_matches(stem, sorted(candidates), n=SUGGESTIONS, cutoff=0.5)
    folders = ", ".join(str(folder) + ("" if folder.is_dir() else " (missing)") for folder in search.folders)
    return ImagegenError(
        "unknown_addon", f"{label} {name!r} is neither registered, a .safetensors file, nor a file in your {label} "
        f"folders ({folders})" + (f"; did you mean {', '.join(close)}?" if close else ""),
        hint=f"Put {Path(stem).name}.safetensors in one of those folders (IMAGEGEN_SHARED_MODELS adds ComfyUI or A1111 "
             f"model trees), register it in models.yaml with `family: {kind}` and `base:` (docs/controls.md), or pass "
             f"the file's path. Registered {label}s: {', '.join(known) or 'none'}.",
        searched=[str(folder) for folder in search.folders], suggestions=close)


def _relative_name(path: Path, folders: list[Path]) -> str:
    for folder in folders:
        if path.is_relative_to(folder):
            return path.relative_to(folder).as_posix()[: -len(".safetensors")]
    return str(path)


def family_of(bundle: Bundle, kind: str) -> str | None:
    """The base family: read from the file's header where the file is here, else the registry's `base`."""
    path = cache.present_path(bundle.files[kind])
    if path is not None:
        header = modelfile.read_header(path)
        detected = addon_files.detect_lora(header) if kind == "lora" else addon_files.detect_controlnet(header)
        if detected.family:
            return detected.family
    return bundle.base


def check_family(addon: Bundle, kind: str, model: Bundle, notes: list[str]) -> None:
    family = family_of(addon, kind)
    label = KINDS[kind]
    if family is None:
        notes.append(f"cannot tell from its header which model family {label} {addon.name} is for; "
                     "keys the worker cannot apply will be reported")
        return
    if family != model.family:
        code = "lora_mismatch" if kind == "lora" else "controlnet_mismatch"
        raise ImagegenError(code, f"{label} {addon.name} is for {addon_files.family_name(family)} models, but "
                            f"{model.name} is {addon_files.family_name(model.family)}",
                            hint=f"Use a {label} made for {addon_files.family_name(model.family)} models, or pass -m "
                                 f"with a model of the {addon_files.family_name(family)} family.",
                            addon=addon.name, addon_family=family, model=model.name, model_family=model.family)


def recorded_name(entry: dict, kind: str, image: Path, registry: Registry) -> str:
    """A recorded LoRA/ControlNet, as a --lora/--control value: its registry name, else the name found in the
    model folders again, else the local file the cache's link led to."""
    name = str(entry.get("name") if kind == "lora" else entry.get("model"))
    bundle = registry.bundles.get(name)
    if bundle is not None and bundle.family == kind:
        return name
    if not name.endswith(".safetensors"):  # a name, not the file name a path was recorded under
        search = cache.find_by_name(name, ROLE_FOLDERS[kind])
        if len(search.matches) == 1:
            return name
    link = paths.models_dir() / ROLE_FOLDERS[kind] / str(entry.get("file") or "")
    if entry.get("file") and link.is_symlink() and link.resolve().is_file():
        return str(link.resolve())
    raise ImagegenError("unknown_addon", f"{image} was made with {KINDS[kind]} {name} (sha256 "
                        f"{entry.get('sha256') or 'unknown'}), which is neither registered, in your {KINDS[kind]} "
                        "folders, nor linked here",
                        hint=f"Register it (models.yaml, `family: {kind}`), put it in your {KINDS[kind]} folder, or "
                             f"pass the file with {'--lora FILE' if kind == 'lora' else '--control FILE:IMAGE'}.")
