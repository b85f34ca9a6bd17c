"""The model cache on disk: which files of a bundle are present, and local files linked in.

The cache uses ComfyUI's folder layout (checkpoints/, diffusion_models/, text_encoders/, vae/,
upscale_models/), so a worker points ComfyUI straight at it. A user's own file is used in place
through a symlink under <folder>/imagegen-local/ and is never copied. Existing ComfyUI or A1111
model trees named in IMAGEGEN_SHARED_MODELS (os.pathsep-separated, each a `models/` folder) are
searched read-only after the cache, so a file there is never downloaded again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from imagegen.models import modelfile
from imagegen.models.ledger import Ledger, sha256_file
from imagegen.models.registry import Bundle, ModelFile
from imagegen.util import paths
from imagegen.util.errors import ImagegenError
from imagegen.util.model_trees import tree_layout

Fetcher = Callable[[Bundle], None]

SHARED_MODELS_ENV = "IMAGEGEN_SHARED_MODELS"
# Our folder -> the subfolders a tree may keep it in (the same mapping the worker gives ComfyUI).
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
