"""The model cache on disk: which files of a bundle are present, and local files linked in.

The cache uses ComfyUI's folder layout (checkpoints/, diffusion_models/, text_encoders/, vae/,
upscale_models/), so a worker points ComfyUI straight at it. A user's own file is used in place
through a symlink under <folder>/imagegen-local/ and is never copied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from . import modelfile, paths
from .errors import ImagegenError
from .registry import Bundle, ModelFile

Fetcher = Callable[[Bundle], None]


def present_path(file: ModelFile, models_dir: Path | None = None) -> Path | None:
    """The on-disk file ComfyUI will load, when it is there."""
    if file.local_path:
        return Path(file.local_path) if Path(file.local_path).is_file() else None
    path = file.cache_path(models_dir)
    return path if path.is_file() else None


def missing_files(bundle: Bundle, models_dir: Path | None = None) -> list[ModelFile]:
    return [f for f in bundle.files.values() if present_path(f, models_dir) is None]


def link_local(file: ModelFile, models_dir: Path | None = None) -> Path:
    """Make a local file visible to ComfyUI under its cache name (a symlink, never a copy)."""
    source = Path(file.local_path)
    if not source.is_file():
        raise ImagegenError("invalid_model_file", f"{source}: no such file", hint="Check the path given for the model.")
    modelfile.read_header(source)  # refuse a non-safetensors, truncated or malformed file up front
    link = file.cache_path(models_dir)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and os.readlink(link) == str(source):
        return link
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(source, tmp)
    os.replace(tmp, link)
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
                                hint=f"Run `imagegen models pull {bundle.name}` (needs network), or use --checkpoint with a local file.")
        fetch(bundle)
    resolved = {role: present_path(f, models_dir) for role, f in bundle.files.items()}
    modelfile.check_bundle_files(bundle, lambda f: present_path(f, models_dir))
    return resolved
