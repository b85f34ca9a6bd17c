"""The host's NVIDIA GPUs, from nvidia-smi (absent or failing: no GPUs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_free_mib: int


def list_gpus() -> list[Gpu]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,memory.total,memory.free",
                                 "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []
    return [parse_line(line) for line in result.stdout.splitlines() if line.strip()]


def parse_line(line: str) -> Gpu:
    index, uuid, name, total, free = [part.strip() for part in line.split(",")]
    return Gpu(int(index), uuid, name, int(float(total)), int(float(free)))


def select(gpus: list[Gpu], choice: str | None) -> list[Gpu]:
    """`--gpus` as Docker reads it: all, none, N (the first N GPUs), or a list of indices/UUIDs
    (`0,2`, `device=1`, `GPU-3f2a...`)."""
    from imagegen.util.errors import ImagegenError

    choice = (choice or "all").strip()
    if choice == "all":
        return gpus
    if choice == "none":
        return []
    if choice.isdigit():
        if int(choice) > len(gpus):
            raise ImagegenError("invalid_argument", f"--gpus {choice}: this machine has {len(gpus)} GPU(s)")
        return gpus[: int(choice)]
    chosen = []
    for part in (p.strip() for p in choice.removeprefix("device=").split(",") if p.strip()):
        match = [g for g in gpus if str(g.index) == part or g.uuid == part or (part.startswith("GPU-") and g.uuid.startswith(part))]
        if not match:
            known = ", ".join(f"{g.index} ({g.uuid})" for g in gpus) or "none"
            raise ImagegenError("invalid_argument", f"--gpus {choice}: no GPU {part!r} on this machine (GPUs: {known})")
        chosen += [g for g in match if g not in chosen]
    return chosen


def detect_device() -> str:
    """cuda when this process may use an NVIDIA GPU, else cpu (no nvidia-smi call: cheap)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return "cpu"
    if Path("/dev/nvidiactl").exists() or any(Path("/proc/driver/nvidia/gpus").glob("*")):
        return "cuda"
    return "cpu"
