#!/usr/bin/env python3
"""Start-up time of the CLI next to a bare `python -c pass`, as a markdown table.

    python bench/startup.py [--runs 10]

Each command runs N times, round-robin so drift hits them all alike, in a fresh IMAGEGEN_HOME.
The ratio is the command's median over the bare interpreter's median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = str(Path(__file__).resolve().parent.parent / "generate_image.py")
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "imagegen --help": [sys.executable, CLI, "--help"],
    "imagegen models list": [sys.executable, CLI, "models", "list"],
    "imagegen generate x --size 65x64 -m sd15 (exit 2)": [sys.executable, CLI, "generate", "x", "--size", "65x64", "-m", "sd15"],
}


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="repetitions of each command (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "IMAGEGEN_HOME": home}
        for command in COMMANDS.values():  # warm the OS file cache and .pyc files once
            timed(command, env)
        samples = {name: [] for name in COMMANDS}
        for _ in range(args.runs):
            for name, command in COMMANDS.items():
                samples[name].append(timed(command, env))
    base = statistics.median(samples["python -c pass"])
    print(f"{args.runs} runs each, {sys.executable} ({sys.version.split()[0]})\n")
    print("| command | median (s) | min (s) | max (s) | × python |")
    print("|---|---:|---:|---:|---:|")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.3f} | {min(values):.3f} | {max(values):.3f} | {median / base:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
