"""The layering contracts (pyproject.toml [tool.importlinter]) and scripts/lint, checked with the real tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _copy_tree(tmp_path: Path) -> Path:
    """A copy of the package and its pyproject.toml, to break on purpose."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "imagegen", root / "imagegen", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + "\n" + line + "\n")


def test_the_real_tree_keeps_every_contract():
    proc = _lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout
    assert "4 kept" in proc.stdout


def test_the_worker_importing_the_models_code_breaks_the_contract(tmp_path):
    root = _copy_tree(tmp_path)
    _append(root / "imagegen/worker/comfy_launch.py", "from imagegen.models import registry  # noqa")
    proc = _lint_imports(root)
    assert proc.returncode == 1, proc.stdout
    assert "The worker imports only imagegen.util BROKEN" in proc.stdout
    assert "imagegen.worker.comfy_launch -> imagegen.models.registry" in proc.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_layers(tmp_path):
    root = _copy_tree(tmp_path)
    _append(root / "imagegen/models/modelfile.py", "from imagegen.engine import timings  # noqa")
    proc = _lint_imports(root)
    assert proc.returncode == 1, proc.stdout
    assert "Layers: cli > mcp > funnel > engine > runtimes > comfy > models > util BROKEN" in proc.stdout
    assert "imagegen.models.modelfile -> imagegen.engine.timings" in proc.stdout


def test_the_engine_importing_the_worker_breaks_the_contract(tmp_path):
    root = _copy_tree(tmp_path)
    _append(root / "imagegen/engine/timings.py", "from imagegen.worker import comfy_launch  # noqa")
    proc = _lint_imports(root)
    assert proc.returncode == 1, proc.stdout
    assert "Only the container entrypoint imports the worker BROKEN" in proc.stdout


def test_the_funnel_never_imports_the_mcp_server_above_it(tmp_path):
    root = _copy_tree(tmp_path)  # the MCP server serves the funnel (mcp/funnel_tools.py), never the other way
    _append(root / "imagegen/funnel/contact_sheet.py", "from imagegen.mcp import server  # noqa")
    proc = _lint_imports(root)
    assert proc.returncode == 1, proc.stdout
    assert "imagegen.funnel.contact_sheet -> imagegen.mcp.server" in proc.stdout


def test_an_import_cycle_inside_a_package_breaks_the_contract(tmp_path):
    root = _copy_tree(tmp_path)  # scheduler imports routing; routing importing scheduler closes a loop
    _append(root / "imagegen/engine/routing.py", "def _late():\n    from imagegen.engine import scheduler  # noqa")
    proc = _lint_imports(root)
    assert proc.returncode == 1, proc.stdout
    assert "No import cycles between the modules of any package BROKEN" in proc.stdout
    assert "imagegen.engine" in proc.stdout and ".scheduler -> .routing" in proc.stdout  # where to cut it


def test_a_new_subpackage_must_be_given_a_layer(tmp_path):
    root = _copy_tree(tmp_path)
    (root / "imagegen/plugins").mkdir()
    (root / "imagegen/plugins/__init__.py").write_text('"""Plugins."""\n')
    proc = _lint_imports(root)
    assert proc.returncode != 0, proc.stdout
    assert "imagegen.plugins" in proc.stdout + proc.stderr


def _lint_copy(tmp_path: Path, *checks: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run scripts/lint in a copy of the repository, with this venv's tools."""
    root = _copy_tree(tmp_path)
    (root / "scripts").mkdir()
    shutil.copy(REPO / "scripts/lint", root / "scripts/lint")
    for name, text in (extra or {}).items():
        (root / name).write_text(text)
    env = {**os.environ, "IMAGEGEN_VENV": str(BIN.parent), "PYTHONPATH": str(root)}
    return subprocess.run(["bash", str(root / "scripts/lint"), *checks], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def test_scripts_lint_fails_loudly_on_a_ruff_problem(tmp_path):
    long_line = "X = " + repr("a" * 130) + "\n"
    proc = _lint_copy(tmp_path, "ruff", "imports", extra={"too_long.py": '"""Too long."""\n\n' + long_line})
    assert proc.returncode == 1, proc.stderr
    assert "too_long.py:3:121: E501" in proc.stderr
    assert "[lint] FAILED: ruff" in proc.stderr
    assert "[lint] lint-imports: Contracts: 4 kept, 0 broken." in proc.stderr


def test_scripts_lint_fails_on_a_broken_contract(tmp_path):
    proc = _lint_copy(tmp_path, "imports")
    assert proc.returncode == 0, proc.stderr
    assert "[lint] all checks passed" in proc.stderr
    root = tmp_path / "repo"
    _append(root / "imagegen/util/paths.py", "from imagegen.cli import common  # noqa")
    env = {**os.environ, "IMAGEGEN_VENV": str(BIN.parent), "PYTHONPATH": str(root)}
    proc = subprocess.run(["bash", str(root / "scripts/lint"), "imports"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "Layers: cli > mcp > funnel > engine > runtimes > comfy > models > util BROKEN" in proc.stderr
    assert "0 broken" not in proc.stderr
    assert "[lint] FAILED: imports" in proc.stderr


def test_scripts_test_runs_lint_before_pytest():
    text = (REPO / "scripts/test").read_text()
    assert text.index('"$repo/scripts/lint"') < text.index("-m pytest")
    extras = (REPO / "pyproject.toml").read_text()
    for tool in ("ruff>=", "import-linter>=", "mypy>="):
        assert tool in extras
