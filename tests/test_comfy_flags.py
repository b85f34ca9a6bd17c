"""Launch flags only where the worker's ComfyUI defines them, against the real pinned ComfyUI and a
"newer ComfyUI": a copy of the real source whose cli_args.py, version and sampler list are edited
the way later releases changed them (--disable-api-nodes gone for --offline/--disable-partner-nodes,
an assets database to switch off, 0.33.0, a new sampler exp_heun_2_x0)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli

from imagegen.comfy import png
from imagegen.worker import comfy_flags

NEW_SAMPLER = "exp_heun_2_x0"
OLD_FLAG = ('parser.add_argument("--disable-api-nodes", action="store_true", '
            'help="Disable loading all api nodes. Also prevents the frontend from communicating with the internet.")')
NEW_FLAGS = '\n'.join([
    'parser.add_argument("--disable-partner-nodes", dest="disable_api_nodes", action="store_true", help="No API.")',
    'parser.add_argument("--offline", action="store_true", help="No network access at all.")',
    'parser.add_argument("--disable-assets", action="store_true", help="No assets database.")',
])


def newer_comfyui(real: Path, target: Path) -> Path:
    """The real tree as symlinks (folders real), with three files edited copies."""
    for folder, dirs, files in os.walk(real):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", ".git")]
        here = target / Path(folder).relative_to(real)
        here.mkdir(parents=True, exist_ok=True)
        for name in files:
            (here / name).symlink_to(Path(folder) / name)
    edits = {
        "comfy/cli_args.py": [(OLD_FLAG, NEW_FLAGS)],
        "comfyui_version.py": [('__version__ = "0.3.75"', '__version__ = "0.33.0"')],
        "comfy/samplers.py": [('SAMPLER_NAMES = KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]',
                               f'KSAMPLER_NAMES.append("{NEW_SAMPLER}")\n'
                               'SAMPLER_NAMES = KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]')],
        "comfy/k_diffusion/sampling.py": [("\ndef sample_heun(", f"\ndef sample_{NEW_SAMPLER}(*args, **kwargs):\n"
                                          "    return sample_heun(*args, **kwargs)\n\n\ndef sample_heun(")],
    }
    for name, replacements in edits.items():
        text = (real / name).read_text()
        for old, new in replacements:
            assert text.count(old) == 1, (name, old)
            text = text.replace(old, new)
        (target / name).unlink()
        (target / name).write_text(text)
    return target


def test_the_pinned_comfyui_gets_the_flags_it_always_got(comfyui_dir):
    assert {"--disable-api-nodes", "--database-url", "--listen", "--cpu"} <= comfy_flags.defined_flags(comfyui_dir)
    assert comfy_flags.optional_flags(comfyui_dir) == ["--disable-api-nodes", "--database-url", "sqlite:///:memory:"]


def test_a_newer_comfyui_gets_its_new_flags_and_not_the_deprecated_one(comfyui_dir, tmp_path):
    newer = newer_comfyui(comfyui_dir, tmp_path / "newer")
    assert comfy_flags.optional_flags(newer) == ["--offline", "--disable-partner-nodes", "--disable-assets",
                                                 "--database-url", "sqlite:///:memory:"]


def test_an_unreadable_cli_args_falls_back_to_the_pinned_flags(tmp_path):
    assert comfy_flags.optional_flags(tmp_path) == ["--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy/cli_args.py").write_text('parser.add_argument("--listen")\n')
    assert comfy_flags.optional_flags(tmp_path) == []  # a ComfyUI without any of them gets none


def comfyui_command_line(comfyui: Path) -> list[str]:
    """The command line of the running ComfyUI started from this tree's main.py."""
    main_py = str(comfyui / "main.py")
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if main_py in argv:
            return argv
    raise AssertionError(f"no process runs {main_py}")


@pytest.mark.comfyui
def test_a_worker_on_a_newer_comfyui_starts_and_renders_its_new_sampler(comfyui_dir, tiny_sd15, tmp_path,
                                                                        monkeypatch):
    from imagegen.runtimes.local import LocalRuntime

    newer = newer_comfyui(comfyui_dir, tmp_path / "newer")
    monkeypatch.setenv("IMAGEGEN_COMFYUI_DIR", str(newer))
    env = {"IMAGEGEN_HOME": os.environ["IMAGEGEN_HOME"], "IMAGEGEN_COMFYUI_DIR": str(newer),
           "IMAGEGEN_KEEP_WARM": "120", "IMAGEGEN_RUNTIME": "local"}
    try:
        result = run_cli("generate", "a lighthouse", "--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "2",
                         "--sampler", NEW_SAMPLER, "--seed", "3", "--json", "-o", str(tmp_path / "new.png"), env=env)
        assert result.returncode == 0, result.stderr.decode()[-3000:]
        [record] = [json.loads(line) for line in result.stdout.decode().splitlines()]
        assert record["sampler"] == NEW_SAMPLER and record["comfyui_version"] == "0.33.0"
        embedded = json.loads(png.read_text_chunks((tmp_path / "new.png").read_bytes())["imagegen"])
        assert embedded["comfyui_version"] == "0.33.0" and embedded["sampler"] == NEW_SAMPLER

        info = LocalRuntime(keep_warm=120).ensure("cpu").client().worker_info()  # the worker found again
        assert info["comfyui_version"] == "0.33.0"  # /imagegen/info says what ComfyUI said, not the pin
        argv = comfyui_command_line(newer)  # the flags this ComfyUI has, never the one it lacks
        assert {"--offline", "--disable-partner-nodes", "--disable-assets"} <= set(argv), argv
        assert "--disable-api-nodes" not in argv

        lacking = run_cli("generate", "a lighthouse", "--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "1",
                          "--sampler", "exp_heun_3_x9", "--json", "-o", str(tmp_path / "no.png"), env=env)
        assert lacking.returncode != 0
        error = json.loads(lacking.stderr.decode().strip().splitlines()[-1])
        assert error["code"] == "invalid_argument", error
        assert "not a sampler of the worker's ComfyUI 0.33.0" in error["message"] and NEW_SAMPLER in error["hint"]
        assert not (tmp_path / "no.png").exists()
    finally:
        run_cli("stop", env=env)
