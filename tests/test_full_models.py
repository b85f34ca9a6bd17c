"""bench/full_models.py: random-weight models with the real architectures, for the GPU benchmark.

Full sizes are checked without allocating (ComfyUI's own classes and detection on meta tensors);
the small scale is built for real and rendered by real ComfyUI on CPU through imagegen's CLI, with
the generated models.yaml as the user registry.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, require, run_cli

BUILDER = REPO / "bench" / "full_models.py"

# Published parameter counts of the real models
KNOWN_PARAMS = {
    ("sd15", "unet"): 859.52e6, ("sd15", "vae"): 83.65e6, ("sd15", "clip_l"): 123.06e6,
    ("sdxl", "unet"): 2.567e9, ("sdxl", "vae"): 83.65e6, ("sdxl", "clip_l"): 123.06e6, ("sdxl", "clip_g"): 694.66e6,
    ("flux-dev", "transformer"): 11.90e9, ("flux-dev", "t5"): 4.762e9, ("flux-dev", "clip_l"): 123.06e6,
    ("flux-dev", "vae"): 83.82e6,
}
# What ComfyUI's detection must call each file
DETECTED = {("sd15", "checkpoint"): "SD15", ("sdxl", "checkpoint"): "SDXL", ("flux-dev", "diffusion_model"): "Flux",
            ("flux-dev", "t5"): "T5_XXL", ("flux-dev", "clip_l"): "CLIP_L", ("flux-dev", "vae"): "vae"}
# Lines ComfyUI 0.3.75 logs (WARNING level) when a file's keys do not fit the model it built
KEY_PROBLEMS = ("clip missing", "clip unexpected", "unet missing", "unet unexpected", "Missing VAE keys", "NOT LOADED",
                "left over keys", "not a checkpoint", "No VAE weights", "no CLIP/text encoder weights")


def _module():
    """bench/full_models.py itself (it imports torch and ComfyUI only inside its functions)."""
    if "bench_full_models" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_full_models", BUILDER)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules["bench_full_models"]


def _builder(comfyui_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(BUILDER), *args], capture_output=True, timeout=timeout,
                            env={**_env(comfyui_dir)})
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    return result


def _env(comfyui_dir: Path) -> dict:
    import os

    return {**os.environ, "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir)}


def _describe(comfyui_dir: Path, *args: str) -> dict:
    return json.loads(_builder(comfyui_dir, "--describe", *args).stdout)


def _assert_clean(model: str, role: str, entry: dict) -> None:
    assert entry["detected"] == DETECTED[(model, role)], (model, role, entry["detected"])
    for part in ("unet", "clip", "vae", "keys"):
        if part in entry:
            problems = {k: v for k, v in entry[part].items() if k in ("missing", "unexpected", "wrong_shape") and v}
            assert not problems, (model, role, part, problems)
    assert not entry.get("left_over"), (model, role, entry["left_over"][:5])


# --- (a) full sizes, no allocation ---------------------------------------------------------------

@pytest.mark.comfyui
def test_full_size_parameter_counts_sizes_and_layouts(comfyui_dir):
    described = _describe(comfyui_dir, "--scale", "full")
    fp8 = _describe(comfyui_dir, "--scale", "full", "--models", "flux-dev", "--flux-dtype", "fp8")["flux-dev"]
    real_sizes = _module().REAL_SIZES
    for model, files in described.items():
        for role, entry in files.items():
            _assert_clean(model, role, entry)
            for part, count in entry["params"].items():
                assert count == pytest.approx(KNOWN_PARAMS[(model, part)], rel=0.01), (model, part, count)
            # the real files' sizes, to within their headers (and CLIP-L's 1.2 MB text projection, see below)
            assert entry["size"] == pytest.approx(real_sizes[model][role], rel=0.006), (model, role, entry["size"])
    assert described["sd15"]["checkpoint"]["size"] == pytest.approx(2.13e9, rel=0.01)
    assert described["sdxl"]["checkpoint"]["size"] == pytest.approx(6.94e9, rel=0.01)
    flux = described["flux-dev"]
    assert flux["diffusion_model"]["size"] == pytest.approx(23.8e9, rel=0.01)
    assert flux["t5"]["size"] == pytest.approx(4.89e9, rel=0.01) and flux["t5"]["dtype_t5"] == "torch.float8_e4m3fn"
    # the real clip_l.safetensors lacks text_projection.weight, which ComfyUI then reports missing
    # (harmless for Flux, which never projects); ours carries it so the load is clean
    assert flux["clip_l"]["size"] - real_sizes["flux-dev"]["clip_l"] == pytest.approx(768 * 768 * 2, abs=200)
    assert fp8["diffusion_model"]["size"] == pytest.approx(11.9e9, rel=0.01)
    _assert_clean("flux-dev", "diffusion_model", fp8["diffusion_model"])
    # SDXL's CLIP-G is in open_clip names, as in sd_xl_base_1.0.safetensors
    names = _module_names(comfyui_dir)
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in names
    assert {"conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.positional_embedding",
            "conditioner.embedders.1.model.token_embedding.weight",
            "conditioner.embedders.1.model.ln_final.weight"} <= names


def _module_names(comfyui_dir: Path) -> set[str]:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import full_models as f; "
            "print(json.dumps([t.name for t in f.model_files('sdxl', 'full')[0].tensors]))")
    result = subprocess.run([sys.executable, "-c", code, str(BUILDER.parent)], capture_output=True,
                            env=_env(comfyui_dir), timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return set(json.loads(result.stdout))


@pytest.mark.comfyui
def test_small_scale_keeps_the_key_structure_and_detection(comfyui_dir):
    described = _describe(comfyui_dir, "--scale", "small")
    for model, files in described.items():
        for role, entry in files.items():
            _assert_clean(model, role, entry)
    assert described["sd15"]["checkpoint"]["size"] < 0.8e9
    assert described["sdxl"]["checkpoint"]["size"] < 2.2e9  # 1.64 GB of it the two whole text encoders
    assert described["flux-dev"]["diffusion_model"]["size"] < 1.2e9
    assert described["flux-dev"]["t5"]["params"]["t5"] == pytest.approx(4.762e9, rel=0.01)  # fixed at 24 layers


def test_streaming_writer_makes_files_safetensors_reads(tmp_path):
    require(importlib.util.find_spec("torch") is not None, "torch is not importable")
    import torch
    from safetensors import safe_open

    fm = _module()
    T = fm.TensorSpec
    tensors = fm._ordered([T("a.weight", (64, 33), "F8_E4M3", "normal"), T("a.bias", (3,), "F16", "zeros"),
                           T("norm.weight", (5,), "BF16", "ones"), T("big", (600, 70000), "F16", "normal"),
                           T("f", (7, 7), "F32", "normal"), T("scalar", (), "F16", "ones")])
    spec = fm.FileSpec("vae", "vae", "x.safetensors", tensors, {"x": sum(t.numel for t in tensors)})
    for kind, source in (("pool", None), ("exact", fm.ExactSource(3, "cpu"))):  # exact: what the GPU path runs
        target = tmp_path / kind / "x.safetensors"
        path, built = fm.write_file(target, spec, seed=3, device="cpu", source=source)
        assert built and path.stat().st_size == spec.size and not list(target.parent.glob("*.partial"))
        (length,) = struct.unpack("<Q", target.read_bytes()[:8])
        assert length % 8 == 0
        with safe_open(str(target), "pt") as handle:
            assert set(handle.keys()) == {t.name for t in tensors}
            for t in tensors:
                value = handle.get_tensor(t.name)
                assert tuple(value.shape) == t.shape and value.dtype == fm._torch_dtype(t.dtype)
                value = value.float()
                assert torch.isfinite(value).all()
                if t.init == "ones":
                    assert (value == 1).all()
                elif t.init == "zeros":
                    assert (value == 0).all()
            big = handle.get_tensor("big").float()  # larger than the CPU pool: read cyclically
            assert big.std().item() == pytest.approx(0.02, rel=0.05) and abs(big.mean().item()) < 1e-3
        assert fm.write_file(target, spec, seed=3)[1] is False  # present with the right size: kept
        target.write_bytes(b"short")
        assert fm.write_file(target, spec, seed=3)[1] is True  # wrong size: rebuilt


# --- (b) small scale, built and rendered by real ComfyUI on CPU ----------------------------------

@pytest.fixture(scope="module")
def small_models(comfyui_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-models")
    _builder(comfyui_dir, str(out), "--scale", "small", timeout=600)
    yield out
    shutil.rmtree(out, ignore_errors=True)  # 9 GB (the T5 alone is 4.9): not left in pytest's kept temp dirs


@pytest.fixture(scope="module")
def bench_env(comfyui_dir, small_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("bench-home")
    shutil.copy(small_models / "models.yaml", home / "models.yaml")
    values = {"IMAGEGEN_HOME": str(home), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir), "IMAGEGEN_KEEP_WARM": "300",
              "IMAGEGEN_RUNTIME": "local"}
    yield values
    run_cli("stop", "--all", env=values)


@pytest.mark.comfyui
def test_models_yaml_is_a_valid_user_registry(small_models, monkeypatch):
    from imagegen.models import modelfile
    from imagegen.models.registry import Registry
    from imagegen.util import paths

    monkeypatch.setenv("IMAGEGEN_HOME", str(small_models))  # so that OUT_DIR/models.yaml is the user file
    assert paths.user_models_yaml() == small_models / "models.yaml"
    registry = Registry.load()
    expected = {"bench-sd15": ("sd15", {"checkpoint": "sd15"}), "bench-sdxl": ("sdxl", {"checkpoint": "sdxl"}),
                "bench-flux-dev": ("flux", {"diffusion_model": "flux", "t5": "t5", "clip_l": "clip_l", "vae": "vae"})}
    for name, (family, roles) in expected.items():
        bundle = registry.get(name)
        assert bundle.family == family and bundle.source == str(small_models / "models.yaml")
        assert set(bundle.files) == set(roles)
        for role, detected in roles.items():
            file = bundle.files[role]
            path = Path(file.local_path)
            assert path.is_file() and path.parent.name == file.folder and file.size == path.stat().st_size
            assert modelfile.detect(modelfile.read_header(path)).family == detected
    assert registry.get("sd15").source != str(small_models / "models.yaml")  # the built-in models are still there


@pytest.mark.comfyui
@pytest.mark.parametrize("model, evidence", [
    ("sd15", ("Requested to load SD1ClipModel", "Requested to load BaseModel")),
    ("sdxl", ("Requested to load SDXLClipModel", "Requested to load SDXL")),
    ("flux-dev", ("model_type FLUX", "Requested to load FluxClipModel_", "Requested to load Flux")),
])
def test_comfyui_detects_and_renders_each_family(bench_env, model, evidence, tmp_path):
    from PIL import Image, ImageStat

    log_path = Path(bench_env["IMAGEGEN_HOME"]) / "state" / "workers" / "local-cpu.log"
    before = log_path.stat().st_size if log_path.exists() else 0
    out = tmp_path / f"{model}.png"
    result = run_cli("generate", "a lighthouse at dusk", "-m", f"bench-{model}", "--size", "64x64", "--steps", "1",
                     "--seed", "5", "-o", str(out), env=bench_env, timeout=600)
    with open(log_path, "rb") as handle:
        handle.seek(before)
        log = handle.read().decode(errors="replace")
    assert result.returncode == 0, result.stderr.decode() + log[-3000:]
    problems = [line for line in log.splitlines() if any(p.lower() in line.lower() for p in KEY_PROBLEMS)]
    assert not problems, problems
    for line in evidence:
        assert line in log, (line, log[-3000:])
    image = Image.open(out).convert("RGB")
    assert image.size == (64, 64)
    stat = ImageStat.Stat(image)
    assert min(stat.stddev) > 2, stat.stddev          # noise, not a flat (NaN-black) image
    assert max(stat.extrema[c][1] for c in range(3)) > 0
