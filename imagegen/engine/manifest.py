"""manifest.jsonl, the record of a batch that makes reruns resume, and the lock that keeps one
batch (or funnel) at a time in a folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from imagegen.util import files
from imagegen.util.errors import ImagegenError

if TYPE_CHECKING:
    from filelock import BaseFileLock

MANIFEST = "manifest.jsonl"


class Manifest:
    """manifest.jsonl: one line per image, each outcome's lines one O_APPEND write, then fsynced.

    Reading skips, with one warning, whatever is not a whole record: a line cut short by a crash,
    garbage, a JSON value that is not an object, or one without key, status and path. A rerun keeps
    one line per finished image (`compact`): lines of jobs that are done again, duplicates and
    unreadable lines go. An image whose file exists but whose line is missing (killed between the
    PNG and its line) is rendered again with the same seed, so its line is written with its result."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST
        self.unreadable: list[int] = []   # line numbers the last read() skipped

    def read(self) -> list[dict]:
        self.unreadable = []
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        records = []
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                record = None
            if isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("key", "status", "path")):
                records.append(record)
            else:
                self.unreadable.append(number)
        return records

    def warning(self) -> str | None:
        if not self.unreadable:
            return None
        return (f"warning: {self.path}: skipped {len(self.unreadable)} unreadable line(s) "
                f"(first: line {self.unreadable[0]}); their images are rendered again")

    @staticmethod
    def finished(records: list[dict], jobs: list) -> set[str]:
        """Jobs done in an earlier run: a done line for each of their images, and each image on disk."""
        done = {(r["key"], Path(r["path"]).name) for r in records if r["status"] == "done"}
        return {job.key for job in jobs if all((job.key, t.name) in done and t.is_file() for t in job.targets)}

    def compact(self, records: list[dict], jobs: list, finished: set[str]) -> None:
        """Rewrite the manifest (atomically) when it holds lines that a rerun would otherwise duplicate."""
        redo = {job.key for job in jobs} - finished
        kept, seen = [], set()
        for record in records:
            if record["key"] in redo or (record["key"] in finished and record["status"] != "done"):
                continue
            ident = (record["key"], record["status"], Path(record["path"]).name)
            if record["status"] == "done" and ident in seen:
                continue
            seen.add(ident)
            kept.append(record)
        if len(kept) == len(records) and not self.unreadable:
            return
        text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in kept)
        try:
            files.write_atomic(self.path, text)
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def append(self, records: list[dict]) -> None:
        data = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records).encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        size = 0
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # after a line cut short by a crash: never glue a record onto it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)  # no half line left behind
            except OSError:
                pass
            raise write_error(self.path, exc) from None
        finally:
            os.close(fd)


def write_error(path: Path, exc: OSError) -> ImagegenError:
    """What a user reads when a file imagegen keeps (a manifest, a state file) cannot be written."""
    if exc.errno in files.DISK_FULL:
        return ImagegenError("disk_full", f"no space left on the disk to write {path}",
                             hint="Free space there, then run the same command again: finished images are kept.")
    return ImagegenError("output_not_writable", f"cannot write {path}: {exc.strerror or exc}")


def lock_folder(folder: Path, name: str, busy_hint: str) -> BaseFileLock:
    """An exclusive lock on `folder` (a lock file in it) held until released; output_busy at once when
    another command holds it."""
    from filelock import FileLock, Timeout

    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / name))
        lock.acquire(timeout=0)
    except Timeout:
        raise ImagegenError("output_busy", f"another imagegen command is writing in {folder}", hint=busy_hint) from None
    except OSError as exc:
        raise ImagegenError("output_not_writable", f"cannot write in {folder}: {exc.strerror or exc}") from None
    return lock
