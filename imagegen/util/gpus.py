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


CPU_CHOICES = ("cpu", "none")


def select(gpus: list[Gpu], choice: str | None) -> list[Gpu]:
    """`--gpus`: all (the default), cpu (no GPU: CPU workers; `none` says the same), or GPU indices
    and UUIDs, comma-separated (`0`, `0,2`, `device=1`, `GPU-3f2a...`). An index is a GPU's index as
    nvidia-smi numbers them: `--gpus 0` is the first GPU, never the CPU."""
    from imagegen.util.errors import ImagegenError

    choice = (choice or "all").strip()
    if choice.lower() == "all":
        return gpus
    if choice.lower() in CPU_CHOICES:
        return []
    known = ", ".join(f"{g.index} ({g.uuid})" for g in gpus) or "none"
    hint = ("Pass GPU indices or UUIDs as `nvidia-smi -L` lists them, --gpus all, or --gpus cpu." if gpus
            else "This machine has no NVIDIA GPU: use --gpus cpu (or leave --gpus out).")
    chosen = []
    parts = [p.strip() for p in choice.removeprefix("device=").split(",")]
    if not any(parts):
        raise ImagegenError("invalid_argument", f"--gpus {choice!r}: name GPUs, all or cpu (GPUs: {known})", hint=hint)
    for part in parts:
        if not part:
            continue
        if part.lower() in CPU_CHOICES or part.lower() == "all":
            raise ImagegenError("invalid_argument",
                                f"--gpus {choice}: {part!r} cannot be combined with GPUs (GPUs: {known})", hint=hint)
        match = [g for g in gpus
                 if str(g.index) == part or g.uuid == part or (part.startswith("GPU-") and g.uuid.startswith(part))]
        if not match:
            raise ImagegenError("invalid_argument", f"--gpus {choice}: no GPU {part!r} on this machine (GPUs: {known})",
                                hint=hint)
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
