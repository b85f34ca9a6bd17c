"""Download a bundle's missing files into the model cache; nothing gets its final name unverified.

For each bundle: ask the hub about every missing file first (HEAD: gated or refused access, wrong
sizes and the bytes to come surface before any transfer), check free space, then per file, under a
lock shared by every process on this cache: download into models_dir/.downloads/ (continued with
a Range request on the next run after an interruption), check size and sha256, rename into the
ComfyUI folder, and record the hash in a ledger so the file is not hashed again.

Transfers use huggingface_hub's HTTP downloader (`http_get`) into a file we keep, rather than
`hf_hub_download`, which deletes its partial file on any failure: a 20 GB download cut at 95%
would start over. The token (HF_TOKEN or a stored login) goes only into request headers.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from imagegen.models import cache
from imagegen.models.fetch_progress import gib
from imagegen.models.ledger import Ledger, lock_dir, sha256_file
from imagegen.models.registry import Bundle, ModelFile
from imagegen.util import cancel, paths
from imagegen.util.errors import EXIT_INTERRUPTED, ImagegenError
from imagegen.util.files import nearest_existing_parent

Event = dict[str, Any]
EventCallback = Callable[[Event], None]

DOWNLOADS = ".downloads"
PROGRESS_INTERVAL = 0.25  # seconds between progress events of one file
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class RemoteFile:
    """What the hub says about one file, from the HEAD request."""

    file: ModelFile
    url: str                  # where the bytes are (the hub's redirect target)
    size: int | None
    sha256: str | None        # the hub's ETag, when it is a sha256 (LFS files)


def _label(file: ModelFile) -> str:
    return f"{file.folder}/{file.filename}"


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def _redactor(token: str | None) -> Callable[[object], str]:
    """The first line of an error's text, with the token (should a library ever echo it) masked."""
    def redact(error: object) -> str:
        text = str(error).replace(token, "<HF_TOKEN>") if token else str(error)
        return (text.splitlines() or [error.__class__.__name__])[0]
    return redact


def _gated(file: ModelFile, token: str | None, status: int | None) -> ImagegenError:
    page = f"https://huggingface.co/{file.repo}"
    if not token:
        why = f"{file.repo} is gated and no Hugging Face token is set"
    elif status == 401:
        why = f"the hub refused the Hugging Face token for {file.repo} (401: invalid or expired)"
    else:
        why = f"the Hugging Face token has no access to {file.repo} yet ({status or 403})"
    return ImagegenError(
        "gated_model", f"{_label(file)}: {why}. Accept the licence at {page} (logged in), then pass a read token.",
        hint=f"Create a read token at https://huggingface.co/settings/tokens, `export HF_TOKEN=hf_...`, "
             f"and run the same command again. Licence page: {page}",
        repo=file.repo, url=page)


def head(file: ModelFile, token: str | None, redact: Callable[[object], str]) -> RemoteFile:
    """The hub's metadata for a file; access and existence errors become ImagegenErrors."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if file.gated and not token:
        raise _gated(file, None, None)
    endpoint = _endpoint()
    url = hf_hub_url(str(file.repo), str(file.path_in_repo), revision=file.revision, endpoint=endpoint)
    where = f"{file.repo}/{file.path_in_repo}@{file.revision}"
    try:
        meta = get_hf_file_metadata(url, token=token or False, endpoint=endpoint)
    except GatedRepoError as exc:  # before RepositoryNotFoundError: it is a subclass
        raise _gated(file, token, exc.response.status_code) from None
    except RepositoryNotFoundError as exc:
        if exc.response.status_code in (401, 403):  # private or gated repos answer like missing ones
            raise _gated(file, token, exc.response.status_code) from None
        raise ImagegenError("download_failed", f"{_label(file)}: no repository {file.repo} on {endpoint}",
                            hint="Check `repo:` of this file in models.yaml.") from None
    except (RevisionNotFoundError, EntryNotFoundError):
        raise ImagegenError("download_failed", f"{_label(file)}: {where} does not exist on {endpoint}",
                            hint="Check `file:` and `revision:` of this file in models.yaml.") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise _gated(file, token, status) from None
        raise ImagegenError("download_failed", f"{_label(file)}: the hub answered {status} for {where}: "
                                               f"{redact(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - transport errors come from the HTTP client of the day
        raise ImagegenError("download_failed", f"{_label(file)}: cannot reach {endpoint} for {where}: "
                                               f"{exc.__class__.__name__}: {redact(exc)}",
                            hint="Check the network (or HF_ENDPOINT), then run the same command again.") from None
    etag = (meta.etag or "").lower()
    return RemoteFile(file=file, url=meta.location or url, size=meta.size,
                      sha256=etag if SHA256.fullmatch(etag) else None)


class _Progress:
    """A file object for http_get that reports bytes written, at most every PROGRESS_INTERVAL.

    The callback runs in the downloading thread, so an exception it raises (or Ctrl-C) stops the
    transfer at once, leaving the partial file to continue from.
    """

    def __init__(self, raw, emit: EventCallback, base: Event):
        self._raw, self._emit, self._base = raw, emit, base
        self._last = time.monotonic()

    def write(self, data: bytes) -> int:
        written = self._raw.write(data)
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._raw.flush()
            self._emit({**self._base, "event": "progress", "bytes": self._raw.tell()})
        return written

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


def _part_path(models_dir: Path, remote: RemoteFile) -> Path:
    tag = (remote.file.sha256 or remote.sha256 or remote.file.revision or "main")[:16]
    return models_dir / DOWNLOADS / remote.file.folder / f"{remote.file.filename}.{tag}.part"


def _mismatch(file: ModelFile, what: str, expected: object, got: object, deleted: Path | None) -> ImagegenError:
    said = f"; deleted {deleted}" if deleted else ""
    return ImagegenError("checksum_mismatch",
                         f"{_label(file)} from {file.repo}: {what} expected {expected}, got {got}{said}",
                         expected=expected, got=got, file=_label(file))


def _download(remote: RemoteFile, models_dir: Path, token: str | None, emit: EventCallback, base: Event,
              redact: Callable[[object], str]) -> tuple[Path, str]:
    """Fetch one file into its part file; returns (part path, sha256) once size and hash are right."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from tqdm import tqdm

    file = remote.file
    part = _part_path(models_dir, remote)
    part.parent.mkdir(parents=True, exist_ok=True)
    expected_size = file.size or remote.size
    done = part.stat().st_size if part.exists() else 0
    if expected_size and done > expected_size:
        part.unlink()
        done = 0
    emit({**base, "event": "start", "bytes": done, "total": expected_size, "resumed": done > 0, "repo": file.repo})
    headers = {"user-agent": "imagegen"}
    if token and urlsplit(remote.url)[:2] == urlsplit(_endpoint())[:2]:  # never send the token to a CDN
        headers["authorization"] = f"Bearer {token}"
    while True:
        try:
            with part.open("ab") as raw:
                # a disabled bar of our own keeps huggingface_hub's bar off stderr
                # (the parameter exists from 0.2x to 2.x)
                http_get(remote.url, _Progress(raw, emit, base), resume_size=done, headers=headers,  # type: ignore[arg-type]
                         expected_size=expected_size, displayed_filename=file.filename, _tqdm_bar=tqdm(disable=True))
            break
        except ImagegenError:  # raised by a progress callback (a cancelled call): stop, keep the part file
            raise
        except Exception as exc:  # noqa: BLE001 - hub errors are OSErrors, transport errors are the HTTP client's
            got = part.stat().st_size if part.exists() else 0
            if expected_size and got > expected_size:
                part.unlink()
                raise _mismatch(file, "size", expected_size, got, part) from None
            if got > done and not isinstance(exc, HfHubHTTPError):  # a dropped connection after progress: go on
                done = got
                continue
            of = f" of {gib(expected_size)}" if expected_size else ""
            raise ImagegenError("download_failed", f"{_label(file)}: download from {file.repo} stopped at {gib(got)}"
                                                   f"{of}: {redact(exc)}",
                                hint="Run the same command again: the download continues where it stopped.") from None
    size = part.stat().st_size
    if expected_size and size != expected_size:
        part.unlink()
        raise _mismatch(file, "size", expected_size, size, part)
    emit({**base, "event": "verifying", "bytes": size, "total": size})
    actual = sha256_file(part)
    expected_sha = file.sha256 or remote.sha256
    if expected_sha and actual != expected_sha:
        part.unlink()
        raise _mismatch(file, "sha256", expected_sha, actual, part)
    return part, actual


def _fetch_one(remote: RemoteFile, models_dir: Path, token: str | None, emit: EventCallback, base: Event,
               redact: Callable[[object], str]) -> Path:
    from filelock import FileLock, Timeout

    file = remote.file
    final = file.cache_path(models_dir)
    lock = FileLock(str(lock_dir(models_dir) / (_label(file).replace("/", "__") + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        emit({**base, "event": "waiting", "message": f"another process is downloading {_label(file)}; waiting"})
        while True:
            try:
                lock.acquire(timeout=1.0)
                break
            except Timeout:
                cancel.check("the wait for another download")
    try:
        ledger = Ledger(models_dir)
        if final.is_file():  # finished by the process we waited for
            return _check_present(file, final, models_dir, emit, base)
        part, sha = _download(remote, models_dir, token, emit, base, redact)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        for stale in part.parent.glob(f"{glob.escape(Path(file.filename).name)}.*.part"):  # from an older revision
            stale.unlink(missing_ok=True)
        source = "registry" if file.sha256 else ("hub" if remote.sha256 else "first_download")
        ledger.record(final, sha, source)
        emit({**base, "event": "verified", "sha256": sha, "source": source, "bytes": final.stat().st_size})
        if not file.sha256:
            emit({**base, "event": "recorded", "sha256": sha,
                  "message": f"sha256 of {_label(file)} was not in the registry; recorded {sha} on first download "
                             f"({'it matches the hub' if remote.sha256 else 'the hub gave none to compare'}). "
                             f"Pin it with `sha256: {sha}` in models.yaml."})
        emit({**base, "event": "done", "path": str(final), "bytes": final.stat().st_size, "cached": False})
        return final
    finally:
        lock.release()


def _check_present(file: ModelFile, path: Path, models_dir: Path, emit: EventCallback, base: Event) -> Path:
    """A file already in the cache: verified once against the registry's sha256, then trusted by the ledger."""
    ledger = Ledger(models_dir)
    known = ledger.lookup(path)
    size = path.stat().st_size
    if known is None and (file.sha256 or file.size):
        if file.size and size != file.size:
            path.unlink()
            raise _mismatch(file, "size", file.size, size, path)
        if file.sha256:
            emit({**base, "event": "verifying", "bytes": size, "total": size})
            known = sha256_file(path)
            if known != file.sha256:
                path.unlink()
                raise _mismatch(file, "sha256", file.sha256, known, path)
            ledger.record(path, known, "registry")
    emit({**base, "event": "done", "path": str(path), "bytes": size, "cached": True, "sha256": known})
    return path


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(nearest_existing_parent(path)).free


def fetch_bundle(bundle: Bundle, models_dir: Path | None = None,
                 on_event: EventCallback | None = None) -> dict[str, Path]:
    """Make every downloadable file of a bundle present and verified; returns role -> path.

    Failures raise ImagegenError (or KeyboardInterrupt) after an "error" event.
    """
    notify = on_event or (lambda event: None)

    def emit(event: Event) -> None:  # every event, a progress tick included, is a point to stop at
        cancel.check("the download")
        notify(event)

    try:
        return _fetch_bundle(bundle, Path(models_dir or paths.models_dir()), emit)
    except ImagegenError as error:
        notify({"event": "error", "model": bundle.name, **{k: v for k, v in error.to_json().items() if k != "schema"}})
        raise
    except KeyboardInterrupt:
        notify({"event": "error", "model": bundle.name, "code": "interrupted", "exit_code": EXIT_INTERRUPTED,
              "message": "interrupted; the next fetch continues where this one stopped"})
        raise


def _fetch_bundle(bundle: Bundle, models_dir: Path, emit: EventCallback) -> dict[str, Path]:
    token = _token()
    redact = _redactor(token)
    result: dict[str, Path] = {}
    missing: list[tuple[str, ModelFile]] = []
    for role, file in bundle.files.items():
        present = cache.present_path(file, models_dir)
        if present is not None:
            result[role] = present
        elif file.downloadable:
            missing.append((role, file))
    for role, path in result.items():
        file = bundle.files[role]
        if file.downloadable and path == file.cache_path(models_dir):
            _check_present(file, path, models_dir, emit, {"model": bundle.name, "file": _label(file)})
    if not missing:
        return result
    if _offline():
        labels = ", ".join(_label(f) for _, f in missing)
        raise ImagegenError("model_missing", f"model {bundle.name!r} is missing {labels} "
                                             f"in {models_dir}, and HF_HUB_OFFLINE is set",
                            hint=f"Unset HF_HUB_OFFLINE and run `imagegen models pull {bundle.name}`.")
    remotes: list[tuple[str, RemoteFile]] = []
    for role, file in missing:
        remote = head(file, token, redact)
        if file.size and remote.size and file.size != remote.size:
            raise _mismatch(file, "size (registry vs hub, before download)", file.size, remote.size, None)
        if file.sha256 and remote.sha256 and file.sha256 != remote.sha256:
            raise _mismatch(file, "sha256 (registry vs hub, before download)", file.sha256, remote.sha256, None)
        remotes.append((role, remote))
    need = 0
    for _, remote in remotes:
        part = _part_path(models_dir, remote)
        need += max((remote.file.size or remote.size or 0) - (part.stat().st_size if part.exists() else 0), 0)
    free = _free_bytes(models_dir)
    emit({"event": "plan", "model": bundle.name, "files": [_label(r.file) for _, r in remotes], "bytes": need,
          "free": free})
    if need > free:
        raise ImagegenError("disk_full", f"model {bundle.name!r} needs {gib(need)} free in {models_dir}, which has "
                                         f"{gib(free)}: short by {gib(need - free)}",
                            path=str(models_dir), needed=need, free=free, shortfall=need - free)
    for role, remote in remotes:
        base = {"model": bundle.name, "file": _label(remote.file)}
        result[role] = _fetch_one(remote, models_dir, token, emit, base, redact)
    return result


def make_fetcher(reporter_or_callback: Any = None, models_dir: Path | None = None) -> Callable[[Bundle], None]:
    """A `fetch=` callable for cache.ensure_bundle: events go to a callback, or as tqdm bars via a Reporter."""
    from imagegen.models.fetch_progress import TqdmRenderer

    def fetch(bundle: Bundle) -> None:
        if reporter_or_callback is None or hasattr(reporter_or_callback, "status"):
            reporter = reporter_or_callback
            renderer = TqdmRenderer(quiet=bool(getattr(reporter, "quiet", False)),
                                    bars=getattr(reporter, "show_progress", None))
            try:
                fetch_bundle(bundle, models_dir, renderer)
            finally:
                renderer.close()
        else:
            fetch_bundle(bundle, models_dir, reporter_or_callback)

    def renderer():
        """Where events of a fetch elsewhere go (a Docker host's): the same bars, or the callback."""
        if reporter_or_callback is None or hasattr(reporter_or_callback, "status"):
            return TqdmRenderer(quiet=bool(getattr(reporter_or_callback, "quiet", False)),
                                bars=getattr(reporter_or_callback, "show_progress", None))
        return reporter_or_callback

    fetch.renderer = renderer  # type: ignore[attr-defined]
    return fetch


def fetch_main(model: str, models_dir: Path | None = None) -> int:
    """`entrypoint.py fetch MODEL`: JSON-line events on stdout; the last line says done or error."""
    from imagegen.models.registry import Registry

    def emit(event: Event) -> None:
        print(json.dumps(event), flush=True)

    try:
        bundle = Registry.load().get(model)
    except ImagegenError as error:
        emit({"event": "error", "model": model, **{k: v for k, v in error.to_json().items() if k != "schema"}})
        return error.exit_code
    try:
        fetch_bundle(bundle, models_dir, emit)
    except ImagegenError as error:  # already reported as an "error" event
        return error.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    emit({"event": "bundle_done", "model": model})
    return 0

