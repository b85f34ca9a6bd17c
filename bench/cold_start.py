#!/usr/bin/env python3
"""Cold start in phases: `imagegen generate` with no worker running against a ComfyUI started by hand.

    IMAGEGEN_COMFYUI_DIR=... ~/.cache/imagegen-dev/venv/bin/python bench/cold_start.py [--runs 3] [--write]

a. `imagegen generate -m NAME --runtime local --json` from nothing (no worker): the CLI starts a
   worker (`python -m imagegen.entry serve`), which starts ComfyUI, waits for /system_stats, then the
   CLI submits the job and writes the PNG. Phase boundaries: the CLI's spawn; the worker's and
   ComfyUI's process start times (/proc/PID/stat); the worker's ready record (written once ComfyUI
   answered /system_stats); ComfyUI's history timestamps (execution_start, execution_success); the
   client's own phase times (entry["imagegen_phase_times"], in the --json record: loading = execution
   start → first step, sampling = first step → the node after the sampler); the CLI's exit.
b. By hand: `python main.py --cpu --listen 127.0.0.1 --port P` with the worker's own flags, polled on
   /system_stats every 50 ms, then the same graph posted by a minimal client that records the same
   websocket events, fetches the PNG and writes it.

The two take turns (a, b, b, a, ...), each with its own seed, the OS file cache warm for both (one
untimed run of each first; that first imagegen run also hashes the local checkpoint once for
provenance, and its time is reported apart). The tiny random-weight SD1.5 checkpoint is registered
as a user model so the CLI goes through the registry.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

SECTION = "cold-start"
CLI = str(c.REPO / "generate_image.py")
MODEL = "bench-tiny-sd15"
PROMPT = "a lighthouse on a cliff at dusk"
PHASES = [
    ("cli", "CLI process: interpreter, imports, plan, model check, until it spawns the worker"),
    ("worker", "worker process: `imagegen.entry serve` start-up, proxy listening, until it spawns ComfyUI"),
    ("comfy", "ComfyUI process start → /system_stats answers (Python, torch, ComfyUI init)"),
    ("ready_to_start", "ComfyUI ready → job executing (readiness noticed, job submitted, queue pickup)"),
    ("load", "model load + text encode + first step (execution_start → first progress event)"),
    ("sampling", "remaining sampling steps (first progress → the node after the sampler)"),
    ("decode", "VAE decode + save (→ execution_success)"),
    ("back", "result back: notice the end, fetch, tag, write, process exit"),
]


def boot_offset() -> float:
    """time.time() minus CLOCK_BOOTTIME: turns /proc/PID/stat start times into epoch seconds."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def process_start(pid: int, offset: float) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return offset + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def execution_span(history: dict) -> tuple[float, float]:
    stamps = {name: body.get("timestamp") for name, body in history.get("status", {}).get("messages", [])}
    return stamps["execution_start"] / 1000, stamps["execution_success"] / 1000


class ColdBench:
    def __init__(self, args, scratch: Path):
        from imagegen.models.registry import add_user_model
        from imagegen.runtimes.local import LocalRuntime

        self.args, self.scratch = args, scratch
        from imagegen.models import modelfile
        from imagegen.runtimes.base import default_slot

        self.model = args.model or MODEL
        self.checkpoint = Path(args.checkpoint).resolve() if args.checkpoint else c.tiny_checkpoint()
        if not args.model:
            add_user_model(MODEL, self.checkpoint, modelfile.detect(modelfile.read_header(self.checkpoint)).family,
                           force=True)
        self.runtime = LocalRuntime()
        self.seed = 5000
        self.slot = default_slot()
        self.device = "cpu" if self.slot == "cpu" else "cuda"
        self.record_path = self.runtime._files(self.slot)[0]
        # CPU of the workers the CLI started (not our children: the CLI's, re-parented when it exits)
        self.accounted = 0.0

    def hash_seconds(self) -> float:
        """What the one-time sha256 of the checkpoint costs (timed on its own, file cache warm)."""
        from imagegen.models.fetch import sha256_file

        started = time.monotonic()
        sha256_file(self.checkpoint)
        return time.monotonic() - started

    def drop_caches(self) -> None:
        if self.args.drop_caches:
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3\n")

    # --- a: imagegen from nothing ---------------------------------------------------------
    def imagegen(self) -> dict:
        import requests

        self.runtime.stop()  # nothing running: a cold start
        self.seed += 1
        out = self.scratch / f"imagegen-{self.seed}.png"
        self.drop_caches()
        offset = boot_offset()
        started = time.time()
        done = subprocess.run([sys.executable, CLI, "generate", PROMPT, "-m", self.model, "--size", self.args.size,
                               "--steps",
                               str(self.args.steps), "--seed", str(self.seed), "--runtime", "local", "--keep-warm",
                               "120",
                               "--json", "-o", str(out)], capture_output=True, stdin=subprocess.DEVNULL)
        ended = time.time()
        if done.returncode:
            raise SystemExit(f"imagegen generate failed ({done.returncode}): "
                             f"{done.stderr.decode(errors='replace')[-2000:]}")
        record = json.loads(done.stdout.decode().splitlines()[-1])
        worker = json.loads(self.record_path.read_text())
        ready = self.record_path.stat().st_mtime
        worker_pid = worker["pid"]
        comfy_port, upstream = worker["comfy_port"], {c.UPSTREAM_HEADER: worker["upstream_secret"]}
        comfy_pid = int(Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()[0])
        worker_started, comfy_started = process_start(worker_pid, offset), process_start(comfy_pid, offset)
        history = requests.get(f"http://127.0.0.1:{comfy_port}/history", params={"max_items": 1}, headers=upstream,
                               timeout=30).json()
        entry = next(iter(history.values()))
        begin, success = execution_span(entry)
        timings = record["timings"]
        first_step = begin + timings["loading"]
        sampled = first_step + timings["sampling"]
        self.accounted += c._task_cpu(worker_pid) + c._task_cpu(comfy_pid)
        self.runtime.stop()
        return {"cli": worker_started - started, "worker": comfy_started - worker_started,
                "comfy": ready - comfy_started,
                "ready_to_start": begin - ready, "load": first_step - begin, "sampling": sampled - first_step,
                "decode": success - sampled, "back": ended - success, "total": ended - started,
                "client": {k: timings.get(k) for k in ("queued", "loading", "sampling", "finishing", "fetch", "write")}}

    # --- b: ComfyUI by hand -----------------------------------------------------------------
    def by_hand(self) -> dict:
        from imagegen.comfy import workflows
        from imagegen.engine import generate as gen

        self.seed += 1
        out = self.scratch / f"hand-{self.seed}.png"
        port = c.free_port()
        work = self.scratch / f"comfy-{self.seed}"
        work.mkdir()
        planned = gen.plan(gen.Request(prompt=PROMPT, model=self.model, size=self.args.size, steps=self.args.steps,
                                       seed=self.seed,
                                       output=str(self.scratch / "unused.png")))
        graph = workflows.build(planned.bundle, planned.jobs[0])
        from imagegen.util import paths

        self.drop_caches()
        started = time.time()
        process = c.start_bare_comfy(port, work, paths.models_dir(), work / "comfy.log", self.device, self.slot)
        try:
            ready_monotonic = c.wait_http(f"http://127.0.0.1:{port}/system_stats", process=process)
            ready = time.time() - (time.monotonic() - ready_monotonic)
            client = c.BareClient(f"http://127.0.0.1:{port}")
            marks: dict = {}
            entry = client.run(graph, out, marks)
            ended = time.time()
            offset = ended - time.monotonic()
            client.close()
        finally:
            c.stop_process(process)
        begin, success = execution_span(entry)
        first_step = marks["first_progress"] + offset
        after_sampler = next(t for _node, t in marks["nodes"] if t > marks["last_progress"]) + offset
        return {"cli": 0.0, "worker": 0.0, "comfy": ready - started, "ready_to_start": begin - ready,
                "load": first_step - begin, "sampling": after_sampler - first_step, "decode": success - after_sampler,
                "back": ended - success, "total": ended - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="cold starts of each kind, taking turns (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
    parser.add_argument("--size", default="64x64", help="image size (default 64x64)")
    parser.add_argument("--model",
                        help="a built-in model (e.g. flux-dev) instead of a checkpoint file; set IMAGEGEN_MODELS_DIR "
                                        "to the model cache that holds its files (the run itself uses a temporary "
                                        "IMAGEGEN_HOME)")
    parser.add_argument("--checkpoint", help="an SD1.5/SDXL .safetensors to use instead of the tiny test checkpoint")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the OS file cache before every start (root; slows everything else on the machine)")
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="wait (up to 2 min) for the load average to fall below this")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args()
    load_before = c.wait_for_quiet(args.max_load)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-cold-") as tmp:
        scratch = Path(tmp)
        os.environ["IMAGEGEN_HOME"] = str(scratch / "home")
        if not args.model:
            os.environ.pop("IMAGEGEN_MODELS_DIR", None)
        bench = ColdBench(args, scratch)
        try:
            c.log("untimed first runs (file cache, .pyc files, the checkpoint's one-time sha256)")
            first = bench.imagegen()
            first["hash"] = None if args.model else bench.hash_seconds()
            bench.by_hand()
            samples = {"imagegen": [], "hand": []}
            loads = []
            other = c.OtherLoad(accounted=lambda: bench.accounted)
            other.__enter__()
            for index in range(args.runs):
                order = ["imagegen", "hand"] if index % 2 == 0 else ["hand", "imagegen"]
                for kind in order:
                    samples[kind].append(bench.imagegen() if kind == "imagegen" else bench.by_hand())
                    loads.append(c.load_average())
                    c.log(f"  run {index + 1}/{args.runs} {kind}: {samples[kind][-1]['total']:.2f}s (load "
                          f"{loads[-1]:.2f})")
            other.__exit__()
        finally:
            bench.runtime.stop()
    total = time.monotonic() - started

    def med(kind: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[kind])

    rows = []
    for key, label in PHASES + [("total", "**total: spawn → PNG on disk**")]:
        ours, theirs = med("imagegen", key), med("hand", key)
        rows.append([label, f"{ours:.2f}", f"{theirs:.2f}" if key not in ("cli", "worker") else "—",
                     f"{ours - theirs:+.2f}",
                     f"{ours / theirs:.2f}" if theirs > 0.05 and key not in ("cli", "worker") else "—"])
    client = {k: statistics.median(s["client"][k] for s in samples["imagegen"] if s["client"].get(k) is not None)
              for k in ("queued", "loading", "sampling", "finishing", "fetch", "write")}
    date = c.now_stamp()
    command = "IMAGEGEN_COMFYUI_DIR=... ~/.cache/imagegen-dev/venv/bin/python bench/cold_start.py" + (
        " " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    cache_note = ("the OS file cache dropped before every start (`--drop-caches`)" if args.drop_caches else
                  "the OS file cache warm for both (one untimed start of each first)")
    section = "\n".join([
        "## Cold start" + ("" if bench.device == "cpu" else f" ({bench.device})"), "",
        f"`{command}` — {date}, {total:.0f} s in all.  ",
        f"Machine: {c.machine()}; {c.comfyui_version()}. Load average {load_before:.2f} at the start, "
        f"{min(loads):.2f}–{max(loads):.2f} during the runs; {other.describe()} (the machine is shared).  ",
        "Workload: " + (f"model `{args.model}`, " if args.model else
                        (f"`{bench.checkpoint.name}`" if args.checkpoint else "tiny random-weight SD1.5 checkpoint")
                        + f" ({bench.checkpoint.stat().st_size / 1e6:.0f} MB) registered as a user model, ") +
        f"{args.size}, {args.steps} steps; {args.runs} cold starts of each kind taking turns, {cache_note}.", "",
        c.md_table(["phase (seconds, medians)", "`imagegen generate`, no worker running",
                    "ComfyUI started by hand + graph posted",
                    "difference", "ratio"], rows, "---|---:|---:|---:|---:"), "",
        "The client's own phase times for the imagegen runs (`timings` in the --json record, medians, s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in client.items()) + ".  ",
        (f"The first imagegen run in a fresh home (untimed above) took {first['total']:.2f} s; it also hashed the "
         "local checkpoint "
         f"once for provenance ({first['hash']:.2f} s for sha256 of {bench.checkpoint.stat().st_size / 1e9:.2f} GB, "
         "then remembered "
         "in the download ledger)." if first["hash"] is not None else
         f"The first imagegen run in a fresh home (untimed above) took {first['total']:.2f} s."), "",
        "How to read it:", "",
        "- The imagegen rows come from the CLI's spawn time, the worker's and ComfyUI's process start times",
        "  (`/proc/PID/stat`), the worker's ready record (written when ComfyUI first answers /system_stats), ComfyUI's",
        "  history timestamps and the client's phase times; the by-hand rows from the same events seen by a minimal",
        "  client. Process start times have 10 ms resolution.",
        "- For imagegen, ComfyUI counts as ready when the worker writes its record, after its 0.2 s poll of",
        "  /system_stats saw an answer (by hand: a 50 ms poll), so up to 0.2 s of that row is the poll.",
        "  *ComfyUI ready → job executing* is then the CLI's 0.1 s poll of the worker record, /imagegen/info, the",
        "  websocket and POST /prompt; by hand, the websocket and POST.",
        "- *First step* folds in loading the checkpoint (safetensors → fp32 weights on CPU), encoding both prompts and",
        "  one sampling step: ComfyUI loads lazily, so there is no clean boundary between them in a text-to-image job.",
        "  `bench/model_load.py` times the checkpoint load alone.",
    ])
    print(section)
    if args.write:
        c.write_section(SECTION if bench.device == "cpu" else f"{SECTION}-{bench.device}", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
