"""Real --json output held to the schemas `imagegen schema` prints."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from jsonschema import Draft202012Validator

from imagegen.engine.schema import ERROR, MODEL, RESULT, SCHEMAS, WORKER


def check(schema: dict, record: dict) -> None:
    errors = sorted(Draft202012Validator(schema).iter_errors(record), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path)) or '(record)'}: {e.message}" for e in errors)


def lines(stream: bytes) -> list[dict]:
    return [json.loads(line) for line in stream.decode().splitlines()]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schemas_are_valid_json_schema(name):
    Draft202012Validator.check_schema(SCHEMAS[name])
    assert SCHEMAS[name]["$id"] == name
    assert SCHEMAS[name]["properties"]["schema"]["const"] == name


def test_schema_command_prints_every_schema():
    result = run_cli("schema", "--json")
    assert result.returncode == 0, result.stderr.decode()
    assert {item["$id"]: item for item in lines(result.stdout)} == SCHEMAS
    one = run_cli("schema", "result", "--json")
    assert lines(one.stdout) == [RESULT]
    unknown = run_cli("schema", "nope", "--json")
    assert unknown.returncode == 2 and lines(unknown.stderr)[-1]["code"] == "invalid_argument"


@pytest.mark.parametrize("args, code", [
    (["generate", "x", "-m", "sd15", "--size", "65x64"], "invalid_size"),
    (["generate", "x", "-m", "no-such-model"], "unknown_model"),
    (["models", "inspect", "/nonexistent.safetensors"], "invalid_model_file"),
])
def test_error_json(args, code):
    result = run_cli(*args, "--json")
    error = lines(result.stderr)[-1]
    check(ERROR, error)
    assert error["code"] == code and result.returncode == error["exit_code"] == 2
    assert result.stdout == b""


def test_models_list_records():
    result = run_cli("models", "list", "--json")
    assert result.returncode == 0, result.stderr.decode()
    records = lines(result.stdout)
    assert {"sd15", "sdxl", "flux-dev"} <= {r["name"] for r in records}
    for record in records:
        check(MODEL, record)


@pytest.mark.comfyui
def test_generate_result_and_worker_records(comfy_worker, session_home, tiny_sd15, tmp_path):
    env = {"IMAGEGEN_HOME": str(session_home), "IMAGEGEN_RUNTIME": "local"}
    result = run_cli("generate", "a schema check", "--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "1",
                     "--seed", "3", "--json", "-o", str(tmp_path) + "/", env=env)
    assert result.returncode == 0, result.stderr.decode()
    (record,) = lines(result.stdout)
    check(RESULT, record)
    added = run_cli("models", "add", "schema-tiny", "--file", str(tiny_sd15),
                    env={"IMAGEGEN_HOME": str(tmp_path / "home")})
    assert added.returncode == 0, added.stderr.decode()
    local = [r for r in lines(run_cli("models", "list", "--json", env={"IMAGEGEN_HOME": str(tmp_path / "home")}).stdout)
             if r["name"] == "schema-tiny"]
    check(MODEL, local[0])
    assert local[0]["files"]["checkpoint"]["local"] == str(tiny_sd15.resolve())
    workers = run_cli("workers", "--json", env=env)
    assert workers.returncode == 0, workers.stderr.decode()
    records = lines(workers.stdout)
    assert records
    for record in records:
        check(WORKER, record)
