from pathlib import Path

import pytest

from imagegen.models import registry
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError


def test_builtin_registry_has_the_four_bundles():
    reg = Registry.load()
    assert {"sd15", "sdxl", "flux-dev", "flux-schnell"} <= set(reg.bundles)
    flux = reg.get("flux-dev")
    assert set(flux.files) == {"diffusion_model", "t5", "clip_l", "vae"}
    assert flux.files["t5"].folder == "text_encoders" and flux.files["vae"].folder == "vae"
    assert flux.gated and not reg.get("flux-schnell").gated
    assert reg.get("sd15").files["checkpoint"].folder == "checkpoints"
    for bundle in reg.bundles.values():
        for file in bundle.files.values():
            assert file.repo and file.revision and file.size and file.filename.endswith(".safetensors")
    assert reg.get("flux-schnell").default("steps") == 4 and reg.get("flux-dev").default("guidance") == 3.5


def test_user_yaml_adds_a_weight_only_flux_finetune_that_reuses_shared_encoders(isolated_home):
    isolated_home.mkdir(parents=True)
    (isolated_home / "models.yaml").write_text(
        "models:\n"
        "  my-flux:\n"
        "    family: flux\n"
        "    files:\n"
        "      diffusion_model: {repo: me/my-flux, file: my-flux.safetensors, revision: abc123}\n"
        "  sd15:\n"
        "    family: sd15\n"
        "    files:\n"
        "      checkpoint: {local: /models/mine.safetensors}\n"
        "    defaults: {steps: 12}\n")
    reg = Registry.load()
    mine = reg.get("my-flux")
    assert mine.files["diffusion_model"].folder == "diffusion_models"
    assert mine.files["t5"] == reg.shared["t5xxl-fp8"] and mine.files["clip_l"] == reg.shared["clip-l"]
    assert mine.files["vae"] == reg.shared["flux-ae"]
    overridden = reg.get("sd15")
    assert overridden.files["checkpoint"].local_path == "/models/mine.safetensors"
    assert overridden.default("steps") == 12 and overridden.default("width") == 512


@pytest.mark.parametrize("text, line, fragment", [
    ("models:\n  x:\n    family: sd3\n    files: {}\n", 3, "family 'sd3'"),
    ("models:\n  x:\n    family: sd15\n    files:\n      checkpoint: {repo: a/b, file: model.ckpt}\n", 5,
     "only .safetensors"),
    ("models:\n  x:\n    family: flux\n    files:\n      t5: nope\n", 5, "no shared file 'nope'"),
    ("models:\n  x: [1, 2\n", 3, "not valid YAML"),
    ("models:\n  x:\n    family: sd15\n    files:\n      checkpoint: {repo: a/b, file: m.safetensors, size: -3}\n", 5,
     "size must be"),
    ("models:\n  x:\n    family: sd15\n    files:\n      checkpoint: {repo: a/b, file: m.safetensors}\n"
     "    defaults: {steps: many}\n", 6, "expected int"),
    ("modles:\n  x: {}\n", 1, "unknown top-level key"),
])
def test_malformed_user_yaml_names_file_line_and_problem(isolated_home, text, line, fragment):
    isolated_home.mkdir(parents=True)
    path = isolated_home / "models.yaml"
    path.write_text(text)
    with pytest.raises(ImagegenError) as caught:
        Registry.load()
    assert caught.value.code == "invalid_models_yaml"
    assert f"{path}:{line}:" in caught.value.message
    assert fragment in caught.value.message


def test_unknown_model_suggests_close_names():
    with pytest.raises(ImagegenError) as caught:
        Registry.load().get("flux-schnel")
    assert caught.value.code == "unknown_model" and "flux-schnell" in caught.value.message


def test_models_add_and_rm_round_trip(isolated_home, tmp_path):
    file = tmp_path / "mine.safetensors"
    file.write_bytes(b"")
    target = registry.add_user_model("mine", file, "sd15")
    assert target == isolated_home / "models.yaml"
    bundle = Registry.load().get("mine")
    assert bundle.files["checkpoint"].local_path == str(file.resolve())
    assert bundle.files["checkpoint"].filename == "imagegen-local/mine.safetensors"
    assert registry.remove_user_model("mine") and "mine" not in Registry.load().bundles
    assert not registry.remove_user_model("mine")


def test_local_bundle_rejects_flux_as_a_checkpoint(tmp_path):
    file = tmp_path / "f.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ImagegenError) as caught:
        registry.local_bundle(Path(file), "flux")
    assert caught.value.code == "invalid_model_file"


def _sd15_file(path: Path) -> Path:
    from safetensors_util import write_safetensors

    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    return write_safetensors(path, {key: ("F16", [4, 768])})


def _cli_error(result) -> dict:
    import json

    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stderr.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["", "../evil", "a\nb", "-rf", ".hidden", "a/b", "a..b", "x" * 65, "naïve", "a b"])
def test_models_add_refuses_unusable_names(tmp_path, name):
    from conftest import run_cli

    file = _sd15_file(tmp_path / "m.safetensors")
    error = _cli_error(run_cli("models", "add", "--file", str(file), "--json", "--", name, timeout=120))
    assert error["code"] == "invalid_argument" and "model name" in error["message"] and error["hint"]
    assert not (tmp_path / "imagegen-home" / "models.yaml").exists()


def test_models_add_does_not_replace_or_shadow_without_force(tmp_path):
    from conftest import run_cli

    first, second = _sd15_file(tmp_path / "a.safetensors"), _sd15_file(tmp_path / "b.safetensors")
    assert run_cli("models", "add", "mine", "--file", str(first), timeout=120).returncode == 0
    error = _cli_error(run_cli("models", "add", "mine", "--file", str(second), "--json", timeout=120))
    assert error["code"] == "model_exists" and "--force" in error["hint"]
    assert Registry.load().get("mine").files["checkpoint"].local_path == str(first.resolve())
    assert run_cli("models", "add", "mine", "--file", str(second), "--force", timeout=120).returncode == 0
    assert Registry.load().get("mine").files["checkpoint"].local_path == str(second.resolve())

    shadow = run_cli("models", "add", "sd15", "--file", str(first), timeout=120)
    assert shadow.returncode == 2 and b"built-in" in shadow.stderr and b"hint:" in shadow.stderr
    builtin = Registry.load().get("sd15")
    assert builtin.source.endswith("models.yaml") and builtin.files["checkpoint"].repo
    assert run_cli("models", "add", "sd15", "--file", str(first), "--force", timeout=120).returncode == 0
    assert Registry.load().get("sd15").files["checkpoint"].local_path == str(first.resolve())


def test_concurrent_models_add_processes_lose_no_entry(tmp_path):
    """Two real `imagegen models add` processes at a time, many rounds: every entry survives."""
    import subprocess
    import sys

    from conftest import REPO

    file = _sd15_file(tmp_path / "m.safetensors")
    names = []
    for round_ in range(6):
        pair = [f"r{round_}-{side}" for side in "ab"]
        procs = [subprocess.Popen([sys.executable, str(REPO / "generate_image.py"), "models", "add", name,
                                   "--file", str(file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for name in pair]
        for proc in procs:
            _out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        names += pair
    assert set(names) <= set(Registry.load().bundles)


def test_concurrent_read_modify_write_loops_lose_no_entry(tmp_path):
    """Two processes each add 40 models as fast as they can: without the lock, entries vanish."""
    import subprocess
    import sys

    file = _sd15_file(tmp_path / "m.safetensors")
    code = ("import sys; from pathlib import Path; from imagegen.models.registry import add_user_model\n"
            "for i in range(40): add_user_model(f'{sys.argv[1]}-{i}', Path(sys.argv[2]), 'sd15')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, side, str(file)], stderr=subprocess.PIPE) for side in "ab"]
    for proc in procs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    registered = set(Registry.load().bundles)
    assert {f"{side}-{i}" for side in "ab" for i in range(40)} <= registered
    assert not list((tmp_path / "imagegen-home").glob("*.partial"))
