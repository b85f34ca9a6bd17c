#!/usr/bin/env python3
"""Batch scaling: how `imagegen batch` spreads work over workers, measured side by side in one run.

    IMAGEGEN_COMFYUI_DIR=... ~/.cache/imagegen-dev/venv/bin/python bench/batch_scaling.py [--no-write]

a. throughput with N real CPU workers (LocalRuntime, tiny random-weight SD1.5) against 1 worker,
   through imagegen.engine.batch.run; scaling efficiency = (rate_N / rate_1) / N.
b. balancing over simulated workers of set speeds (tests/sim_comfy.py) through RemoteRuntime and the
   Scheduler: images per worker against the split proportional to speed, and the makespan against
   the ideal (total work / total speed).
c. the idle gap a simulated worker sits between finishing one prompt and starting the next, with
   the Scheduler's depth 1 against depth 2, and the throughput ratio.
d. the latent-batch gain on a real CPU worker: 8 images as 8 jobs against 2 latent batches of 4.

Workers are started and warmed (one image each) before anything is timed, in a temporary
IMAGEGEN_HOME, and stopped at the end. Prints a markdown table and writes it into
docs/benchmarks.md (the "Batch scaling" section) with the command, the machine and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tiny_checkpoint, write_section  # noqa: E402

COMMAND = "IMAGEGEN_COMFYUI_DIR=... ~/.cache/imagegen-dev/venv/bin/python bench/batch_scaling.py"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- real CPU workers (a, d) ---------------------------------------------------------------

class Meter:
    """Wall time of a run and the share of the machine's CPU that other processes took meanwhile: on a shared
    machine a figure measured while something else ran is flagged and, when time allows, measured again."""

    def __init__(self, scratch: Path):
        self.marker = f"IMAGEGEN_HOME={scratch}".encode()   # the IMAGEGEN_HOMEs of this benchmark are under scratch

    @staticmethod
    def machine_busy() -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def ours(self) -> float:
        """CPU seconds of this process and of every process of this benchmark's IMAGEGEN_HOMEs (workers, ComfyUI)."""
        total = 0.0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if int(entry.name) != os.getpid() and not any(
                        v.startswith(self.marker) for v in (entry / "environ").read_bytes().split(b"\0")):
                    continue
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                continue
        return total

    def __enter__(self) -> Meter:
        self.wall, self.busy, self.own = time.perf_counter(), self.machine_busy(), self.ours()
        return self

    def __exit__(self, *_exc) -> None:
        self.seconds = time.perf_counter() - self.wall
        foreign = (self.machine_busy() - self.busy) - (self.ours() - self.own)
        self.foreign = max(0.0, foreign) / (self.seconds * (os.cpu_count() or 1))


def run_batch(runtime, items_text: str, out_dir: Path, checkpoint: Path, meter: Meter, *, workers: int, pack: str,
              size: str, steps: int, seed: int) -> dict:
    """One `imagegen batch` run through imagegen.engine.batch.run in the runtime's IMAGEGEN_HOME: its rate, images per
    worker and the share of the CPU other processes took meanwhile."""
    from imagegen.engine import batch, generate
    from imagegen.engine.progress import BatchReporter

    os.environ["IMAGEGEN_HOME"] = str(runtime.home)
    items = batch.parse_items(items_text)
    timeouts, explicit = generate.timeouts_from_env(None)
    per_worker: dict[str, int] = {}
    retries = 0

    def emit(line: dict) -> None:
        nonlocal retries
        if line["status"] != "done":
            raise SystemExit(f"a benchmark image failed: {line.get('error')}")
        per_worker[line["worker"]] = per_worker.get(line["worker"], 0) + 1
        retries += line["attempts"] - 1

    # a new seed each run: ComfyUI would otherwise answer a repeated graph from its cache
    with meter:
        summary = batch.run(items, out_dir, runtime, BatchReporter(show_progress=False), emit,  # status lines: stderr
                            defaults={"checkpoint": str(checkpoint), "size": size, "steps": steps}, base_seed=seed,
                            pack=pack,
                            gpus=None, workers=workers, depth=2, overwrite=False, timeouts=timeouts, explicit=explicit)
    if summary.done != summary.total or summary.failed:
        raise SystemExit(f"the benchmark batch did not finish: {summary}")
    return {"rate": summary.done / meter.seconds, "seconds": meter.seconds, "images": summary.done,
            "per_worker": per_worker, "foreign": meter.foreign, "retries": retries}


def alternating(label: str, runs: dict, repeats: int, deadline: float, max_foreign: float) -> tuple[dict, float]:
    """Run each configuration in turn, round after round, until each has `repeats` runs with little other load
    (and no retry) or time is up. Returns each one's median rate over its clean runs (else its least disturbed
    run), and the worst share of the CPU other processes took during the runs used."""
    results: dict[str, list] = {name: [] for name in runs}

    def clean(name):
        return [r for r in results[name] if r["foreign"] <= max_foreign and not r["retries"]]

    while True:
        for name, run in runs.items():
            if len(clean(name)) >= repeats:
                continue
            result = run(len(results[name]))
            results[name].append(result)
            log(f"  {label}, {name}: {result['images']} images in {result['seconds']:.2f}s = {result['rate']:.2f} "
                "img/s "
                f"{result['per_worker']}, other processes {result['foreign']:.0%} of the CPU"
                + (f", {result['retries']} retries" if result["retries"] else ""))
        if all(len(clean(name)) >= repeats for name in runs) or time.monotonic() > deadline:
            break
    rates, worst = {}, 0.0
    for name in runs:
        used = clean(name) or [min(results[name], key=lambda r: r["foreign"])]
        if not clean(name):
            log(f"  warning: {label}, {name}: no run without other load before the time limit; using the least "
                "disturbed")
        rates[name] = statistics.median(r["rate"] for r in used)
        worst = max([worst] + [r["foreign"] + (1.0 if r["retries"] else 0.0) for r in used])
        rates[name + " split"] = sorted(used[-1]["per_worker"].values(), reverse=True)
    return rates, worst


def start_workers(home: Path, count: int, checkpoint: Path, size: str):
    """`count` warm local CPU workers in their own IMAGEGEN_HOME, started as `imagegen batch --workers count`
    starts them (LocalRuntime shares the cores out among them), each with one warm-up image rendered."""
    from imagegen.comfy.client import output_images
    from imagegen.comfy.workflows import Params, build
    from imagegen.engine.generate import Request, resolve_bundle
    from imagegen.models import cache
    from imagegen.runtimes.local import LocalRuntime

    os.environ["IMAGEGEN_HOME"] = str(home)
    runtime = LocalRuntime(keep_warm=900)
    runtime.home = home
    slots = runtime.slots(None, cpu_workers=count)
    bundle = resolve_bundle(Request(prompt="x", checkpoint=checkpoint), None)
    cache.ensure_bundle(bundle)
    width, height = (int(v) for v in size.split("x"))
    errors: list[BaseException] = []

    def start_and_warm(slot: str) -> None:
        try:
            handle = runtime.ensure(slot)
            params = Params(prompt="warm-up", width=width, height=height, steps=2, cfg=7.0, sampler="euler",
                            scheduler="normal", seed=1, filename_prefix="imagegen/warm")
            output_images(dict(handle.client(request_timeout=60).stream([build(bundle, params)]))[0])
        except BaseException as error:  # noqa: BLE001 - raised below
            errors.append(error)

    threads = [threading.Thread(target=start_and_warm, args=(slot,)) for slot in slots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        runtime.stop()
        raise errors[0]
    return runtime


def cpu_benchmarks(args, scratch: Path) -> tuple[list[list[str]], list[list[str]]]:
    checkpoint = tiny_checkpoint()
    meter = Meter(scratch)
    runtimes = {}
    started = time.perf_counter()
    log(f"starting 1 + {args.workers} local CPU workers (two sets, as `--workers 1` and `--workers {args.workers}` "
        "start them) "
        "and rendering one warm-up image on each")
    try:
        for count in (1, args.workers):
            runtimes[count] = start_workers(scratch / f"home-{count}", count, checkpoint, args.size)
            # one untimed batch hashes the checkpoint once (the ledger remembers it) and warms the batch path
            run_batch(runtimes[count], "warm-up batch", scratch / f"warm-{count}", checkpoint, meter, workers=count,
                      pack="1", size=args.size, steps=2, seed=0)
        log(f"workers warm after {time.perf_counter() - started:.1f}s (not counted)")
        deadline = time.monotonic() + args.cpu_minutes * 60
        prompts = "\n".join(f"a benchmark scene number {i}" for i in range(args.images))
        runs = iter(range(1, 1000))

        def throughput(count: int):
            return lambda n: run_batch(runtimes[count], prompts, scratch / f"cpu-{count}-{n}", checkpoint, meter,
                                       workers=count,
                                       pack="1", size=args.size, steps=args.steps, seed=next(runs))

        def latent(pack: str):
            return lambda n: run_batch(runtimes[1], '{"prompt": "a latent batch benchmark", "count": 8}',
                                       scratch / f"pack-{pack}-{n}",
                                       checkpoint, meter, workers=1, pack=pack, size=args.size, steps=args.steps,
                                       seed=next(runs))

        share = (deadline - time.monotonic()) * 0.6   # the scaling runs take longer than the latent-batch runs
        n = args.workers
        rates, foreign = alternating("throughput", {"1 worker": throughput(1), f"{n} workers": throughput(n)},
                                     args.repeats,
                                     time.monotonic() + share, args.max_foreign)
        rate_1, rate_n = rates["1 worker"], rates[f"{n} workers"]
        note = f"; other processes ≤ {min(foreign, 1):.0%} of the CPU" + ("" if foreign <= args.max_foreign
                                                                          else " (DISTURBED)")
        scaling = [
            ["CPU workers, tiny SD1.5, 1 worker", f"{args.images} images {args.size}, {args.steps} steps{note}",
             f"{rate_1:.2f} img/s", "1.00", "—"],
            [f"CPU workers, tiny SD1.5, {n} workers", f"same; images per worker {rates[f'{n} workers split']}",
             f"{rate_n:.2f} img/s",
             f"{rate_n / rate_1:.2f}", f"scaling efficiency {(rate_n / rate_1) / n:.2f}"],
        ]
        rates, foreign = alternating("latent batch", {"8 jobs": latent("1"), "2 batches of 4": latent("4")},
                                     args.repeats,
                                     deadline, args.max_foreign)
        single, packed = rates["8 jobs"], rates["2 batches of 4"]
        note = f"; other processes ≤ {min(foreign, 1):.0%} of the CPU" + ("" if foreign <= args.max_foreign
                                                                          else " (DISTURBED)")
        latent_rows = [
            ["latent batch, 1 CPU worker: 8 single jobs",
             f"one prompt × 8 images {args.size}, {args.steps} steps{note}", f"{single:.2f} img/s", "1.00", "—"],
            ["latent batch, 1 CPU worker: 2 batches of 4 (`--pack 4`)", "same images", f"{packed:.2f} img/s",
             f"{packed / single:.2f}",
             "latent-batch gain"],
        ]
        return scaling, latent_rows
    finally:
        for runtime in runtimes.values():
            stopped = runtime.stop()
            log(f"stopped {', '.join(stopped) or 'no workers'} ({runtime.home.name})")


# --- simulated workers (b, c) --------------------------------------------------------------

def sim_jobs(count: int, steps: int, out_dir: Path, size: int = 64):
    from imagegen.comfy.workflows import Params
    from imagegen.engine.scheduler import Job
    from imagegen.models.registry import Bundle, ModelFile

    bundle = Bundle(name="sim-sd15", family="sd15", files={"checkpoint": ModelFile(
        key="sim-sd15.checkpoint", folder="checkpoints", filename="sim-sd15.safetensors")})
    return [Job(key=f"job-{i}", bundle=bundle, targets=[out_dir / f"job-{i}.png"],
                params=Params(prompt=f"job {i}", width=size, height=size, steps=steps, cfg=7.0, sampler="euler",
                              scheduler="normal", seed=i, filename_prefix=f"imagegen/job-{i}"))
            for i in range(count)]


def schedule(sims, jobs, depth: int) -> tuple[float, object]:
    from imagegen.comfy.client import Timeouts
    from imagegen.engine.scheduler import Scheduler
    from imagegen.runtimes.remote import RemoteRuntime

    runtime = RemoteRuntime([sim.entry for sim in sims])
    failures = []
    scheduler = Scheduler(runtime, runtime.slots(), jobs, lambda o: failures.append(o) if o.error else None,
                          lambda job, state: Timeouts(), {}, set(), depth=depth)
    started = time.perf_counter()
    scheduler.run()
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"a simulated job failed: {failures[0].error}")
    return elapsed, scheduler


def balancing(args, scratch: Path) -> list[list[str]]:
    from sim_comfy import SimWorker

    step_times = args.sim_step_times
    steps, count = args.sim_steps, args.sim_jobs
    speed = [1 / s for s in step_times]
    ideal_split = [count * v / sum(speed) for v in speed]
    ideal = count * steps / sum(speed)   # total work (steps) over total speed (steps/s)
    rows = []
    for depth, tail_rule in ((2, True), (2, False), (1, True)):
        sims = [SimWorker(mode="process", step_seconds=s, name=f"sim-{s}") for s in step_times]
        for sim in sims:
            sim.start()
        try:
            with tail_rule_of_routing(tail_rule):
                elapsed, _ = schedule(sims, sim_jobs(count, steps, scratch / f"balance-{depth}-{tail_rule}"), depth)
            records = [sim.records() for sim in sims]
            done = [len(r) for r in records]
            end = max(r["finished"] for rs in records for r in rs)
            # idle at the end, waiting for the last job
            tail = [end - max(r["finished"] for r in rs) for rs in records]
        finally:
            for sim in sims:
                sim.close()
        variant = f"depth {depth}" + ("" if tail_rule else ", without the tail rule (any idle worker takes a draft)")
        log(f"  balancing {variant}: {done} (ideal {[round(x, 1) for x in ideal_split]}) in {elapsed:.2f}s (ideal "
            f"{ideal:.2f}s); "
            f"idle at the end {[round(t, 2) for t in tail]}s")
        worst = max(abs(d - i) for d, i in zip(done, ideal_split, strict=False))
        rows.append([f"balancing, {len(sims)} simulated workers at {'/'.join(f'{s:g}' for s in step_times)} s/step, "
                     f"{variant}",
                     f"{count} jobs × {steps} steps; images per worker {done} vs ideal "
                     f"{[round(x, 1) for x in ideal_split]} "
                     f"(max off by {worst:.1f}); idle at the end {'/'.join(f'{t:.2f}' for t in tail)} s",
                     f"makespan {elapsed:.2f}s vs ideal {ideal:.2f}s", f"{ideal / elapsed:.2f}",
                     "makespan efficiency (ideal / measured)"])
    return rows


@contextlib.contextmanager
def tail_rule_of_routing(on: bool):
    """Off: the router as it was before the tail rule (engine/routing.py): every idle worker takes any draft."""
    from imagegen.engine import routing

    rule = routing.Router.helps_the_tail
    if not on:
        routing.Router.helps_the_tail = lambda self, job, worker, waiting: True  # type: ignore[method-assign]
    try:
        yield
    finally:
        routing.Router.helps_the_tail = rule  # type: ignore[method-assign]


def idle_gap(args, scratch: Path) -> list[list[str]]:
    from sim_comfy import SimWorker

    rows, rates = [], {}
    for depth in (1, 2):
        with SimWorker(mode="process", step_seconds=args.gap_step, name="gap") as sim:
            jobs = sim_jobs(args.gap_jobs, args.gap_steps, scratch / f"gap-{depth}")
            elapsed, _ = schedule([sim], jobs, depth)
            records = sim.records()
        gaps = sorted(sim_gaps(records))
        ordered = sorted(records, key=lambda r: r["started"])
        span = ordered[-1]["finished"] - ordered[0]["started"]   # first start to last finish: the worker's own view
        busy = sum(r["finished"] - r["started"] for r in records)
        rates[depth] = len(records) / span
        log(f"  depth {depth}: median gap {statistics.median(gaps) * 1000:.1f} ms, busy {busy / span:.0%}, "
            f"{rates[depth]:.2f} jobs/s")
        rows.append([f"idle gap between jobs, 1 simulated worker, depth {depth}",
                     f"{len(records)} jobs × {args.gap_steps} steps at {args.gap_step:g} s/step "
                     f"({args.gap_steps * args.gap_step * 1000:.0f} ms each)",
                     f"gap median {statistics.median(gaps) * 1000:.1f} ms, p90 "
                     f"{gaps[int(0.9 * (len(gaps) - 1))] * 1000:.1f} ms; busy {busy / span:.0%}",
                     f"{rates[depth] / rates[1]:.2f}",
                     f"{rates[depth]:.2f} jobs/s" + (" (throughput ratio vs depth 1)" if depth == 2 else "")])
    return rows


def sim_gaps(records):
    from sim_comfy import idle_gaps

    return idle_gaps(records)


# --- the report ---------------------------------------------------------------------------

def machine() -> str:
    model = "unknown CPU"
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1).strip() if found else model
        memory = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2 ** 20
    except (OSError, AttributeError):
        memory = 0
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "absent"
    return (f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB RAM, no GPU; {platform.system()} "
            f"{platform.release()}, "
            f"Python {platform.python_version()}, torch {torch}")


def table(rows: list[list[str]]) -> str:
    lines = ["| measurement | workload | result | ratio | ratio means |", "|---|---|---:|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="CPU workers to compare with one (default 2)")
    parser.add_argument("--images", type=int, default=12, help="images per throughput run (default 12)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the real CPU runs (default 20)")
    parser.add_argument("--size", default="64x64", help="image size of the real CPU runs (default 64x64)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="undisturbed runs of each real CPU configuration; the median counts (default 2)")
    parser.add_argument("--cpu-minutes", type=float, default=3.5,
                        help="time limit for the real CPU runs, retries included (default 3.5)")
    parser.add_argument("--max-foreign", type=float, default=0.1,
                        help="a run during which other processes took more than this share of the CPU is measured "
                        "again (default 0.1)")
    parser.add_argument("--sim-step-times", type=lambda s: [float(x) for x in s.split(",")], default=[0.01, 0.02, 0.04],
                        help="seconds per step of the simulated workers (default 0.01,0.02,0.04)")
    parser.add_argument("--sim-jobs", type=int, default=70, help="jobs of the balancing run (default 70)")
    parser.add_argument("--sim-steps", type=int, default=20, help="steps per balancing job (default 20)")
    parser.add_argument("--gap-jobs", type=int, default=40, help="jobs of each idle-gap run (default 40)")
    parser.add_argument("--gap-steps", type=int, default=10, help="steps per idle-gap job (default 10)")
    parser.add_argument("--gap-step", type=float, default=0.01,
                        help="seconds per step in the idle-gap runs (default 0.01)")
    parser.add_argument("--skip-cpu", action="store_true",
                        help="leave out the real CPU workers (a, d): simulated workers only")
    parser.add_argument("--no-write", action="store_true", help="print the table only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load_before:.1f} on {os.cpu_count()} cores: other work will skew the CPU figures")
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-") as tmp:
        scratch = Path(tmp)
        os.environ["IMAGEGEN_HOME"] = str(scratch / "home")   # the simulated runs' timings; the CPU runs have their own
        os.environ.pop("IMAGEGEN_MODELS_DIR", None)
        rows: list[list[str]] = []
        latent: list[list[str]] = []
        if not args.skip_cpu:
            log("a/d. real CPU workers")
            scaling, latent = cpu_benchmarks(args, scratch)
            rows += scaling
        os.environ["IMAGEGEN_HOME"] = str(scratch / "home")
        log("b. balancing over simulated workers")
        rows += balancing(args, scratch)
        log("c. idle gap between jobs")
        rows += idle_gap(args, scratch)
        rows += latent
    total = time.perf_counter() - started
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    command = COMMAND + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    section = "\n".join([
        "## Batch scaling", "",
        f"`{command}` — {date}, {total:.0f} s in all.  ",
        f"Machine: {machine()}; load average {load_before:.1f} when it started.", "",
        table(rows), "",
        "How to read it:", "",
        "- **CPU workers** are real ComfyUI processes running a tiny random-weight SD1.5 checkpoint, driven through",
        "  `imagegen.engine.batch.run` (LocalRuntime) with warm workers: start-up and one warm-up image per worker are "
        "not counted.",
        "  Two sets side by side, each in its own IMAGEGEN_HOME and started as `--workers 1` and `--workers "
        f"{args.workers}` start",
        "  them: LocalRuntime gives each CPU worker cores / workers torch threads (OMP_NUM_THREADS). Ratio: images/s "
        "over",
        "  one worker's; scaling efficiency = (rate_N / rate_1) / N. On a CPU, N workers share the same cores, so this "
        "shows",
        "  what extra CPU workers buy on this machine, not what extra GPUs buy.",
        "- **Other load**: this machine is shared. Each real CPU run measures the share of all cores that processes "
        "outside",
        "  the benchmark used meanwhile (/proc). The configurations run in turn; a run where that exceeded "
        f"{args.max_foreign:.0%}",
        f"  (or that needed a retry) is run again, within {args.cpu_minutes:g} min, and the median of {args.repeats} "
        "clean runs",
        "  counts. A figure marked DISTURBED had no clean run in time: rerun it on a quiet machine.",
        "- **Simulated workers** (`tests/sim_comfy.py`, each its own process) stand for GPUs of set speeds: they sleep",
        "  `step × steps` per job and answer the ComfyUI + worker API. Balancing goes through RemoteRuntime and the",
        "  Scheduler; the ideal split is proportional to speed and the ideal makespan is total work / total speed.",
        "- **Idle gap** is measured inside the simulated worker: from finishing one prompt to starting the next. With",
        "  depth 1 the worker waits for the client to collect the image and submit the next job; with depth 2 the next",
        "  job is already queued. The ratio is throughput (jobs / the worker's first-start-to-last-finish span) over "
        "depth 1's.",
        "- **Latent batch**: one prompt, 8 images, as 8 jobs (`--pack 1`) or as 2 latent batches of 4 (`--pack 4`) on "
        "one",
        "  real CPU worker; ratio = images/s over the 8-job run.",
    ])
    print(section)
    if not args.no_write:
        write_section("batch-scaling", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
