"""ComfyUI launch flags that only some ComfyUI versions have, passed only where the worker's ComfyUI defines them.

ComfyUI's argparse exits on a flag it does not know, and its flags change between versions: newer
releases deprecate --disable-api-nodes in favour of --offline and --disable-partner-nodes, and turn
an assets database on by default. We read the flag strings from ComfyUI's own comfy/cli_args.py
(text only: importing it would parse our argv) and pick, for each thing we want switched off, the
flags this ComfyUI has. The pinned 0.3.75 gets exactly the flags it always got.
"""

from __future__ import annotations

import re
from pathlib import Path

# What the pinned ComfyUI (0.3.75) defines, of the flags below: assumed when cli_args.py cannot be read.
PINNED = frozenset({"--disable-api-nodes", "--database-url"})

# Network off: the newest spelling first. A ComfyUI with either new flag gets those, not the deprecated one.
NETWORK_OFF = ("--offline", "--disable-partner-nodes")
NETWORK_OFF_OLD = "--disable-api-nodes"
# An assets database (and the scan of the model folders that feeds it): off wherever it can be.
ASSETS_OFF = ("--disable-assets", "--disable-assets-db", "--disable-asset-scan", "--disable-assets-scan")
# ComfyUI's user database: in memory, so workers never share or lock a file.
DATABASE = ("--database-url", "sqlite:///:memory:")

_FLAG = re.compile(r"""["'](--[a-z0-9][a-z0-9-]*)["']""")


def defined_flags(comfyui_dir: Path) -> frozenset[str]:
    """Every --flag string in this ComfyUI's comfy/cli_args.py; PINNED when the file cannot be read."""
    try:
        text = (Path(comfyui_dir) / "comfy" / "cli_args.py").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return PINNED
    return frozenset(_FLAG.findall(text))


def optional_flags(comfyui_dir: Path) -> list[str]:
    """The version-dependent flags for this ComfyUI, in a stable order."""
    defined = defined_flags(comfyui_dir)
    flags = [flag for flag in NETWORK_OFF if flag in defined]
    if not flags and NETWORK_OFF_OLD in defined:
        flags.append(NETWORK_OFF_OLD)
    flags += [flag for flag in ASSETS_OFF if flag in defined]
    if DATABASE[0] in defined:
        flags += list(DATABASE)
    return flags
