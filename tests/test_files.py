"""util/files: the one atomic write (unique temp, fsync, rename or no-clobber link, always cleaned up)."""

import errno
import os
import re
import stat
import threading
from pathlib import Path

import pytest

from imagegen.util import files

REPO = Path(__file__).resolve().parent.parent


def test_write_atomic_writes_bytes_and_text_with_the_usual_mode(tmp_path):
    target = files.write_atomic(tmp_path / "a.json", '{"x": "北京"}')
    assert target.read_text(encoding="utf-8") == '{"x": "北京"}'
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    files.write_atomic(target, b"\x00\x01", mode=0o600)
    assert target.read_bytes() == b"\x00\x01" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["a.json"]


def test_no_clobber_refuses_an_existing_name(tmp_path):
    target = tmp_path / "a.png"
    files.write_atomic(target, b"first", overwrite=False)
    with pytest.raises(FileExistsError):
        files.write_atomic(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first" and os.listdir(tmp_path) == ["a.png"]


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS])
def test_no_clobber_falls_back_to_rename_without_hard_links(tmp_path, monkeypatch, code):
    """exFAT, FAT and SMB refuse os.link: the file must still land, and still never clobber."""
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", refuse)
    target = tmp_path / "a.png"
    files.write_atomic(target, b"first", overwrite=False)
    assert target.read_bytes() == b"first"
    with pytest.raises(FileExistsError):
        files.write_atomic(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first" and os.listdir(tmp_path) == ["a.png"]


def test_any_failure_leaves_no_temporary_file(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError) as caught:
        files.write_atomic(tmp_path / "a.json", "{}")
    assert caught.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []


def test_threads_writing_one_file_never_share_a_temporary_name(tmp_path):
    target = tmp_path / "state.json"
    errors = []

    def write(n: int) -> None:
        try:
            for i in range(50):
                files.write_atomic(target, f"{n}-{i}" * 100)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    assert re.fullmatch(r"(\d+-\d+)\1{99}", target.read_text())  # one whole write, never a mix
    assert os.listdir(tmp_path) == ["state.json"]


def test_nearest_existing_parent_and_probe(tmp_path):
    assert files.nearest_existing_parent(tmp_path / "a" / "b" / "c.png") == tmp_path
    assert files.nearest_existing_parent(tmp_path) == tmp_path
    assert files.probe_writable(tmp_path / "new" / "dir") is None and os.listdir(tmp_path) == []
    assert isinstance(files.probe_writable(Path("/proc")), OSError)  # os.access says yes to root; creating says no


def test_there_is_one_atomic_write_in_the_package():
    """Temp-then-rename code outside util/files.py is a second variant (with its own fsync and cleanup bugs).
    Allowed: the resumable download's rename of its .part file, and the cache's symlink swap."""
    # docker_hosts writes on another host, through a shell over ssh (temp file, then mv): not a local write
    allowed = {"imagegen/util/files.py", "imagegen/models/fetch.py", "imagegen/models/cache.py",
               "imagegen/runtimes/docker_hosts.py"}
    found = []
    for path in (REPO / "imagegen").rglob("*.py"):
        relative = path.relative_to(REPO).as_posix()
        text = path.read_text(encoding="utf-8")
        if relative not in allowed and re.search(r"os\.replace\(|os\.link\(|\.partial\b|\.tmp\"", text):
            found.append(relative)
    assert not found, f"use imagegen.util.files.write_atomic in {found}"


def test_write_private_makes_a_0600_file_atomically_and_is_the_only_secret_writer(tmp_path):
    target = tmp_path / "private" / "worker.token"
    files.write_private(target, "s3cret")
    assert target.read_text() == "s3cret" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    old_inode = target.stat().st_ino
    files.write_private(target, "new")  # a rename: a file bind-mounted into a container keeps the old secret
    assert target.read_text() == "new" and target.stat().st_ino != old_inode
    assert os.listdir(target.parent) == ["worker.token"]
    writers = [path.relative_to(REPO).as_posix() for path in (REPO / "imagegen").rglob("*.py")
               if re.search(r"O_CREAT[^\n]*0o600|0o600[^\n]*O_CREAT", path.read_text(encoding="utf-8"))]
    assert writers == [], f"write 0600 files with imagegen.util.files.write_private, not in {writers}"
