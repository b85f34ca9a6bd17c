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

from imagegen.util.errors import ImagegenError

RESULT_SCHEMA = "imagegen.result/1"


def slugify(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def default_name(prompt: str, seed: int, index: int = 0) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{slugify(prompt)}-{seed}" + (f"-{index}" if index else "") + ".png"


def plan_outputs(output: str | None, count: int, names: list[str], overwrite: bool, default_dir: Path) -> list[Path | None]:
    """Decide every output path before any work starts; None means stdout."""
    if output == "-":
        if count != 1:
            raise ImagegenError("invalid_argument", "-o - writes a single PNG to stdout, but --count is %d" % count,
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
                raise ImagegenError("invalid_argument", f"-o {output}: output files are PNG; name it *.png or pass a directory",
                                    hint="For example -o robot.png or -o out/.")
            targets = [path] if count == 1 else [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]
    for target in targets:
        _check_writable(target.absolute(), overwrite)
    return [t.absolute() for t in targets]


def _check_writable(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise ImagegenError("output_not_writable", f"{target} is a directory, not a file name")
    if target.exists() and not overwrite:
        raise ImagegenError("output_exists", f"{target} exists already")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ImagegenError("output_not_writable", f"{parent} is a file, so {target} cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ImagegenError("output_not_writable", f"no permission to write in {parent}")


def write_atomic(target: Path, data: bytes, overwrite: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails if the name appeared meanwhile: never clobber
            os.unlink(tmp)
    except FileExistsError:
        os.unlink(tmp)
        raise ImagegenError("output_exists", f"{target} appeared while the image was rendering") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_stdout(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def emit_result(record: dict, json_mode: bool, quiet: bool = False) -> None:
    if json_mode:
        print(json.dumps(record), flush=True)
    elif not quiet and record.get("path"):
        print(record["path"], flush=True)
