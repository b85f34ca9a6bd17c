"""A model's missing files fetched on an SSH host, into that host's cache, by a one-off worker container.

The container runs `entrypoint.py fetch MODEL` (the registry and download code the image already
has) and prints JSON-line progress, which goes to the same renderer as a fetch on this machine.
The user's models.yaml and the Hugging Face token go to the host as 0600 files, mounted read-only:
the token is in no environment variable and on no command line (HF_TOKEN_PATH names the file).
"""

from __future__ import annotations

import json
import os
import shlex
import time

from imagegen.util.errors import ERRORS, ImagegenError


def _hf_token() -> str | None:
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no stored login
        return None


def missing_on_host(engine, bundle, models_dir: str) -> list:
    """The bundle's files the host's cache lacks (or holds at another size)."""
    files = [f for f in bundle.files.values() if not f.local_path]
    if not files:
        return []
    paths = " ".join(shlex.quote(f"{models_dir}/{f.folder}/{f.filename}") for f in files)
    from imagegen.runtimes import ssh_forward

    out = ssh_forward.run(engine.target, f"for f in {paths}; do stat -c %s \"$f\" 2>/dev/null || echo -1; done")
    sizes = [int(line) for line in out.split()]
    return [f for f, size in zip(files, sizes, strict=False) if size < 0 or (f.size is not None and size != f.size)]


def fetch_on_host(engine, bundle, renderer=None) -> None:
    """Fetch what the host lacks; raise the container's own error (its code, message and hint).
    `renderer`: makes the callable that gets the progress events (default: tqdm bars on stderr)."""
    from imagegen.models.fetch_progress import TqdmRenderer
    from imagegen.util import paths

    models_dir = engine._models_source()
    if not missing_on_host(engine, bundle, models_dir):
        return
    emit = renderer() if renderer else TqdmRenderer()
    state = engine._state_dir()
    volumes = {models_dir: {"bind": "/models", "mode": "rw"}}
    environment = {"HOME": "/tmp", "IMAGEGEN_MODELS_DIR": "/models"}
    for key in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET"):
        if os.environ.get(key):
            environment[key] = os.environ[key]
    user_yaml = paths.user_models_yaml()
    if user_yaml.is_file():
        remote = engine._put_private(f"{state}/models.yaml", user_yaml.read_bytes())
        volumes[remote] = {"bind": "/run/imagegen/config/models.yaml", "mode": "ro"}
        environment["IMAGEGEN_HOME"] = "/run/imagegen/config"
    token = _hf_token()
    if token:
        remote = engine._put_private(f"{state}/hf_token", token.encode())
        volumes[remote] = {"bind": "/run/imagegen/hf_token", "mode": "ro"}
        environment["HF_TOKEN_PATH"] = "/run/imagegen/hf_token"
    labels = {"imagegen.fetch": "1", **{k: v for k, v in engine._owner_labels().items() if k != "imagegen.worker"},
              "imagegen.owner_pid": str(os.getpid()), "imagegen.started": str(int(time.time()))}
    emit({"event": "waiting", "message": f"fetching {bundle.name} on {engine.host_name}"})
    container = engine.client.containers.run(
        engine.image, ["fetch", bundle.name, "--models-dir", "/models"], detach=True, user=engine._user(),
        volumes=volumes, environment=environment, labels=labels, name=engine._name("fetch"),
        network_mode=os.environ.get("IMAGEGEN_HOSTS_FETCH_NETWORK") or None)
    last: dict = {}
    try:
        pending = b""
        for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=False):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    last = event
                    emit(event)
        status = container.wait(timeout=60).get("StatusCode")
    finally:
        engine._remove(container)
        if hasattr(emit, "close"):
            emit.close()
    if status != 0 or last.get("event") == "error":
        code = str(last.get("code") or "download_failed")
        raise ImagegenError(code if code in ERRORS else "download_failed",
                            f"on {engine.host_name}: {last.get('message') or f'the fetch exited with code {status}'}",
                            hint=last.get("hint"), host=engine.host_name)
