"""Fast checks of the CLI contract, through the real CLI in a subprocess: usage errors, bounded
input, closed pipes, option groups and the version. Nothing here starts a worker."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import typing

import pytest
import typer
from conftest import REPO, run_cli
from typer.testing import CliRunner

from imagegen.cli.common import Mode, Workers, grouped

CLI = [sys.executable, str(REPO / "generate_image.py")]


def json_error(result) -> dict:
    lines = result.stderr.decode().strip().splitlines()
    assert lines, "no error on stderr"
    return json.loads(lines[-1])


def no_worker_started(home) -> bool:
    folder = home / "state" / "workers"
    return not folder.exists() or not any(folder.glob("*.json"))


@pytest.mark.parametrize("args, code", [
    (["generate", "x", "--steps", "abc"], "invalid_argument"),
    (["generate", "x", "--bogus"], "usage_error"),
    (["funnel", "run"], "usage_error"),  # a missing argument
    (["batch", "--workers", "many"], "invalid_argument"),
    (["generate", "x", "extra-argument"], "usage_error"),
    (["models", "inspect"], "usage_error"),
])
def test_usage_errors_keep_the_json_contract(args, code, isolated_home):
    result = run_cli(*args, "--json")
    assert result.returncode == 2, result.stderr.decode()
    error = json_error(result)
    assert error["schema"] == "imagegen.error/1" and error["code"] == code and error["exit_code"] == 2
    assert error["message"] and "--help" in error["hint"]
    assert result.stdout == b""
    assert no_worker_started(isolated_home)


def test_json_anywhere_on_the_line_counts():
    result = run_cli("--json", "generate", "x", "--steps", "abc")
    assert result.returncode == 2 and json_error(result)["code"] in ("usage_error", "invalid_argument")


@pytest.mark.parametrize("args", [["generate", "x", "--steps", "abc"], ["generate", "--bogus"], ["funnel", "run"]])
def test_usage_errors_without_json_are_error_and_hint_lines(args):
    result = run_cli(*args)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2
    assert lines[0].startswith("error: ") and lines[-1].startswith("hint: ") and len(lines) == 2, lines
    assert "--help" in lines[-1]


def test_no_command_shows_the_help():
    result = run_cli()
    assert result.returncode == 2 and "Commands:" in result.stderr.decode() + result.stdout.decode()


def test_generate_help_lists_its_options_by_section_with_no_default_that_applies_without_its_flag():
    text = run_cli("generate", "--help").stdout.decode()
    sections = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert sections == ["Arguments:", "Options:", "What to draw:", "Your image, LoRAs and ControlNets:",
                        "Hires fix (two passes):", "Where it runs:", "Output and messages:"]
    hires = text[text.index("Hires fix (two passes):"):text.index("Where it runs:")]
    assert "[default:" not in hires, "a hires default shown as if it applied without --hires"
    assert run_cli("batch", "--help").stdout.decode().count("What to draw:") == 1


@pytest.mark.parametrize("args", [
    ["--keep-warm", "-5"], ["--keep-warm", "nan"], ["--keep-warm", "inf"], ["--keep-warm", "1e12"],
    ["--cfg", "nan"], ["--cfg", "-1"], ["--guidance", "inf"], ["--timeout", "nan"], ["--timeout", "0"],
])
def test_numbers_that_would_never_end_are_refused(args, isolated_home):
    result = run_cli("generate", "a fox", "--size", "64x64", *args, "--json")
    assert result.returncode == 2, result.stderr.decode()
    error = json_error(result)
    assert error["code"] == "invalid_argument" and args[0] in error["message"], error
    assert no_worker_started(isolated_home)


@pytest.mark.parametrize("command", [["batch", "-"], ["funnel", "run", "x"], ["mcp"]])
def test_keep_warm_is_checked_by_every_command(command):
    result = run_cli(*command, "--keep-warm", "nan", input=b"a fox\n")
    assert result.returncode == 2 and result.stderr.decode().startswith("error: Invalid value for '--keep-warm'")


def test_keep_warm_takes_0_up_to_a_week_and_its_help_says_what_0_means():
    from imagegen.cli.common import MAX_KEEP_WARM, KeepWarmOpt

    check = typing.get_args(KeepWarmOpt)[1].callback
    assert check(0.0) == 0.0 and check(MAX_KEEP_WARM) == MAX_KEEP_WARM == 7 * 24 * 3600
    for bad in (-0.5, MAX_KEEP_WARM + 1, math.inf, math.nan):
        with pytest.raises(typer.BadParameter):
            check(bad)
    text = " ".join(run_cli("generate", "--help", env={"COLUMNS": "2000"}).stdout.decode().split())
    assert "0: the workers this command starts are stopped when it ends (those it reuses are left)" in text
    assert "up to 604800 (a week" in text


def test_a_worker_refuses_an_idle_limit_of_0_and_takes_inf_for_never():
    from imagegen import entry

    assert entry._parser().parse_args(["serve", "--keep-warm", "inf"]).keep_warm == math.inf
    with pytest.raises(SystemExit):
        entry._parser().parse_args(["serve", "--keep-warm", "0"])


def test_keep_warm_from_the_environment_is_checked_too():
    result = run_cli("generate", "a fox", "--json", env={"IMAGEGEN_KEEP_WARM": "nan"})
    assert result.returncode == 2 and "IMAGEGEN_KEEP_WARM" in json_error(result)["message"]


def test_an_endless_stdin_prompt_is_refused_without_reading_it_all(tmp_path):
    with open("/dev/zero", "rb") as endless:
        result = subprocess.run([*CLI, "generate", "--json"], stdin=endless, capture_output=True, timeout=120,
                                env={**os.environ})
    assert result.returncode == 2
    assert json_error(result)["code"] == "invalid_prompt"


def test_stdin_prompt_limits(tmp_path):
    from imagegen.engine.generate import MAX_PROMPT_CHARS

    too_long = run_cli("generate", "--json", input=b"a" * (MAX_PROMPT_CHARS * 4 + 10))
    assert too_long.returncode == 2 and json_error(too_long)["code"] == "invalid_prompt"
    not_text = run_cli("generate", "--json", input=b"\xff\xfe a fox")
    assert not_text.returncode == 2 and "UTF-8" in json_error(not_text)["message"]
    fine = run_cli("generate", "--size", "65x64", "--json", input="a red fox, ünïcode\n".encode())
    assert json_error(fine)["code"] == "invalid_size", "a good prompt on stdin passes on to the next check"


def closed_pipe_run(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI with stdout a pipe whose reader is gone before the CLI starts: every write fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([*CLI, *args], stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)


def test_a_closed_stdout_exits_141_quietly():
    result = closed_pipe_run("schema")
    assert result.returncode == 141, result.stderr.decode()
    assert result.stderr == b"", "no traceback, no 'Exception ignored' at exit"


def test_a_closed_stdout_with_json_says_why_on_stderr():
    result = closed_pipe_run("schema", "--json")
    assert result.returncode == 141
    error = json.loads(result.stderr.decode().strip())
    assert error["code"] == "output_closed" and error["exit_code"] == 141
    assert "Exception ignored" not in result.stderr.decode()


def help_lines(*command: str) -> dict[str, str]:
    """Each option's help entry (its first line and continuation lines joined)."""
    text = run_cli(*command, "--help", env={"COLUMNS": "200"}).stdout.decode()
    entries, current = {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):  # an option's first line (a wrapped line is indented further)
            current = stripped.split()[0].rstrip(",")
            entries[current] = stripped
        elif not line.startswith(" "):  # a section's title ends the entry above it
            current = None
        elif current and stripped:
            entries[current] += " " + stripped
    return entries


def test_shared_options_read_the_same_in_every_command():
    generate, batch, funnel = help_lines("generate"), help_lines("batch"), help_lines("funnel", "run")
    for option in ("--runtime", "--keep-warm", "--fast", "--force", "--json", "-q", "--progress", "--debug"):
        assert generate[option] == batch[option] == funnel[option], option
    for option in ("-m", "--checkpoint", "--size", "--steps", "--cfg", "--negative", "-n"):
        assert generate[option] == batch[option], option
    for option in ("--gpus", "--workers", "--timeout"):
        assert batch[option] == funnel[option], option


def test_option_groups_arrive_as_dataclasses():
    app = typer.Typer()
    seen = {}

    @app.command()
    @grouped
    def probe(name: str, *, workers: Workers, mode: Mode) -> None:
        seen.update(name=name, workers=workers, mode=mode)

    result = CliRunner().invoke(app, ["fox", "--runtime", "local", "--keep-warm", "5", "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert seen["name"] == "fox"
    assert seen["workers"] == Workers(runtime="local", keep_warm=5.0, fast=False, force=False)
    assert seen["mode"] == Mode(json_mode=True, quiet=True, progress=None, debug=False)


def test_version_has_one_source():
    import imagegen

    result = run_cli("version", "--json")
    record = json.loads(result.stdout)
    assert record["imagegen"] == imagegen.__version__ and record["comfyui_commit"] == imagegen.COMFYUI_COMMIT


def test_the_version_and_the_comfyui_commit_are_written_down_once():
    import imagegen

    skip_version = {".git", ".cache", ".docker-context", "tests"}

    assert imagegen.__version__ == (REPO / "VERSION").read_text().strip(), "VERSION is the version's one source"
    for path in REPO.rglob("*.py"):
        if not skip_version & set(path.relative_to(REPO).parts):
            assert "__version__ = \"" not in path.read_text(encoding="utf-8"), f"{path} writes a version down"
    skip = {".git", ".cache", ".docker-context", "docs", "__pycache__", ".pytest_cache", ".venv"}
    holders = []
    for path in REPO.rglob("*"):
        if skip & set(path.relative_to(REPO).parts) or not path.is_file() or path.stat().st_size > 1_000_000:
            continue
        try:
            if imagegen.COMFYUI_COMMIT in path.read_text(encoding="utf-8"):
                holders.append(str(path.relative_to(REPO)))
        except (UnicodeDecodeError, OSError):
            continue
    assert holders == ["imagegen/__init__.py"], holders
    script = (REPO / "build-image.sh").read_text()
    assert "imagegen/__init__.py" in script and "COMFYUI_COMMIT=$comfy_commit" in script


COMMANDS = ["generate", "batch", "workers", "stop", "mcp", "schema", "doctor", "version", "models", "models list",
            "funnel", "funnel run"]


@pytest.mark.parametrize("command", COMMANDS)
def test_the_light_path_of_one_command_reads_as_the_whole_tree(command):
    """`imagegen generate ...` builds only that command; its help is what the whole tree shows."""
    from imagegen.cli.main import app

    light = run_cli(*command.split(), "--help", env={"COLUMNS": "80"})
    whole = CliRunner().invoke(app, [*command.split(), "--help"], prog_name="imagegen", terminal_width=78)
    assert light.returncode == 0 and whole.exit_code == 0, whole.output
    assert light.stdout.decode() == whole.output


def test_stop_takes_names_or_all():
    both = run_cli("stop", "local-cpu", "--all", "--json")
    assert both.returncode == 2 and json_error(both)["code"] == "usage_error"
    unknown = run_cli("stop", "no-such-worker", "--json")
    assert unknown.returncode == 2 and json_error(unknown)["code"] == "invalid_argument"
    assert "no-such-worker" in json_error(unknown)["message"]
    everything = run_cli("stop", "--all", "--json")
    assert everything.returncode == 0 and json.loads(everything.stdout)["stopped"] == []


def test_a_varied_image_is_judged_not_blank_without_importing_pillow(tmp_path):
    """The blank-image warning must not cost every one-shot call Pillow's import."""
    import io
    import random

    from PIL import Image

    from imagegen.engine import render

    noise = Image.frombytes("RGB", (64, 64), random.Random(1).randbytes(64 * 64 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    (tmp_path / "noise.png").write_bytes(buffer.getvalue())
    code = ("import sys; from pathlib import Path; from imagegen.engine.render import looks_blank; "
            f"print(looks_blank(Path({str(tmp_path / 'noise.png')!r}).read_bytes()), 'PIL' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO, timeout=120)
    assert result.stdout.decode().split() == ["False", "False"], result.stderr.decode()
    black = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 0)).save(black, "PNG")
    assert render.looks_blank(black.getvalue()), "a flat black image still warns"


def test_an_output_closed_error_from_the_engine_exits_141_too(monkeypatch):
    """The engine turns a BrokenPipeError in a worker thread into output_closed: still exit 141."""
    from imagegen.cli.common import run_guarded
    from imagegen.engine.render import as_error
    from imagegen.util.errors import ImagegenError

    assert as_error(BrokenPipeError(32, "Broken pipe")).code == "output_closed"
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", stream)

    def body():
        raise ImagegenError("output_closed", "stdout was closed before all output was written")

    with pytest.raises(typer.Exit) as exit_:
        run_guarded(False, False, body)
    assert exit_.value.exit_code == 141
    stream.close()


def test_help_to_a_reader_that_left_exits_141_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:  # `imagegen models 2>&1 | head -0`: the help goes to stderr, and its reader is gone
        result = subprocess.run([*CLI, "models"], stdout=write_end, stderr=write_end, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 141


def _commands(command, path=()):
    """Every command of the CLI (click objects), with its path, subcommands included."""
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))
    if not hasattr(command, "commands"):
        yield " ".join(path), command


def test_every_commands_output_option_is_the_one_declaration():
    import inspect

    from imagegen.cli import common
    from imagegen.cli.main import app

    with_output = {}
    for path, command in _commands(typer.main.get_command(app)):
        for param in command.params:
            if "-o" in param.opts or "--output" in param.opts:
                with_output[path] = param
    assert {"generate", "batch", "upscale", "run", "funnel run"} <= set(with_output), sorted(with_output)
    for path, param in with_output.items():
        assert sorted(param.opts) == ["--output", "-o"] and not param.secondary_opts, (path, param.opts)
        assert not param.is_flag and param.nargs == 1 and param.help, path
    sources = [p for p in (REPO / "imagegen" / "cli").glob("*.py")]
    declared = {p.name: p.read_text().count('"-o"') for p in sources}
    assert {name: n for name, n in declared.items() if n} == {"common.py": 1}, declared
    assert '"-o"' in inspect.getsource(common.output_option)
