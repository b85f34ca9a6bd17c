"""File writes that never leave a half-written file under the final name, and path probes.

`write_atomic` is the one way imagegen replaces or creates a file it owns: a unique temporary
name in the same folder, fsync, then a rename (or a hard link when the name must not be clobbered),
a best-effort fsync of the folder, and the temporary file removed on every failure.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

# os.link is refused by file systems without hard links (exFAT, FAT, SMB, some FUSE): fall back to rename.
LINK_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EMLINK}
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_umask: int | None = None


def _default_mode() -> int:
    """0o666 less the process umask (mkstemp makes 0600 files; ordinary outputs keep the usual mode)."""
    global _umask
    if _umask is None:
        try:
            with open("/proc/self/status", encoding="ascii") as handle:
                line = next(x for x in handle if x.startswith("Umask:"))
            _umask = int(line.split()[1], 8)
        except (OSError, StopIteration, ValueError, IndexError):
            _umask = os.umask(0o022)
            os.umask(_umask)
    return 0o666 & ~_umask


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable, best effort (some file systems refuse to open or sync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path | str, data: bytes | str, *, overwrite: bool = True, mode: int | None = None) -> Path:
    """Write `data` to `path` all or nothing. The folder must exist.

    overwrite=False never clobbers: FileExistsError when `path` exists (or appears meanwhile).
    `mode` sets the file's permissions (e.g. 0o600); the default is 0o666 less the umask.
    Raises OSError (ENOSPC, EACCES, ...) with no temporary file left behind.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _default_mode() if mode is None else mode)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _link_no_clobber(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic: fails if the name exists
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in LINK_UNSUPPORTED:
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from exc
        os.rename(tmp, path)  # check-then-rename: the best a file system without links allows


def nearest_existing_parent(path: Path) -> Path:
    """`path` itself when it exists, else its closest ancestor that does (at worst the root or cwd)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe_writable(folder: Path) -> OSError | None:
    """Prove that a file can be created in `folder` (its nearest existing parent when it does not
    exist yet) by creating and removing a temporary file there; the OSError when it cannot."""
    probe_dir = nearest_existing_parent(folder)
    try:
        fd, name = tempfile.mkstemp(dir=probe_dir, prefix=".imagegen-probe.", suffix=".tmp")
    except OSError as exc:
        return exc
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass
    return None


def write_private(path: Path | str, text: str) -> Path:
    """Write a secret (a token, a worker record) all or nothing, readable by this user only (0600):
    the temporary file is created 0600 (never a moment with wider permissions), fsynced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return write_atomic(path, text, mode=0o600)
