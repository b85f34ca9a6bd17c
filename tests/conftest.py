"""Shared fixtures. Tests that need ComfyUI or Docker skip locally when those are missing,
but fail under CI=true, where .ci/run has installed everything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
FIXTURES = Path(os.environ.get("IMAGEGEN_DEV_CACHE") or REPO / ".cache") / "fixtures"


def require(condition: bool, why: str) -> None:
    """Skip when a heavy dependency is absent; under CI a missing dependency is a failure."""
    if not condition:
        if IN_CI:
            pytest.fail(f"CI=true but {why}: .ci/run must install it")
        pytest.skip(why)


def docker_with_image(image: str):
    """This machine's Docker engine (a docker SDK client) holding the worker image; else a skip that says
    what to run (a failure under CI)."""
    try:
        import docker
    except ImportError:
        require(False, "the docker SDK is not installed")
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # noqa: BLE001
        require(False, f"the Docker daemon is not reachable ({type(exc).__name__}); run scripts/setup-docker.sh")
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        require(False, f"the image {image} is not built (run scripts/setup-docker.sh or ./build-image.sh --cpu-local)")
    return client


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own IMAGEGEN_HOME (config, model cache, worker records)."""
    home = tmp_path / "imagegen-home"
    monkeypatch.setenv("IMAGEGEN_HOME", str(home))
    for name in ("IMAGEGEN_MODELS_DIR", "IMAGEGEN_OUTPUT_DIR", "IMAGEGEN_MODEL", "HF_TOKEN", "IMAGEGEN_SHARED_MODELS",
                 "IMAGEGEN_DOCKER_HOSTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IMAGEGEN_RUNTIME", "local")  # Docker tests ask for --runtime docker themselves
    return home


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    from imagegen.util import paths

    for candidate in paths.comfyui_dir_candidates():
        if (candidate / "main.py").is_file():
            os.environ["IMAGEGEN_COMFYUI_DIR"] = str(candidate)
            require(_imports("torch", "torchvision", "aiohttp"), "torch/torchvision/aiohttp are not importable")
            return candidate
    require(False, "no ComfyUI checkout (run scripts/setup-dev.sh)")


@pytest.fixture(scope="session")
def ray_installed() -> None:
    """Ray (the `ray` extra) for tests marked `ray`: under CI its absence fails them."""
    require(_imports("ray"), "Ray is not installed (pip install 'imagegen[ray]')")


def _imports(*modules: str) -> bool:
    code = "import " + ", ".join(modules)
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def tiny_sd15(comfyui_dir) -> Path:
    """A random-weight SD1.5-architecture checkpoint ComfyUI detects as SD15 (built once, cached)."""
    target = FIXTURES / "tiny-sd15.safetensors"
    if not target.is_file():
        subprocess.run([sys.executable, str(REPO / "tests" / "tiny_models.py"), "sd15", str(target)], check=True,
                       env={**os.environ, "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir)}, capture_output=True)
    return target


@pytest.fixture(scope="session")
def tiny_esrgan(comfyui_dir) -> Path:
    """A random-weight x4 ESRGAN (RRDBNet, 8 features, 1 block) that ComfyUI's UpscaleModelLoader takes."""
    target = FIXTURES / "tiny-esrgan-x4.safetensors"
    if not target.is_file():
        subprocess.run([sys.executable, str(REPO / "tests" / "tiny_models.py"), "esrgan", str(target), "4"], check=True,
                       capture_output=True)
    return target


def _tiny(kind: str, name: str, comfyui_dir: Path) -> Path:
    target = FIXTURES / name
    if not target.is_file():
        subprocess.run([sys.executable, str(REPO / "tests" / "tiny_models.py"), kind, str(target)], check=True,
                       env={**os.environ, "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir)}, capture_output=True)
    return target


@pytest.fixture(scope="session")
def tiny_sd15_clear(comfyui_dir) -> Path:
    """tiny_sd15 with a VAE that passes images through (8x8 blocks keep their colour): img2img checks."""
    return _tiny("sd15-clear", "tiny-sd15-clear.safetensors", comfyui_dir)


@pytest.fixture(scope="session")
def tiny_sd15_inpaint(comfyui_dir) -> Path:
    """The same with a 9-channel UNet input: ComfyUI (and imagegen) take it for an inpainting checkpoint."""
    return _tiny("sd15-inpaint", "tiny-sd15-inpaint.safetensors", comfyui_dir)


def run_cli(*args: str, env: dict | None = None, input: bytes | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real CLI as a user runs it: a subprocess, stdout and stderr kept apart."""
    return subprocess.run([sys.executable, str(REPO / "generate_image.py"), *args], capture_output=True,
                          env={**os.environ, **(env or {})}, input=input, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    """An IMAGEGEN_HOME shared by a session's tests, so they share one warm worker."""
    return tmp_path_factory.mktemp("session-home")


@pytest.fixture(scope="session")
def comfy_worker(comfyui_dir, session_home):
    """A real local worker (ComfyUI on CPU behind the token proxy), started once per session."""
    from imagegen.runtimes.local import LocalRuntime

    previous = os.environ.get("IMAGEGEN_HOME")
    os.environ["IMAGEGEN_HOME"] = str(session_home)
    runtime = LocalRuntime(keep_warm=6 * 3600)  # the whole session: it may sit idle while the Docker tests run
    try:
        handle = runtime.ensure("cpu")
    finally:
        os.environ["IMAGEGEN_HOME"] = previous or ""
    yield handle
    os.environ["IMAGEGEN_HOME"] = str(session_home)
    try:
        runtime.stop()
    finally:
        os.environ["IMAGEGEN_HOME"] = previous or ""


def communicate(process: subprocess.Popen, timeout: float) -> tuple[bytes, bytes]:
    """Wait for a CLI subprocess; on timeout kill it (and what it started) so nothing lingers."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
