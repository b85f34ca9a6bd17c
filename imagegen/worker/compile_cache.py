"""The compile cache (fast mode): torch.compile's kernels kept in the model cache, private to this user."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

COMPILE_CACHE = ".compile-cache"


def private_dir_problem(root: Path) -> str | None:
    """Why `root` cannot hold code this worker will load (None: it is a real folder, ours, 0700)."""
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(root)
    except OSError as exc:
        return f"cannot create it: {exc.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a folder (a symlink?)"
    if info.st_uid != os.getuid():
        return f"it is owned by uid {info.st_uid}, not {os.getuid()}"
    if info.st_mode & 0o022:
        return f"it is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    if stat.S_IMODE(info.st_mode) != 0o700:
        try:
            os.chmod(root, 0o700)
        except OSError as exc:
            return f"cannot make it private: {exc.strerror}"
    return None


def compile_cache_env(models_dir: Path, fallback: Path | None = None) -> dict[str, str]:
    """Keep torch.compile's artifacts (fast mode) in the model cache: a container's /tmp dies with
    it, the cache volume does not, so the next worker loads compiled kernels instead of compiling.

    Those artifacts are code this worker loads: the folder must be ours and 0700. One that is
    group/world-writable or someone else's is not used: `fallback` (a private folder) is, and the
    log says why."""
    root = models_dir / COMPILE_CACHE
    problem = private_dir_problem(root) if os.access(models_dir, os.W_OK) else None
    if problem or not os.access(models_dir, os.W_OK):  # refused, or a read-only (or absent) model cache
        if fallback is None or private_dir_problem(fallback):
            return {}
        if problem:
            print(json.dumps({"event": "compile_cache_refused", "path": str(root), "why": problem,
                              "using": str(fallback)}), flush=True)
        root = fallback
    return {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton")}
