"""The model registry: bundles of files (models.yaml), merged from the built-in file and the user's.

A bundle is what one job loads: for SD1.5/SDXL a checkpoint (optionally a separate VAE);
for Flux a diffusion model, a T5-XXL and a CLIP-L text encoder and the ae VAE, each a file of
its own. A weight-only Flux fine-tune names only its diffusion model and reuses the shared
encoders.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from imagegen.util import paths
from imagegen.util.errors import ImagegenError
from imagegen.util.files import write_atomic

FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "upscale_models", "loras", "clip_vision",
           "controlnet")
FAMILIES = {
    # family: (required roles, optional roles)
    "sd15": (("checkpoint",), ("vae",)),
    "sdxl": (("checkpoint",), ("vae",)),
    "flux": (("diffusion_model", "t5", "clip_l", "vae"), ()),
    "upscale": (("upscale_model",), ()),
    "lora": (("lora",), ()),              # an add-on, not a drawing model: `base` names its family
    "controlnet": (("controlnet",), ()),
}
ADDON_FAMILIES = ("lora", "controlnet")
ADDON_BASES = ("sd15", "sdxl", "flux")
ROLE_FOLDERS = {"checkpoint": "checkpoints", "diffusion_model": "diffusion_models", "t5": "text_encoders",
                "clip_l": "text_encoders", "vae": "vae", "upscale_model": "upscale_models",
                "lora": "loras", "controlnet": "controlnet"}
FLUX_SHARED_ENCODERS = {"t5": "t5xxl-fp8", "clip_l": "clip-l", "vae": "flux-ae"}
DEFAULT_KEYS = {"width": int, "height": int, "steps": int, "cfg": float, "guidance": float,
                "sampler": str, "scheduler": str, "negative": str, "denoise": float, "weight_dtype": str}
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
FAMILY_DEFAULTS = {
    "sd15": {"width": 512, "height": 512, "steps": 20, "cfg": 7.0, "sampler": "euler_ancestral", "scheduler": "normal"},
    "sdxl": {"width": 1024, "height": 1024, "steps": 25, "cfg": 7.0, "sampler": "euler", "scheduler": "normal"},
    "flux": {"width": 1024, "height": 1024, "steps": 20, "cfg": 1.0, "guidance": 3.5, "sampler": "euler",
             "scheduler": "simple"},
    "upscale": {},
    "lora": {},
    "controlnet": {},
}
LOCAL_SUBFOLDER = "imagegen-local"  # where local files are linked into the cache


@dataclass(frozen=True)
class ModelFile:
    key: str                      # registry key (shared name or "<model>.<role>")
    folder: str                   # ComfyUI folder
    filename: str                 # name ComfyUI sees inside the folder (may hold a subfolder)
    repo: str | None = None
    path_in_repo: str | None = None
    revision: str | None = None
    size: int | None = None
    sha256: str | None = None
    local_path: str | None = None  # a user's own file, used in place (never downloaded)
    gated: bool = False

    @property
    def downloadable(self) -> bool:
        return self.repo is not None and self.local_path is None

    def cache_path(self, models_dir: Path | None = None) -> Path:
        return (models_dir or paths.models_dir()) / self.folder / self.filename


@dataclass(frozen=True)
class Bundle:
    name: str
    family: str
    files: dict[str, ModelFile]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    gated: bool = False
    source: str = "builtin"
    base: str | None = None       # a LoRA's or ControlNet's base family (sd15, sdxl, flux)

    def default(self, key: str, fallback: Any = None) -> Any:
        return self.defaults.get(key, FAMILY_DEFAULTS.get(self.family, {}).get(key, fallback))

    @property
    def total_size(self) -> int:
        return sum(f.size or 0 for f in self.files.values())


class _LineLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Keeps the line of every mapping so errors can name it (libyaml's parser when PyYAML has it:
    about ten times faster than the pure-Python one, and every `imagegen` call reads models.yaml)."""


class _LineDict(dict):
    line: int = 0
    key_lines: dict = {}


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    mapping = _LineDict(loader.construct_mapping(node, deep=True))
    mapping.line = node.start_mark.line + 1
    mapping.key_lines = {key.value: key.start_mark.line + 1 for key, _value in node.value
                         if isinstance(key, yaml.ScalarNode)}
    return mapping


def _line(mapping, key: str | None = None) -> int:
    """The line of `key` in a parsed mapping (or of the mapping itself)."""
    lines = getattr(mapping, "key_lines", {})
    return int(lines.get(key) or getattr(mapping, "line", 0) or 0)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _bad(path: Path, line: int, message: str) -> ImagegenError:
    return ImagegenError("invalid_models_yaml", f"{path}:{line}: {message}",
                         hint=f"Fix {path} at line {line}; see docs/models.md for the format.",
                         file=str(path), line=line)


def load_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _bad(path, 0, f"cannot read: {exc.strerror}") from exc
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        raise _bad(path, line, f"not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return _LineDict()
    if not isinstance(data, dict):
        raise _bad(path, 1, "the top level must be a mapping with `files:` and/or `models:`")
    unknown = set(data) - {"schema", "files", "models"}
    if unknown:
        raise _bad(path, getattr(data, "line", 1),
                   f"unknown top-level key(s): {', '.join(sorted(unknown))} (expected schema, files, models)")
    return data


def _parse_file(path: Path, key: str, raw: Any, folder_hint: str | None) -> ModelFile:
    line = getattr(raw, "line", 0)
    if not isinstance(raw, dict):
        raise _bad(path, line, f"{key}: a file must be a mapping with repo/file or local")
    allowed = {"repo", "file", "revision", "folder", "size", "sha256", "local", "gated", "name"}
    unknown = set(raw) - allowed
    if unknown:
        raise _bad(path, line,
                   f"{key}: unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")
    folder = raw.get("folder") or folder_hint
    if folder not in FOLDERS:
        raise _bad(path, line, f"{key}: folder {folder!r} is not one of {', '.join(FOLDERS)}")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise _bad(path, line, f"{key}: size must be a positive number of bytes, got {size!r}")
    sha = raw.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                            or any(c not in "0123456789abcdef" for c in sha.lower())):
        raise _bad(path, line, f"{key}: sha256 must be 64 hex digits or null, got {sha!r}")
    local = raw.get("local")
    if local is not None:
        local_path = Path(os.path.expanduser(str(local)))
        if not local_path.is_absolute():
            local_path = (path.parent / local_path).resolve()
        if local_path.suffix != ".safetensors":
            raise _bad(path, line, f"{key}: only .safetensors files are accepted, got {local_path.name}")
        filename = raw.get("name") or f"{LOCAL_SUBFOLDER}/{local_path.name}"
        return ModelFile(key=key, folder=folder, filename=filename, size=size, sha256=sha.lower() if sha else None,
                         local_path=str(local_path))
    repo, file = raw.get("repo"), raw.get("file")
    if not (isinstance(repo, str) and "/" in repo and isinstance(file, str) and file):
        raise _bad(path, line,
                   f"{key}: needs `repo: owner/name` and `file: path/in/repo`, or `local: /path/file.safetensors`")
    if not file.endswith(".safetensors"):
        raise _bad(path, line, f"{key}: only .safetensors files are accepted, got {file}")
    return ModelFile(key=key, folder=folder, filename=raw.get("name") or Path(file).name, repo=repo,
                     path_in_repo=file, revision=str(raw.get("revision") or "main"), size=size,
                     sha256=sha.lower() if sha else None, gated=bool(raw.get("gated", False)))


def _parse_bundle(path: Path, name: str, raw: Any, shared: dict[str, ModelFile]) -> Bundle:
    line = getattr(raw, "line", 0)
    if not isinstance(raw, dict):
        raise _bad(path, line, f"models.{name}: must be a mapping")
    unknown = set(raw) - {"family", "description", "files", "defaults", "gated", "base"}
    if unknown:
        raise _bad(path, line, f"models.{name}: unknown field(s) {', '.join(sorted(unknown))}")
    family = raw.get("family")
    if family not in FAMILIES:
        raise _bad(path, _line(raw, "family"), f"models.{name}: family {family!r} is not one of {', '.join(FAMILIES)}")
    required, optional = FAMILIES[family]
    raw_files = raw.get("files") or {}
    if not isinstance(raw_files, dict):
        raise _bad(path, line, f"models.{name}.files: must map roles ({', '.join(required)}) to files")
    gated = bool(raw.get("gated", False))
    files: dict[str, ModelFile] = {}
    for role, value in raw_files.items():
        if role not in required + optional:
            raise _bad(path, _line(raw_files, role), f"models.{name}.files: role {role!r} is not used by family "
                                                     f"{family} (roles: {', '.join(required + optional)})")
        if isinstance(value, str):
            if value not in shared:
                known = ", ".join(sorted(shared)) or "none"
                raise _bad(path, _line(raw_files, role), f"models.{name}.files.{role}: no shared file {value!r} "
                                                         f"under `files:` (known: {known})")
            files[role] = shared[value]
        else:
            parsed = _parse_file(path, f"models.{name}.files.{role}", value, ROLE_FOLDERS[role])
            files[role] = replace(parsed, key=f"{name}.{role}",
                                  gated=parsed.gated or (gated and role in ("checkpoint", "diffusion_model")))
    if family == "flux":
        for role, shared_key in FLUX_SHARED_ENCODERS.items():
            if role not in files and shared_key in shared:
                files[role] = shared[shared_key]
    missing = [role for role in required if role not in files]
    if missing:
        raise _bad(path, line, f"models.{name}: family {family} needs file(s) for {', '.join(missing)}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise _bad(path, line, f"models.{name}.defaults: must be a mapping")
    for key, value in defaults.items():
        expected = DEFAULT_KEYS.get(key)
        if expected is None:
            raise _bad(path, _line(defaults, key),
                       f"models.{name}.defaults: unknown key {key!r} (known: {', '.join(DEFAULT_KEYS)})")
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or isinstance(value, bool):
            raise _bad(path, _line(defaults, key),
                       f"models.{name}.defaults.{key}: expected {expected.__name__}, got {value!r}")
        if key == "weight_dtype" and value not in WEIGHT_DTYPES:
            raise _bad(path, _line(defaults, key),
                       f"models.{name}.defaults.weight_dtype: {value!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    typed = {k: (float(v) if DEFAULT_KEYS[k] is float else v) for k, v in defaults.items()}
    base = raw.get("base")
    if family in ADDON_FAMILIES and base not in ADDON_BASES:
        raise _bad(path, _line(raw, "base") or line,
                   f"models.{name}: a {family} needs `base:` naming its model family ({', '.join(ADDON_BASES)}), "
                   f"got {base!r}")
    if family not in ADDON_FAMILIES and base is not None:
        raise _bad(path, _line(raw, "base"), f"models.{name}: `base:` is for lora and controlnet entries only")
    return Bundle(name=name, family=family, files=files, defaults=typed,
                  description=str(raw.get("description") or ""), gated=gated or any(f.gated for f in files.values()),
                  source=str(path), base=base)


class Registry:
    def __init__(self, bundles: dict[str, Bundle], shared: dict[str, ModelFile], sources: list[Path]):
        self.bundles = bundles
        self.shared = shared
        self.sources = sources

    @classmethod
    def load(cls, builtin: Path | None = None, user: Path | None = None) -> Registry:
        documents = [builtin or paths.builtin_models_yaml()]
        user = user or paths.user_models_yaml()
        if user.is_file():
            documents.append(user)
        shared: dict[str, ModelFile] = {}
        raw_models: list[tuple[Path, str, Any]] = []
        for doc_path in documents:
            data = load_yaml(doc_path)
            raw_shared = data.get("files") or {}
            if not isinstance(raw_shared, dict):
                raise _bad(doc_path, getattr(data, "line", 1), "`files:` must be a mapping of name to file")
            for key, raw in raw_shared.items():
                shared[key] = _parse_file(doc_path, f"files.{key}", raw, None)
            raw_bundles = data.get("models") or {}
            if not isinstance(raw_bundles, dict):
                raise _bad(doc_path, getattr(data, "line", 1), "`models:` must be a mapping of name to bundle")
            raw_models += [(doc_path, name, raw) for name, raw in raw_bundles.items()]
        bundles: dict[str, Bundle] = {}
        for doc_path, name, raw in raw_models:  # later documents override earlier ones
            bundles[str(name)] = _parse_bundle(doc_path, str(name), raw, shared)
        return cls(bundles, shared, documents)

    def get(self, name: str) -> Bundle:
        if name in self.bundles:
            return self.bundles[name]
        close = difflib.get_close_matches(name, list(self.bundles), n=3, cutoff=0.5)
        suggestion = f" Did you mean {', '.join(close)}?" if close else ""
        raise ImagegenError("unknown_model", f"unknown model {name!r}.{suggestion}",
                            hint=f"Known models: {', '.join(sorted(self.bundles))}. Run `imagegen models list`.")


def local_bundle(path: Path, family: str, name: str | None = None) -> Bundle:
    """A bundle for a single local checkpoint (`--checkpoint PATH`)."""
    path = path.expanduser().resolve()
    if family not in ("sd15", "sdxl"):
        raise ImagegenError("invalid_model_file", f"{path.name}: a {family} model is not an all-in-one checkpoint",
                            hint="Register Flux files with a bundle in models.yaml (docs/models.md).")
    checkpoint = ModelFile(key=f"{name or path.stem}.checkpoint", folder="checkpoints",
                           filename=f"{LOCAL_SUBFOLDER}/{path.name}", local_path=str(path), size=path.stat().st_size)
    return Bundle(name=name or path.stem, family=family, files={"checkpoint": checkpoint}, source=str(path))


MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.IGNORECASE)


def check_model_name(name: str) -> str:
    """A name is a short word (letters, digits, . _ -) so it is safe in YAML, file names and messages."""
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise ImagegenError("invalid_argument", f"{name!r} is not a usable model name: use 1-64 letters, digits, "
                            "'.', '_' or '-', starting with a letter or digit",
                            hint="For example: imagegen models add my-model --file model.safetensors")
    return name


def _builtin_names() -> set[str]:
    return {str(name) for name in (load_yaml(paths.builtin_models_yaml()).get("models") or {})}


def _user_lock(target: Path):
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target.with_name(f".{target.name}.lock")), timeout=60)


def _write_user_yaml(target: Path, data: dict, models: dict) -> None:
    shared = {"files": _plain(data["files"])} if data.get("files") else {}
    document = {"schema": 1, **shared, "models": _plain(models)}
    write_atomic(target, yaml.safe_dump(document, sort_keys=False))


def add_user_model(name: str, file: Path, family: str, user_yaml: Path | None = None, force: bool = False,
                   base: str | None = None) -> Path:
    """Register a local file as a model in the user's models.yaml; returns that file's path.

    Refuses to replace one of the user's entries or to shadow a built-in unless `force`. The
    read-modify-write holds a lock, so concurrent `models add` calls all land."""
    check_model_name(name)
    target = user_yaml or paths.user_models_yaml()
    if not force and name in _builtin_names():
        raise ImagegenError("model_exists", f"{name!r} is a built-in model; registering yours would hide it",
                            hint=f"Choose another name, or pass --force to shadow the built-in {name}.")
    with _user_lock(target):
        data = load_yaml(target) if target.is_file() else {}
        models = dict(data.get("models") or {})
        if name in models and not force:
            raise ImagegenError("model_exists", f"{name!r} is already in {target}",
                                hint=f"Pass --force to replace it, or `imagegen models rm {name}` first.")
        role = {"flux": "diffusion_model", "upscale": "upscale_model", "lora": "lora",
                "controlnet": "controlnet"}.get(family, "checkpoint")
        models[name] = {"family": family, **({"base": base} if base else {}),
                        "files": {role: {"local": str(file.expanduser().resolve()), "folder": ROLE_FOLDERS[role]}}}
        _write_user_yaml(target, data, models)
    return target


def remove_user_model(name: str, user_yaml: Path | None = None) -> bool:
    target = user_yaml or paths.user_models_yaml()
    if not target.is_file():
        return False
    with _user_lock(target):
        data = load_yaml(target)
        models = dict(data.get("models") or {})
        if name not in models:
            return False
        del models[name]
        _write_user_yaml(target, data, models)
    return True


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
