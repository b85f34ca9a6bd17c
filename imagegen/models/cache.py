"""The model cache on disk: which files of a bundle are present, and local files linked in.

The cache uses ComfyUI's folder layout (checkpoints/, diffusion_models/, text_encoders/, vae/,
upscale_models/), so a worker points ComfyUI straight at it. A user's own file is used in place
through a symlink under <folder>/imagegen-local/ and is never copied. Existing ComfyUI or A1111
model trees named in IMAGEGEN_SHARED_MODELS (os.pathsep-separated, each a `models/` folder) are
searched read-only after the cache, so a file there is never downloaded again. A LoRA or ControlNet named
by its file's name alone (as A1111 and ComfyUI users name them) is looked for in the same folders.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imagegen.models import modelfile
from imagegen.models.ledger import Ledger, sha256_file
from imagegen.models.registry import LOCAL_SUBFOLDER, Bundle, ModelFile
from imagegen.util import paths
from imagegen.util.errors import ImagegenError
from imagegen.util.model_trees import tree_layout

Fetcher = Callable[[Bundle], None]

SHARED_MODELS_ENV = "IMAGEGEN_SHARED_MODELS"
MAX_FOLDER_DEPTH = 8  # subfolders followed under a LoRA/ControlNet folder (a symlink loop ends there)


def shared_trees() -> list[Path]:
    value = os.environ.get(SHARED_MODELS_ENV, "")
    return [Path(item).expanduser() for item in value.split(os.pathsep) if item.strip()]


def shared_path(file: ModelFile) -> Path | None:
    """The file in a shared tree, under the same name ComfyUI will ask for (and the registry's size, when known)."""
    for root in shared_trees():
        for subdir in tree_layout(root).get(file.folder, []):
            candidate = root / subdir / file.filename
            if candidate.is_file() and (file.size is None or candidate.stat().st_size == file.size):
                return candidate
    return None


@dataclass
class FolderSearch:
    """What a search of the user's model folders for a file named NAME.safetensors found."""
    matches: list[Path]   # the distinct files the name means: one is an answer, more are ambiguous
    folders: list[Path]   # every folder searched, in order (some may not exist)
    names: list[str]      # the names of the files found there ("styles/watercolor"), for did-you-mean


def model_folders(folder: str, models_dir: Path | None = None) -> list[Path]:
    """Where files of one of our folders ("loras", "controlnet") may be: the cache's, then each shared tree's
    (ComfyUI `loras`/`controlnet`, A1111 `Lora`/`ControlNet`)."""
    found = [(models_dir or paths.models_dir()) / folder]
    for root in shared_trees():
        found += [root / subdir for subdir in tree_layout(root).get(folder, [])]
    return found


def find_by_name(name: str, folder: str, models_dir: Path | None = None) -> FolderSearch:
    """The files a bare name means in the model folders: NAME.safetensors in any of them (`sub/name` for one in
    a subfolder); with none there, a bare name means a file of that name in a subfolder. Our own link folder
    (imagegen-local/) is not searched. The same file seen twice (a symlink to it) counts once."""
    folders = model_folders(folder, models_dir)
    stem = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
    parts = [part for part in stem.replace(os.sep, "/").split("/") if part]
    if not parts or any(part in (".", "..") for part in parts) or parts[0] == LOCAL_SUBFOLDER \
            or Path(stem).is_absolute():
        return FolderSearch([], folders, [])
    exact = [root.joinpath(*parts[:-1], parts[-1] + ".safetensors") for root in folders]
    matches = _distinct([path for path in exact if path.is_file()])
    if matches:
        return FolderSearch(matches, folders, [])
    listed = [(root, relative) for root in folders for relative in _safetensors_under(root)]
    names = sorted({relative for _, relative in listed})
    if len(parts) == 1:
        matches = _distinct([root.joinpath(*f"{relative}.safetensors".split("/"))
                             for root, relative in listed if relative.rsplit("/", 1)[-1] == parts[0]])
    return FolderSearch(matches, folders, names)


def _distinct(found: list[Path]) -> list[Path]:
    seen: dict[str, Path] = {}
    for path in found:
        seen.setdefault(os.path.realpath(path), path)
    return list(seen.values())


def _safetensors_under(root: Path) -> list[str]:
    """The .safetensors files under a folder, as names relative to it without the suffix (subfolders followed,
    symlinked ones too, as ComfyUI does)."""
    names = []
    for current, subdirs, files in os.walk(root, followlinks=True):
        here = Path(current).relative_to(root)
        depth = len(here.parts)
        subdirs[:] = [] if depth >= MAX_FOLDER_DEPTH else sorted(
            d for d in subdirs if not d.startswith(".") and not (depth == 0 and d == LOCAL_SUBFOLDER))
        names += [(here / file).as_posix()[: -len(".safetensors")] for file in sorted(files)
                  if file.lower().endswith(".safetensors") and not file.startswith(".")]
    return names


def present_path(file: ModelFile, models_dir: Path | None = None) -> Path | None:
    """The on-disk file ComfyUI will load, when it is there: a local file, the cache, or a shared tree."""
    if file.local_path:
        return Path(file.local_path) if Path(file.local_path).is_file() else None
    path = file.cache_path(models_dir)
    if path.is_file():
        return path
    return shared_path(file)


def missing_files(bundle: Bundle, models_dir: Path | None = None) -> list[ModelFile]:
    return [f for f in bundle.files.values() if present_path(f, models_dir) is None]


def link_local(file: ModelFile, models_dir: Path | None = None) -> Path:
    """Make a local file visible to ComfyUI under its cache name (a symlink, never a copy)."""
    source = Path(file.local_path or "")
    if not file.local_path or not source.is_file():
        raise ImagegenError("invalid_model_file", f"{source}: no such file", hint="Check the path given for the model.")
    modelfile.read_header(source)  # refuse a non-safetensors, truncated or malformed file up front
    link = file.cache_path(models_dir)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and os.readlink(link) == str(source):
        return link
    tmp = link.with_name(f".{link.name}.{os.getpid()}.{threading.get_ident()}.link")  # unique per thread
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(source, tmp)
        os.replace(tmp, link)
    finally:
        tmp.unlink(missing_ok=True)
    return link


def ensure_bundle(bundle: Bundle, fetch: Fetcher | None = None, models_dir: Path | None = None) -> dict[str, Path]:
    """Make every file of a bundle loadable: link local files, fetch missing ones, check they fit."""
    models_dir = models_dir or paths.models_dir()
    for file in bundle.files.values():
        if file.local_path:
            link_local(file, models_dir)
    missing = missing_files(bundle, models_dir)
    if missing:
        if fetch is None:
            names = ", ".join(f"{f.folder}/{f.filename}" for f in missing)
            raise ImagegenError("model_missing", f"model {bundle.name!r} is missing {names} in {models_dir}",
                                hint=f"Run `imagegen models pull {bundle.name}` (needs network), "
                                     "or use --checkpoint with a local file.")
        fetch(bundle)
    resolved = {role: present_path(f, models_dir) for role, f in bundle.files.items()}
    still = [f"{f.folder}/{f.filename}" for role, f in bundle.files.items() if resolved[role] is None]
    if still:
        raise ImagegenError("model_missing",
                            f"model {bundle.name!r} is still missing {', '.join(still)} in {models_dir}",
                            hint=f"Run `imagegen models pull {bundle.name}` again.")
    modelfile.check_bundle_files(bundle, lambda f: present_path(f, models_dir))
    return {role: path for role, path in resolved.items() if path is not None}


MODEL_SCHEMA = "imagegen.model/1"
DEFAULT_FIELDS = ("width", "height", "steps", "cfg", "sampler", "scheduler")


def model_record(bundle: Bundle, models_dir: Path | None = None) -> dict:
    """A registered model and what of it is on disk: the record `models list --json` prints."""
    missing = missing_files(bundle, models_dir)
    return {"schema": MODEL_SCHEMA, "name": bundle.name, "family": bundle.family, "base": bundle.base,
            "installed": not missing,
            "size_bytes": bundle.total_size, "missing_bytes": sum(f.size or 0 for f in missing),
            "gated": bundle.gated, "description": bundle.description, "source": bundle.source,
            "defaults": {key: bundle.default(key) for key in DEFAULT_FIELDS},
            "files": {role: {"folder": f.folder, "name": f.filename, "repo": f.repo, "revision": f.revision,
                             "size": f.size, "sha256": f.sha256, "local": f.local_path}
                      for role, f in bundle.files.items()}}


def file_hashes(bundle: Bundle, models_dir: Path | None = None) -> dict[str, str | None]:
    """sha256 of each file of a bundle, for provenance: the registry's, else the download ledger's,
    else (a local file seen for the first time) computed once and remembered in the ledger."""
    models_dir = models_dir or paths.models_dir()
    ledger = Ledger(models_dir)
    hashes: dict[str, str | None] = {}
    for role, file in bundle.files.items():
        path = present_path(file, models_dir)
        digest = file.sha256 or (ledger.lookup(path) if path else None)
        if digest is None and path is not None and file.local_path:
            digest = sha256_file(path)
            ledger.record(path, digest, "local")
        hashes[role] = digest
    return hashes
