"""`imagegen doctor`: each thing a worker needs, checked, with the fix for each problem."""

from __future__ import annotations

import shutil

from imagegen import __version__
from imagegen.util import gpus, paths
from imagegen.util.errors import ImagegenError
from imagegen.util.files import nearest_existing_parent, probe_writable


def _check(name: str, ok: bool, detail: str, fix: str = "", optional: bool = False) -> dict:
    return {"check": name, "ok": ok, "detail": detail, "fix": fix if not ok else "", "optional": optional}


def run_checks() -> list[dict]:
    checks = []
    found = gpus.list_gpus()
    checks.append(_check("gpus", bool(found),
                         "; ".join(f"{g.index}: {g.name} {g.uuid} {g.memory_total_mib} MiB" for g in found)
                         or "no NVIDIA GPU found (nvidia-smi absent or failing): workers run on CPU",
                         "Install the NVIDIA driver so nvidia-smi works.", optional=True))
    try:
        from imagegen.runtimes.docker import IMAGE, connect

        client = connect()
        info = client.info()
        checks.append(_check("docker", True, f"daemon {info.get('ServerVersion')} reachable"))
        has_nvidia = "nvidia" in (info.get("Runtimes") or {})
        checks.append(_check("nvidia runtime", has_nvidia, "present" if has_nvidia else "absent",
                             "Install the NVIDIA Container Toolkit and restart Docker.", optional=not found))
        try:
            image = client.images.get(IMAGE)
            label = image.labels.get("imagegen.version")
            checks.append(_check("image", label == __version__, f"{IMAGE} (imagegen {label})",
                                 "Rebuild it: ./build-image.sh"))
        except Exception:  # noqa: BLE001 - docker.errors.ImageNotFound and API errors alike
            checks.append(_check("image", False, f"{IMAGE} is not built",
                                 "./build-image.sh (offline: ./build-image.sh --cpu-local)"))
    except ImagegenError as error:
        checks.append(_check("docker", False, error.message, error.hint, optional=True))
    from imagegen.runtimes.local import find_comfyui_dir

    try:
        checks.append(_check("local runtime", True, f"ComfyUI at {find_comfyui_dir()}", optional=True))
    except ImagegenError as error:
        checks.append(_check("local runtime", False, error.message, error.hint, optional=True))
    models = paths.models_dir()
    probe = nearest_existing_parent(models)
    writable = probe_writable(probe) is None  # a real file created and removed: os.access misses read-only mounts
    checks.append(_check("model cache", writable, f"{models} ({'writable' if writable else 'not writable'})",
                         "Set IMAGEGEN_MODELS_DIR to a writable folder."))
    free = shutil.disk_usage(probe).free
    checks.append(_check("free disk", free > 10 * 1024**3, f"{free / 1024**3:.1f} GiB free at {probe}",
                         "Free space: SD1.5 needs 2 GB, SDXL 7 GB, Flux about 30 GB.", optional=free > 3 * 1024**3))
    if not any(c["ok"] for c in checks if c["check"] in ("docker", "local runtime")):
        checks.append(_check("runtime", False, "neither Docker nor a local ComfyUI can run workers",
                             "Start Docker and build the image, or run scripts/setup-dev.sh for the local runtime."))
    return checks
