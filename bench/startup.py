#!/usr/bin/env python3
"""Start-up time of the CLI next to a bare interpreter, as a markdown table (wall and CPU seconds).

    python bench/startup.py [--runs 10] [--before OLD/generate_image.py [--before-pythonpath DIR]]

Each command runs N times, round-robin so drift hits them all alike, in a fresh IMAGEGEN_HOME.
The ratio is the command's median over `python -c pass`'s. `--before` adds the same commands run
through another checkout (e.g. a `git worktree` of an older commit, with PYTHONPATH naming the
typer it used), so a before/after comparison is measured side by side in one run. CPU seconds
(user + system of the child) move less than wall seconds on a busy machine.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = str(Path(__file__).resolve().parent.parent / "generate_image.py")
YARDSTICKS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import requests, websocket'": [sys.executable, "-c", "import requests, websocket"],
}
CLI_COMMANDS = {
    "imagegen --help": ["--help"],
    "imagegen generate --help": ["generate", "--help"],
    "imagegen models list": ["models", "list"],
    "imagegen generate x --size 65x64 -m sd15 (exit 2)": ["generate", "x", "--size", "65x64", "-m", "sd15"],
    "imagegen generate x --steps abc --json (usage error)": ["generate", "x", "--steps", "abc", "--json"],
}


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """Wall and CPU seconds of one run of `command`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="repetitions of each command (default 10)")
    parser.add_argument("--before", help="another checkout's generate_image.py, measured beside this one")
    parser.add_argument("--before-pythonpath", default="", help="PYTHONPATH for --before (e.g. an older typer)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "IMAGEGEN_HOME": home}
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: the warm-up run writes the .pyc files
        commands = {name: (command, env) for name, command in YARDSTICKS.items()}
        for name, cli_args in CLI_COMMANDS.items():
            if args.before:
                before_env = {**env, "PYTHONPATH": args.before_pythonpath} if args.before_pythonpath else env
                commands[f"before: {name}"] = ([sys.executable, args.before, *cli_args], before_env)
            commands[name] = ([sys.executable, CLI, *cli_args], env)
        for command, command_env in commands.values():  # warm the OS file cache and .pyc files once
            timed(command, command_env)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, (command, command_env) in commands.items():
                samples[name].append(timed(command, command_env))
    base = statistics.median(wall for wall, _ in samples["python -c pass"])
    load = os.getloadavg()[0]
    print(f"{args.runs} runs each, {sys.executable} ({sys.version.split()[0]}), load average {load:.2f} at the end\n")
    print("| command | median wall (s) | min wall (s) | median CPU (s) | × python |")
    print("|---|---:|---:|---:|---:|")
    for name, values in samples.items():
        walls, cpus = [w for w, _ in values], [c for _, c in values]
        median = statistics.median(walls)
        print(f"| `{name}` | {median:.3f} | {min(walls):.3f} | {statistics.median(cpus):.3f} | {median / base:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
