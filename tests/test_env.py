"""IMAGEGEN_* numbers (util/env): bad values are invalid_argument when used, never a crash at import."""

import json
import subprocess
import sys

import pytest
from conftest import run_cli

from imagegen.util.env import env_float, env_int
from imagegen.util.errors import ImagegenError


@pytest.mark.parametrize("raw, why", [("abc", "is not a number"), ("nan", "not a finite number"),
                                      ("inf", "not a finite number"), ("-5", "below the minimum")])
def test_env_float_refuses_bad_values_naming_the_variable(monkeypatch, raw, why):
    monkeypatch.setenv("IMAGEGEN_KEEP_WARM", raw)
    with pytest.raises(ImagegenError) as caught:
        env_float("IMAGEGEN_KEEP_WARM", 300.0)
    assert caught.value.code == "invalid_argument" and caught.value.exit_code == 2
    assert f"IMAGEGEN_KEEP_WARM={raw!r}" in caught.value.message and why in caught.value.message
    assert "Unset IMAGEGEN_KEEP_WARM" in caught.value.hint


def test_env_values_in_range_and_unset(monkeypatch):
    monkeypatch.delenv("IMAGEGEN_X", raising=False)
    assert env_float("IMAGEGEN_X", 5.0) == 5.0 and env_int("IMAGEGEN_X", 7) == 7
    monkeypatch.setenv("IMAGEGEN_X", " 2.5 ")
    assert env_float("IMAGEGEN_X", 5.0) == 2.5
    monkeypatch.setenv("IMAGEGEN_X", "")
    assert env_float("IMAGEGEN_X", 5.0) == 5.0
    monkeypatch.setenv("IMAGEGEN_X", "9")
    with pytest.raises(ImagegenError, match="above the maximum"):
        env_int("IMAGEGEN_X", 1, maximum=8)
    monkeypatch.setenv("IMAGEGEN_X", "1.5")
    with pytest.raises(ImagegenError, match="not a whole number"):
        env_int("IMAGEGEN_X", 1)


def test_every_module_imports_with_bad_values():
    """The modules used to read these at import time: float('abc') crashed every command."""
    bad = {name: "abc" for name in ("IMAGEGEN_KEEP_WARM", "IMAGEGEN_START_TIMEOUT", "IMAGEGEN_TIMEOUT_REQUEST",
                                    "IMAGEGEN_BUSY_WAIT", "IMAGEGEN_REMOTE_READY_TIMEOUT", "IMAGEGEN_REMOTE_TIMEOUT",
                                    "IMAGEGEN_PORT")}
    code = ("import importlib, pkgutil, imagegen\n"
            "for m in pkgutil.walk_packages(imagegen.__path__, 'imagegen.'):\n"
            "    importlib.import_module(m.name)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env={**__import__("os").environ, **bad},
                            timeout=300)
    assert result.returncode == 0, result.stderr.decode()


@pytest.mark.parametrize("variable, raw", [("IMAGEGEN_KEEP_WARM", "abc"), ("IMAGEGEN_START_TIMEOUT", "nan"),
                                           ("IMAGEGEN_TIMEOUT_REQUEST", "-3"), ("IMAGEGEN_TIMEOUT_LOAD", "inf"),
                                           ("IMAGEGEN_BUSY_WAIT", "soon")])
def test_bad_env_value_exits_2_through_the_cli(tmp_path, variable, raw):
    result = run_cli("generate", "a cat", "--size", "64x64", "-o", str(tmp_path / "x.png"),
                     env={variable: raw}, timeout=120)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr and variable in stderr and "error:" in stderr.lower() and "hint:" in stderr
    assert not (tmp_path / "x.png").exists()


def test_bad_env_value_is_a_json_error_with_json(tmp_path):
    result = run_cli("generate", "a cat", "--size", "64x64", "-o", str(tmp_path / "x.png"), "--json",
                     env={"IMAGEGEN_START_TIMEOUT": "nan"}, timeout=120)
    assert result.returncode == 2
    error = json.loads(result.stderr.decode().strip().splitlines()[-1])
    assert error["code"] == "invalid_argument" and "IMAGEGEN_START_TIMEOUT" in error["message"] and error["hint"]
