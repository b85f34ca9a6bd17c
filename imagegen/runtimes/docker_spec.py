"""What a worker container is made of (its serve command, mounts, labels, run options) and what its exit means.

Plain data from plain inputs: runtimes/docker.py starts, finds and removes the containers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Set as AbstractSet
from pathlib import Path

from imagegen import __version__
from imagegen.util.errors import ImagegenError

LABEL = "imagegen.worker"
CONTAINER_PORT = "8188/tcp"
IMAGE = os.environ.get("IMAGEGEN_IMAGE", f"imagegen:{__version__}")
TOKEN_IN_CONTAINER = "/run/imagegen/token"
MODELS_IN_CONTAINER = "/models"


def memory_limit() -> str:
    """IMAGEGEN_DOCKER_MEMORY (e.g. "16g"): an opt-in hard memory cap per worker container, swap included."""
    return os.environ.get("IMAGEGEN_DOCKER_MEMORY", "").strip()


def serve_command(gpu: bool, keep_warm: float, models_source: str, secret_file: str, shared_models: list[Path],
                  mounts: AbstractSet[str]) -> tuple[list[str], dict]:
    """The entrypoint's `serve` arguments and the volumes they read: the model cache (read-write), the
    secret file, each shared model tree and each local model file (at its own path), read-only."""
    volumes = {
        models_source: {"bind": MODELS_IN_CONTAINER, "mode": "rw"},
        secret_file: {"bind": TOKEN_IN_CONTAINER, "mode": "ro"},
    }
    command = ["serve", "--host", "0.0.0.0", "--port", CONTAINER_PORT.split("/")[0],
               "--token-file", TOKEN_IN_CONTAINER, "--keep-warm", str(keep_warm),
               "--device", "cuda" if gpu else "cpu", "--models-dir", MODELS_IN_CONTAINER]
    for index, tree in enumerate(shared_models):
        volumes[str(tree)] = {"bind": f"/shared/{index}", "mode": "ro"}
        command += ["--shared-models", f"/shared/{index}"]
    for path in sorted(mounts):  # local model files (the files, never their folders), at the same path
        volumes[path] = {"bind": path, "mode": "ro"}
    return command, volumes


def worker_labels(owner: dict[str, str], slot: str, gpu: bool, image: str, mounts: AbstractSet[str]) -> dict[str, str]:
    """The labels a worker is found again by (owner, slot) and fitted by (image, mounts, memory cap)."""
    return {
        **owner,
        "imagegen.slot": slot,
        "imagegen.device": "cuda" if gpu else "cpu",
        "imagegen.version": __version__,
        "imagegen.image": image,
        "imagegen.owner_pid": str(os.getpid()),
        "imagegen.mounts": json.dumps(sorted(mounts)),
        "imagegen.started": str(int(time.time())),
        "imagegen.memory": memory_limit(),
    }


def fits(container, image: str, mounts: AbstractSet[str]) -> bool:
    """Whether a worker container can serve a job: this image and memory cap, and every file in `mounts`."""
    try:
        mounted = set(json.loads(container.labels.get("imagegen.mounts", "[]")))
    except ValueError:
        return False
    return (container.labels.get("imagegen.image") == image and set(mounts) <= mounted
            and container.labels.get("imagegen.memory", "") == memory_limit())


def logs(container, lines: int = 25) -> str:
    try:
        return container.logs(tail=lines).decode(errors="replace").strip() or "(no output)"
    except Exception:  # noqa: BLE001 - the container may be gone already
        return "(no log)"


def death(container, when: str) -> ImagegenError:
    """Why a worker container exited: killed for memory (and the cap to raise), or its exit code and last log lines."""
    state = container.attrs["State"]
    if state.get("OOMKilled") or state.get("ExitCode") == 137:
        how = "by the kernel's OOM killer" if state.get("OOMKilled") else "(exit 137: SIGKILL, usually the OOM killer)"
        limit = memory_limit()
        return ImagegenError(
            "out_of_memory",
            f"the worker container was killed for memory {when} {how}"
            + (f"; its memory limit is IMAGEGEN_DOCKER_MEMORY={limit}" if limit else ""),
            hint=(f"Raise IMAGEGEN_DOCKER_MEMORY (now {limit}) or unset it, or use a smaller --size, --count or model."
                  if limit else None),
        )
    code = "worker_start_failed" if "start-up" in when else "worker_died"
    return ImagegenError(code, f"the worker container exited with code {state.get('ExitCode')} {when}. "
                               f"Last log lines:\n{logs(container)}")
