"""Where imagegen keeps its files. IMAGEGEN_HOME puts everything under one folder."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from imagegen import COMFYUI_COMMIT

PACKAGE_DIR = Path(__file__).resolve().parent.parent
SOURCE_ROOT = PACKAGE_DIR.parent  # the checkout, for editable installs and the image's /app


def _xdg(variable: str, fallback: str) -> Path:
    return Path(os.environ.get(variable) or Path.home() / fallback)


def _home() -> Path | None:
    value = os.environ.get("IMAGEGEN_HOME")
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    home = _home()
    return home if home else _xdg("XDG_CONFIG_HOME", ".config") / "imagegen"


def user_models_yaml() -> Path:
    return config_dir() / "models.yaml"


def builtin_models_yaml() -> Path:
    for candidate in (PACKAGE_DIR / "models.yaml", SOURCE_ROOT / "models.yaml"):
        if candidate.is_file():
            return candidate
    return SOURCE_ROOT / "models.yaml"


def models_dir() -> Path:
    value = os.environ.get("IMAGEGEN_MODELS_DIR")
    if value:
        return Path(value).expanduser()
    home = _home()
    return home / "models" if home else _xdg("XDG_CACHE_HOME", ".cache") / "imagegen" / "models"


def state_dir() -> Path:
    home = _home()
    return home / "state" if home else _xdg("XDG_STATE_HOME", ".local/state") / "imagegen"


def workers_dir() -> Path:
    return state_dir() / "workers"


def default_output_dir() -> Path:
    return Path(os.environ.get("IMAGEGEN_OUTPUT_DIR") or "imagegen-output")


def comfyui_dir_candidates() -> list[Path]:
    value = os.environ.get("IMAGEGEN_COMFYUI_DIR")
    if value:
        return [Path(value).expanduser()]
    name = f"comfyui-{COMFYUI_COMMIT}"
    dev_cache = os.environ.get("IMAGEGEN_DEV_CACHE")
    candidates = [Path(dev_cache) / name] if dev_cache else []
    candidates += [SOURCE_ROOT / ".cache" / name, Path.home() / ".cache" / "imagegen-dev" / name,
                   _xdg("XDG_DATA_HOME", ".local/share") / "imagegen" / name]
    return candidates


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def read_state(name: str) -> dict:
    """A small JSON store in the state dir (learned timings, worker speeds); empty when absent or unreadable."""
    try:
        return json.loads((state_dir() / name).read_text())
    except (OSError, ValueError):
        return {}


def write_state(name: str, data: dict) -> None:
    """Replace a state store atomically, best effort: learning must never fail a job. The temporary
    name is per process and thread, since scheduler threads write concurrently."""
    path = state_dir() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass
