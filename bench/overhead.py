#!/usr/bin/env python3
"""Warm-path overhead: `imagegen generate` against the same graph posted straight to the same ComfyUI.

    IMAGEGEN_COMFYUI_DIR=... ~/.cache/imagegen-dev/venv/bin/python bench/overhead.py [--runs 12] [--write]

One warm local CPU worker (LocalRuntime, the tiny random-weight SD1.5 checkpoint registered as a
user model, so the CLI goes through the registry as `imagegen generate -m NAME` does) serves every path:

- `bare`    a minimal client posts the graph straight to the worker's ComfyUI (its port read from the
            ComfyUI child's command line), waits on the websocket, GETs /history and /view, writes
            the PNG, with its HTTP session and websocket kept open: the strictest baseline;
- `proxy`   the same client through the worker's token proxy (client → proxy → ComfyUI);
- `inproc`  imagegen.engine.generate.generate() in this process: validation, registry, worker lookup, job,
            fetch, PNG tagging, atomic write (the per-image cost without process start-up);
- `script`  the bare client's few lines as a new `python -c` process per image: the fair baseline
            for a CLI, which also starts a process per image;
- `cli`     `python generate_image.py generate ... --runtime local -o FILE`, a new process per image.

The paths take turns in one loop (the order rotates each round), each image with its own seed
(ComfyUI skips a graph it has just run). Besides the wall time, each image's execution span inside
ComfyUI (its execution_start → execution_success timestamps in /history) is subtracted: what is
left is the time spent outside ComfyUI, which does not carry the sampling noise of a busy machine.
CPU seconds are counted too: the client's (this process, or the child process) and the worker
proxy's (/proc/PID/task/*/schedstat), which a busy machine barely moves. A second, instrumented
pass splits the in-process path into its pieces.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

SECTION = "warm-path-overhead"
CLI = str(c.REPO / "generate_image.py")
PROMPT = "a lighthouse on a cliff at dusk"
MODEL = "bench-tiny-sd15"
PATHS = ["bare", "proxy", "inproc", "script", "cli"]
LABELS = {"bare": "bare client → ComfyUI (session and websocket kept open)",
          "proxy": "same client → worker proxy → ComfyUI",
          "inproc": "`imagegen.engine.generate.generate()` in-process, warm worker",
          "script": "bare script, a new `python -c` process per image",
          "cli": "`imagegen generate -m …` CLI, a new process per image"}
BARE_SCRIPT = """
import json, os, sys, uuid, requests, websocket
base, graph, out = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
cid, h = uuid.uuid4().hex, {"X-Imagegen-Upstream": os.environ["UPSTREAM_SECRET"]}
ws = websocket.create_connection("ws" + base[4:] + "/ws?clientId=" + cid, header=h)
pid = requests.post(base + "/prompt", json={"prompt": graph, "client_id": cid}, headers=h).json()["prompt_id"]
while True:
    m = ws.recv()
    if isinstance(m, str):
        d = json.loads(m)
        if d["type"] == "executing" and d["data"].get("prompt_id") == pid and d["data"]["node"] is None:
            break
entry = requests.get(base + "/history/" + pid, headers=h).json()[pid]
ref = [i for o in entry["outputs"].values() for i in o.get("images", [])][0]
data = requests.get(base + "/view", params={"filename": ref["filename"], "subfolder": ref["subfolder"],
                                           "type": ref["type"]}, headers=h).content
open(out, "wb").write(data)
"""
IMPORTS = ("import imagegen.cli.main, imagegen.engine.generate, imagegen.runtimes.base, imagegen.comfy.client, "
           "imagegen.models.fetch, websocket, filelock")


@dataclass
class Sample:
    wall: float
    span: float        # inside ComfyUI: execution_start → execution_success
    client_cpu: float  # this process (in-process paths) or the child process (script, CLI)
    proxy_cpu: float   # the worker process (the token proxy)
    sampling: float | None = None  # first progress event → the node after the sampler (steps - 1 steps)

    @property
    def outside(self) -> float:
        return self.wall - self.span


def execution_span(history: dict) -> tuple[float, float]:
    """(execution_start, execution_success) of a /history entry, in seconds since the epoch."""
    stamps = {name: body.get("timestamp") for name, body in history.get("status", {}).get("messages", [])}
    return stamps["execution_start"] / 1000, stamps["execution_success"] / 1000


def cpu_of(pid: int) -> float:
    """CPU seconds a process has run, all its threads (schedstat: nanoseconds, not 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Bench:
    def __init__(self, args, scratch: Path):
        import requests

        from imagegen.engine import generate as gen
        from imagegen.models.registry import add_user_model
        from imagegen.runtimes.local import LocalRuntime

        self.args, self.scratch, self.gen = args, scratch, gen
        from imagegen.models import modelfile

        self.model = args.model or MODEL
        self.checkpoint = Path(args.checkpoint).resolve() if args.checkpoint else c.tiny_checkpoint()
        if not args.model:
            add_user_model(MODEL, self.checkpoint, modelfile.detect(modelfile.read_header(self.checkpoint)).family,
                           force=True)
        self.runtime = LocalRuntime(keep_warm=900)
        self.seed = 1000
        self.http = requests.Session()

    def request(self, seed: int, out: Path):
        return self.gen.Request(prompt=PROMPT, model=self.model, size=self.args.size, steps=self.args.steps, seed=seed,
                                output=str(out))

    def start(self) -> None:
        from imagegen.engine.progress import Reporter

        started = time.monotonic()
        list(self.gen.generate(self.request(1, self.scratch / "first.png"), self.runtime, Reporter(quiet=True)))
        c.log(f"worker started and first image rendered in {time.monotonic() - started:.1f}s (not counted)")
        from imagegen.runtimes.base import default_slot

        self.worker = self.runtime.find(default_slot())
        self.worker_pid = self.worker.info["pid"]
        self.comfy_url = f"http://127.0.0.1:{self.worker.info['comfy_port']}"
        self.upstream = {c.UPSTREAM_HEADER: self.worker.info["upstream_secret"]}  # the worker's ComfyUI wants it
        self.http.headers.update(self.upstream)
        self.comfy_pid = int(Path(f"/proc/{self.worker_pid}/task/{self.worker_pid}/children").read_text().split()[0])
        self.bare = c.BareClient(self.comfy_url, headers=self.upstream)
        self.proxied = c.BareClient(self.worker.url, self.worker.token)
        self.planned = self.gen.plan(self.request(1, self.scratch / "unused.png"))

    def graph(self, seed: int) -> dict:
        from imagegen.comfy import workflows

        params = self.planned.jobs[0]
        params.seed = seed
        return workflows.build(self.planned.bundle, params)

    def last_history(self) -> dict:
        entries = self.http.get(self.comfy_url + "/history", params={"max_items": 1}, timeout=30).json()
        return next(iter(entries.values()))

    # --- the paths --------------------------------------------------------------------------
    def run_bare(self, seed: int, out: Path) -> float:
        marks: dict = {}
        self.bare.run(self.graph(seed), out, marks)
        return c.sampling_seconds(marks)

    def run_proxy(self, seed: int, out: Path) -> float:
        marks: dict = {}
        self.proxied.run(self.graph(seed), out, marks)
        return c.sampling_seconds(marks)

    def run_script(self, seed: int, out: Path) -> None:
        subprocess.run([sys.executable, "-c", BARE_SCRIPT, self.comfy_url, str(out.with_suffix(".json")), str(out)],
                       check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                       env={**os.environ, "UPSTREAM_SECRET": self.worker.info["upstream_secret"]})

    def run_inproc(self, seed: int, out: Path) -> float:
        from imagegen.engine.progress import Reporter

        records = list(self.gen.generate(self.request(seed, out), self.runtime, Reporter(quiet=True)))
        return records[0]["timings"].get("sampling")

    def run_cli(self, seed: int, out: Path) -> None:
        done = subprocess.run([sys.executable, CLI, "generate", PROMPT, "-m", self.model, "--size", self.args.size,
                               "--steps", str(self.args.steps), "--seed", str(seed), "--runtime", "local", "--json",
                               "-o", str(out)],
                              capture_output=True, stdin=subprocess.DEVNULL, check=False)
        if done.returncode:
            raise SystemExit(f"imagegen generate failed ({done.returncode}): "
                             f"{done.stderr.decode(errors='replace')[-2000:]}")
        return json.loads(done.stdout.decode().splitlines()[-1])["timings"].get("sampling")

    def timed(self, name: str) -> Sample:
        self.seed += 1
        out = self.scratch / f"{name}-{self.seed}.png"
        self.bare.prepare()
        self.proxied.prepare()
        if name == "script":  # the graph file is ready before the clock starts
            out.with_suffix(".json").write_text(json.dumps(self.graph(self.seed)))
        proxy_before, own_before, children_before = cpu_of(self.worker_pid), time.process_time(), children_cpu()
        started = time.monotonic()
        sampling = getattr(self, f"run_{name}")(self.seed, out)
        wall = time.monotonic() - started
        own, children = time.process_time() - own_before, children_cpu() - children_before
        proxy = cpu_of(self.worker_pid) - proxy_before
        if not out.is_file():
            raise SystemExit(f"{name}: no image at {out}")
        history = self.last_history()
        seeds = [node["inputs"].get("seed") for node in history["prompt"][2].values()
                 if node.get("class_type") == "KSampler"]
        if seeds != [self.seed]:
            raise SystemExit(f"{name}: the last /history entry is not this image's (seeds {seeds}, expected "
                             f"{self.seed})")
        begin, end = execution_span(history)
        return Sample(wall, end - begin, own + children, proxy, sampling)

    @staticmethod
    def process(command: list[str]) -> tuple[float, float]:
        before = children_cpu()
        started = time.monotonic()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        return time.monotonic() - started, children_cpu() - before

    def close(self) -> None:
        for client in (getattr(self, "bare", None), getattr(self, "proxied", None)):
            if client is not None:
                client.close()
        stopped = self.runtime.stop()
        c.log(f"stopped {', '.join(stopped) or 'no workers'}")


# --- the instrumented pass: where the in-process path spends its time -----------------------------

class Tracer:
    """Wraps functions the in-process path calls and adds up their time per image."""

    def __init__(self):
        self.current: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.saved: list[tuple[object, str, object]] = []

    def wrap(self, owner, attribute: str, label: str) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            started = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[label] += time.monotonic() - started
                self.counts[label] += 1

        self.saved.append((owner, attribute, original))
        setattr(owner, attribute, timed)

    def restore(self) -> None:
        for owner, attribute, original in reversed(self.saved):
            setattr(owner, attribute, original)
        self.saved.clear()


BEFORE, INSIDE, AFTER = ("from the call to execution_start", "ComfyUI execution (execution_start → execution_success)",
                         "from execution_success to the image on disk")


def breakdown(bench: Bench, runs: int) -> list[list[str]]:
    from imagegen.comfy import client as comfy
    from imagegen.comfy import png
    from imagegen.engine import generate, output, render, timings
    from imagegen.models import cache, registry

    tracer = Tracer()
    pieces = [
        (registry.Registry, "load", "Registry.load: built-in + user models.yaml"),
        (generate, "plan", "plan: validate, resolve the model, name the outputs (incl. Registry.load)"),
        (cache, "ensure_bundle", "cache.ensure_bundle: link the local file, check the bundle"),
        (bench.runtime, "ensure", "runtime.ensure: find the worker (record, pid, GET /imagegen/health)"),
        (comfy.ComfyClient, "worker_info", "GET /imagegen/info (is the model resident?)"),
        (generate, "job_budgets", "job budgets from learned timings"),
        (cache, "file_hashes", "cache.file_hashes (provenance; ledger lookup)"),
        (comfy.ComfyClient, "open_events", "websocket connect (through the proxy)"),
        (comfy.ComfyClient, "submit", "POST /prompt"),
        (comfy.ComfyClient, "history", "GET /history (polls while running + the final one)"),
        (comfy.ComfyClient, "fetch_file", "GET /view (fetch the PNG)"),
        (timings, "record", "timings.record (learned timings file)"),
        (png, "add_text_chunks", "PNG text chunks (parameters, imagegen)"),
        (render, "looks_blank", "blank-image check (a broken fp16 VAE)"),
        (output, "write_atomic", "write (imagegen: temp file, fsync, link; bare: plain write)"),
        (comfy.JobSession, "__exit__", "close the websocket"),
    ]
    for owner, attribute, label in pieces:
        if hasattr(owner, attribute):  # the code moves; a piece that is gone is left out, not a crash
            tracer.wrap(owner, attribute, label)
    ours: dict[str, list[float]] = defaultdict(list)
    try:
        for _ in range(runs):
            tracer.current.clear()
            bench.seed += 1
            bench.bare.prepare()
            started = time.time()
            bench.run_inproc(bench.seed, bench.scratch / f"traced-{bench.seed}.png")
            ended = time.time()
            begin, end = execution_span(bench.last_history())
            for _owner, _attribute, label in pieces:
                ours[label].append(tracer.current.get(label, 0.0))
            ours[BEFORE].append(begin - started)
            ours[INSIDE].append(end - begin)
            ours[AFTER].append(ended - end)
            ours["wall"].append(ended - started)
    finally:
        tracer.restore()
    theirs: dict[str, list[float]] = defaultdict(list)
    for _ in range(runs):
        bench.seed += 1
        bench.bare.prepare()
        marks: dict = {}
        started = time.time()
        offset = started - time.monotonic()
        bench.bare.run(bench.graph(bench.seed), bench.scratch / f"bare-traced-{bench.seed}.png", marks)
        ended = time.time()
        begin, end = execution_span(bench.last_history())
        theirs["POST /prompt"].append(marks["posted"] - marks["submit"])
        theirs["GET /history (polls while running + the final one)"].append(marks["history"] - marks["done"])
        theirs["GET /view (fetch the PNG)"].append(marks["fetched"] - marks["history"])
        theirs["write (imagegen: temp file, fsync, link; bare: plain write)"].append(
            marks["written"] - marks["fetched"])
        theirs[BEFORE].append(begin - started)
        theirs[INSIDE].append(end - begin)
        theirs[AFTER].append(ended - end)
        theirs["wall"].append(ended - started)
        theirs["(bare) `executing` node=None seen after execution_success"].append(marks["done"] + offset - end)
    rows = []
    for label in [label for _, _, label in pieces] + [BEFORE, INSIDE, AFTER,
                                                      "(bare) `executing` node=None seen after execution_success",
                                                      "wall"]:
        mine, other = ours.get(label), theirs.get(label)
        calls = tracer.counts.get(label)
        rows.append([label, f"{statistics.median(mine) * 1000:.1f}" if mine else "—",
                     f"{calls / runs:.1f}" if calls else "—",
                     f"{statistics.median(other) * 1000:.1f}" if other else "—"])
    return rows


def ms(values, digits: int = 0) -> str:
    return f"{statistics.median(values) * 1000:.{digits}f}"


def main() -> int:
    # A process per image must find .pyc files as an installed package has them: with
    # PYTHONDONTWRITEBYTECODE set, every CLI run would compile imagegen's modules from source.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="images per path, interleaved (default 12)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
    parser.add_argument("--size", default="64x64", help="image size (default 64x64)")
    parser.add_argument("--model",
                        help="a built-in model (e.g. flux-dev) instead of a checkpoint file; set IMAGEGEN_MODELS_DIR "
                                        "to the model cache that holds its files (the run itself uses a temporary "
                                        "IMAGEGEN_HOME)")
    parser.add_argument("--checkpoint", help="an SD1.5/SDXL .safetensors to use instead of the tiny test checkpoint "
                                             "(e.g. a full-size random-weight one on a GPU machine)")
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="wait (up to 2 min) for the load average to fall below this")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args()
    load_before = c.wait_for_quiet(args.max_load)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-overhead-") as tmp:
        scratch = Path(tmp)
        os.environ["IMAGEGEN_HOME"] = str(scratch / "home")
        if not args.model:
            os.environ.pop("IMAGEGEN_MODELS_DIR", None)
        bench = Bench(args, scratch)
        try:
            bench.start()
            for name in PATHS:  # one untimed image per path: connections, .pyc files, the OS cache
                bench.timed(name)
            results: dict[str, list[Sample]] = {name: [] for name in PATHS}
            processes = {"python -c pass": [sys.executable, "-c", "pass"],
                         "python -c 'import requests, websocket'  (the bare script's imports)": [sys.executable, "-c",
                                                                                                 "import requests, "
                                                                                                 "websocket"],
                         "python -c 'import imagegen.cli.main'  (typer)": [sys.executable, "-c",
                                                                           "import imagegen.cli.main"],
                         "python -c 'import <everything the generate path imports>'": [sys.executable, "-c", IMPORTS],
                         "imagegen generate x --size 65x64 -m sd15  (exits 2 after parsing and validation)":
                             [sys.executable, CLI, "generate", "x", "--size", "65x64", "-m", "sd15"]}
            process_times: dict[str, list[tuple[float, float]]] = {name: [] for name in processes}
            loads = []
            other = c.OtherLoad(lambda: [bench.worker_pid, bench.comfy_pid])
            other.__enter__()
            for round_index in range(args.runs):
                order = PATHS[round_index % len(PATHS):] + PATHS[:round_index % len(PATHS)]
                for name in order:
                    results[name].append(bench.timed(name))
                for name, command in processes.items():
                    process_times[name].append(bench.process(command))
                loads.append(c.load_average())
                c.log(f"  round {round_index + 1}/{args.runs} (load {loads[-1]:.2f}): " + ", ".join(
                    f"{name} {results[name][-1].wall * 1000:.0f} ms" for name in PATHS))
            other.__exit__()
            c.log(f"instrumented pass ({other.describe()} during the timed rounds)")
            traced = max(6, args.runs // 2)
            split_rows = breakdown(bench, traced)
        finally:
            bench.close()
    load_after = c.load_average()
    total = time.monotonic() - started

    bare = results["bare"]
    bare_wall, bare_outside = statistics.median(s.wall for s in bare), statistics.median(s.outside for s in bare)
    script_outside = statistics.median(s.outside for s in results["script"])
    goal = max(0.03 * bare_wall, 0.050)
    rows, figures = [], {}
    for name in PATHS:
        samples = results[name]
        outside = statistics.median(s.outside for s in samples)
        extra = outside - bare_outside
        versus_script = outside - script_outside if name == "cli" else None
        paired = [s.wall - b.wall for s, b in zip(samples, bare, strict=False)]
        figures[name] = extra
        met = "—" if name == "bare" else ("yes" if extra <= goal else "**no**")
        if versus_script is not None:
            met += (f"; vs the bare script: {'yes' if versus_script <= goal else '**no**'} "
                    f"({versus_script * 1000:+.0f} ms)")
        rates = [(args.steps - 1) / s.sampling for s in samples if s.sampling]
        rows.append([LABELS[name], c.spread([s.wall for s in samples]), ms([s.span for s in samples]),
                     f"{statistics.median(rates):.2f}" if rates and args.steps > 1 else "—",
                     c.spread([s.outside for s in samples]), "—" if name == "bare" else f"{extra * 1000:+.0f}",
                     "—" if name == "bare" else f"{statistics.median(paired) * 1000:+.0f}",
                     f"{statistics.median(s.wall for s in samples) / bare_wall:.3f}",
                     ms([s.client_cpu for s in samples]), ms([s.proxy_cpu for s in samples], 1), met])
    process_rows = [[f"`{name}`", c.spread([w for w, _ in values]), ms([cpu for _, cpu in values])]
                    for name, values in process_times.items()]
    workload = (f"model `{args.model}`" if args.model else
                f"`{Path(args.checkpoint).name}` ({bench.checkpoint.stat().st_size / 1e9:.2f} GB)" if args.checkpoint
                else "tiny random-weight SD1.5 checkpoint")
    device = bench.worker.device
    date = c.now_stamp()
    command = "IMAGEGEN_COMFYUI_DIR=... ~/.cache/imagegen-dev/venv/bin/python bench/overhead.py" + (
        " " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    section = "\n".join([
        "## Warm-path overhead" + ("" if device == "cpu" else f" ({device})"), "",
        f"`{command}` — {date}, {total:.0f} s in all.  ",
        f"Machine: {c.machine()}; {c.comfyui_version()}. Load average {load_before:.2f} at the start, "
        f"{min(loads):.2f}–{max(loads):.2f} during the timed rounds, {load_after:.2f} at the end; {other.describe()} "
        "(the machine is shared).  ",
        f"Workload: {workload}, registered as a user model, {args.size}, {args.steps} steps, euler/normal, "
        f"one warm local worker ({device}); {args.runs} images per path, the paths taking turns (order rotating), "
        "every image its own seed.", "",
        c.md_table(["path", "wall per image, ms: median [p25–p75]", "inside ComfyUI, ms", "it/s",
                    "outside ComfyUI, ms: median [p25–p75]",
                    "overhead vs bare client, ms (outside medians)", "paired wall difference vs bare client, ms",
                    "wall ratio vs bare client", "client CPU, ms", "proxy CPU, ms", f"goal ≤ {goal * 1000:.0f} ms met"],
                   rows, "---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---"), "",
        "Process start-up inside the CLI and script figures (same rounds; the `imagegen` import rows each include the "
        "one above):", "",
        c.md_table(["command", "wall, ms: median [p25–p75]", "CPU, ms"], process_rows), "",
        f"Where an image's time goes, in-process path against the bare client (instrumented pass, {traced} images "
        "each, medians in ms, calls per image; the pieces overlap where one calls another):", "",
        c.md_table(["piece", "`generate()`", "calls", "bare client"], split_rows, "---|---:|---:|---:"), "",
        "How to read it:", "",
        "- *Inside ComfyUI* is the job's execution span from ComfyUI's own history timestamps (execution_start →",
        "  execution_success); *outside* is the wall time minus that span: submitting, queue pickup, noticing the end,",
        "  fetching and writing. A path's overhead is its outside median minus the bare client's, so the sampling "
        "noise",
        "  of a busy machine cancels; the paired wall differences (same round) say the same, more noisily.",
        "- *it/s*: (steps − 1) over the span from the first progress event to the node after the sampler, the same",
        "  span the client's `sampling` phase covers (the CLI's from its --json record).",
        "- *Client CPU* is the CPU time of the client (this process for the in-process paths, the child process for "
        "the",
        "  script and the CLI); *proxy CPU* that of the worker process, which relays every request and websocket "
        "frame.",
        f"- The goal (issue 9) is at most 3 % or 50 ms per image, whichever is larger: here {goal * 1000:.0f} ms.",
        "- The *bare client* keeps one HTTP session and one websocket open in this process: the strictest baseline.",
        "  The *bare script* is the same few lines as a new process per image (Python, requests, websocket-client), "
        "the",
        "  fair baseline for a CLI that also starts a process per image.",
        "- The CLI's figure includes a new Python process per image (interpreter, imports — typer, requests and",
        "  urllib3, yaml — and argument parsing); the in-process figure is what each further image costs",
        "  when one process renders many (`-n N`, `imagegen batch`, prompts on stdin, the MCP server).",
        "- `--runtime local` is passed because Docker also runs on this machine with the image built: the default",
        "  `auto` would pick a container worker. The container path (Docker API lookup per call) is not measured here.",
    ])
    print(section)
    if args.write:
        c.write_section(SECTION if device == "cpu" else f"{SECTION}-{device}", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
