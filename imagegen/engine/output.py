"""Where images go: output paths, atomic writes, stdout and --json result records.

stdout is data: one absolute path per image, or one JSON object per image with --json.
A file is written under a temporary name and renamed, so a partial file never has the final name.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from imagegen.util import files
from imagegen.util.errors import ImagegenError

RESULT_SCHEMA = "imagegen.result/1"


def slugify(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def default_name(prompt: str, seed: int, index: int = 0) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{slugify(prompt)}-{seed}" + (f"-{index}" if index else "") + ".png"


def plan_outputs(output: str | None, count: int, names: list[str], overwrite: bool,
                 default_dir: Path) -> list[Path | None]:
    """Decide every output path before any work starts; None means stdout."""
    if output == "-":
        if count != 1:
            raise ImagegenError("invalid_argument", f"-o - writes a single PNG to stdout, but --count is {count}",
                                hint="Use --count 1 with -o -, or -o DIR for several images.")
        return [None]
    if output is None:
        targets = [default_dir / name for name in names]
    else:
        path = Path(output).expanduser()
        if output.endswith(("/", os.sep)) or path.is_dir():
            targets = [path / name for name in names]
        else:
            if path.suffix.lower() != ".png":
                raise ImagegenError("invalid_argument",
                                    f"-o {output}: output files are PNG; name it *.png or pass a directory",
                                    hint="For example -o robot.png or -o out/.")
            targets = [path] if count == 1 else [path.with_name(f"{path.stem}-{i + 1}{path.suffix}")
                                                 for i in range(count)]
    probed: set[Path] = set()
    for target in targets:
        _check_writable(target.absolute(), overwrite, probed)
    return [t.absolute() for t in targets]


def _check_writable(target: Path, overwrite: bool, probed: set[Path]) -> None:
    if target.is_dir():
        raise ImagegenError("output_not_writable", f"{target} is a directory, not a file name")
    if target.exists() and not overwrite:
        raise ImagegenError("output_exists", f"{target} exists already")
    parent = files.nearest_existing_parent(target.parent)
    if not parent.is_dir():
        raise ImagegenError("output_not_writable", f"{parent} is a file, so {target} cannot be created")
    if parent in probed:
        return
    problem = files.probe_writable(parent)  # os.access is not proof: /proc, read-only mounts, ACLs
    probed.add(parent)
    if problem is not None:
        raise ImagegenError("output_not_writable", f"cannot create files in {parent}: {problem.strerror or problem}",
                            hint="Choose an -o path in a writable directory.")


def write_atomic(target: Path, data: bytes, overwrite: bool) -> Path:
    """Write an image all or nothing; a full disk is disk_full and no temporary file is left."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return files.write_atomic(target, data, overwrite=overwrite)
    except FileExistsError:
        raise ImagegenError("output_exists", f"{target} appeared while the image was rendering") from None
    except OSError as exc:
        if exc.errno in files.DISK_FULL:
            raise ImagegenError("disk_full", f"no space left to write {target}",
                                hint=f"Free space in {target.parent} or choose another -o.") from None
        raise ImagegenError("output_not_writable", f"cannot write {target}: {exc.strerror or exc}",
                            hint="Choose an -o path in a writable directory.") from None


def write_stdout(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def emit_result(record: dict, json_mode: bool, quiet: bool = False) -> None:
    if json_mode:
        print(json.dumps(record), flush=True)
    elif not quiet and record.get("path"):
        print(record["path"], flush=True)


def emit_results(records, json_mode: bool) -> None:
    """Each record as it comes; one whose PNG went to stdout (-o -) goes to stderr with --json, and unsaid."""
    for record in records:
        if record["path"] != "-":
            emit_result(record, json_mode)
        elif json_mode:
            print(json.dumps(record), file=sys.stderr, flush=True)
