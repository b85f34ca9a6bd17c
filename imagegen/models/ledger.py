"""The download ledger: sha256 of verified files in the model cache, so nothing is hashed twice."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from imagegen.util import cancel
from imagegen.util.files import write_atomic

LEDGER = ".imagegen-verified.json"
LOCKS = ".locks"
HASH_BLOCK = 8 * 1024 * 1024


class Ledger:
    """sha256 of verified files, keyed by path, valid while size and mtime are unchanged."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        self.path = models_dir / LEDGER

    def _key(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.models_dir))
        except ValueError:
            return str(path)

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def lookup(self, path: Path) -> str | None:
        entry = self._read().get(self._key(path))
        try:
            stat = path.stat()
        except OSError:
            return None
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry.get("sha256")
        return None

    def record(self, path: Path, sha256: str, source: str) -> None:
        from filelock import FileLock

        stat = path.stat()
        with FileLock(str(lock_dir(self.models_dir) / "ledger.lock")):
            entries = self._read()
            entries[self._key(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256,
                                        "source": source, "verified_at": int(time.time())}
            write_atomic(self.path, json.dumps(entries, indent=1, sort_keys=True))


def lock_dir(models_dir: Path) -> Path:
    path = models_dir / LOCKS
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(HASH_BLOCK):
            cancel.check("the checksum of a model file")
            digest.update(block)
    return digest.hexdigest()
