"""Where imagegen keeps its files. IMAGEGEN_HOME puts everything under one folder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from imagegen import COMFYUI_COMMIT
from imagegen.util.files import write_atomic

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
        data = json.loads((state_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(name: str, data: dict) -> None:
    """Replace a state store atomically, best effort: learning must never fail a job.
    Concurrent writers should use update_state, which also holds the store's lock."""
    path = state_dir() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass


def update_state(name: str, change: Callable[[dict], None], timeout: float = 10.0) -> bool:
    """Read, change in place and write back a state store under its lock, so threads and processes that
    learn at the same time all keep their update. Best effort: False when it could not be done."""
    from filelock import FileLock, Timeout

    path = state_dir() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_name(f".{name}.lock")), timeout=timeout):
            store = read_state(name)
            change(store)
            write_atomic(path, json.dumps(store, indent=1, sort_keys=True))
        return True
    except (OSError, Timeout):
        return False
