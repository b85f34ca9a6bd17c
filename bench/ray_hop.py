#!/usr/bin/env python3
"""The Ray hop: jobs through `--runtime ray` against the same workers reached directly, side by side in one run.

    ~/.cache/imagegen-dev/venv/bin/python bench/ray_hop.py [--no-write]

A real Ray cluster on this machine (tests/ray_cluster.py: a head and one node per simulated worker,
loopback only, token authentication on), each node's actor attached to one simulated worker of a set
speed (tests/sim_comfy.py, IMAGEGEN_RAY_NODE_WORKERS) on its node. The same jobs run through the
Scheduler twice: with RemoteRuntime (HTTP straight to the workers) and with RayRuntime (graphs,
progress and PNG bytes relayed by the actors).

a. per-image cost of the Ray hop: one worker, depth 1 (nothing overlaps the hop), seconds per image
   through Ray minus directly. Goal: at most 20 ms.
b. makespan efficiency with workers of different speeds on 3 nodes, depth 2: ideal (total work /
   total speed) over measured, through Ray and directly. Goal: at least 0.95.

Prints a markdown table and writes it into docs/benchmarks.md (the "Ray hop" section).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_section  # noqa: E402
from batch_scaling import sim_jobs  # noqa: E402

COMMAND = "~/.cache/imagegen-dev/venv/bin/python bench/ray_hop.py"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(runtime, slots: list[str], jobs, depth: int) -> float:
    from imagegen.comfy.client import Timeouts
    from imagegen.engine.scheduler import Scheduler

    failures: list = []
    scheduler = Scheduler(runtime, slots, jobs, lambda o: failures.append(o) if o.error else None,
                          lambda job, state: Timeouts(), {}, set(), depth=depth)
    started = time.perf_counter()
    scheduler.run()
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"a job failed: {failures[0].error}")
    return elapsed


def warm(runtime, slots: list[str], scratch: Path, depth: int) -> None:
    """A job per worker first, so actors, sessions and connections exist before anything is timed."""
    run(runtime, slots, sim_jobs(2 * len(slots), 1, scratch / f"warm-{time.monotonic_ns()}"), depth)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the table; leave docs/benchmarks.md alone")
    parser.add_argument("--hop-jobs", type=int, default=40)
    parser.add_argument("--hop-step", type=float, default=0.01, help="s/step of the one worker in (a)")
    parser.add_argument("--hop-steps", type=int, default=5)
    parser.add_argument("--step-times", type=float, nargs="+", default=[0.01, 0.02, 0.04],
                        help="s/step of the simulated workers in (b), one node each")
    parser.add_argument("--jobs", type=int, default=70)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from ray_cluster import RayCluster
    from sim_comfy import SimWorker, idle_gaps

    from imagegen.runtimes.ray import RayRuntime
    from imagegen.runtimes.remote import RemoteRuntime

    scratch = Path(tempfile.mkdtemp(prefix="imagegen-ray-hop-"))
    os.environ["IMAGEGEN_HOME"] = str(scratch / "driver")
    sims = [SimWorker(mode="process", step_seconds=s, name=f"sim-{s}") for s in [args.hop_step, *args.step_times]]
    cluster = RayCluster(scratch / "ray")
    rows = []
    try:
        for sim in sims:
            sim.start()
        cluster.start_head()
        for index, sim in enumerate(sims):
            cluster.add_node(f"node-{index}", gpus=1, env={"IMAGEGEN_RAY_NODE_WORKERS": sim.entry},
                             labels={"bench": "hop" if index == 0 else "speeds"})
        os.environ.update(cluster.driver_env())
        ray_runtime = RayRuntime()

        # a. the hop, one worker, depth 1
        direct = RemoteRuntime([sims[0].entry])
        setups = {"direct": (direct, direct.slots()), "ray": (ray_runtime, ray_runtime.slots("bench=hop"))}
        per_image, gaps, renders = {}, {}, {}
        for name, (runtime, slots) in setups.items():
            warm(runtime, slots, scratch, 1)
            elapsed = run(runtime, slots, sim_jobs(args.hop_jobs, args.hop_steps, scratch / f"hop-{name}"), 1)
            per_image[name] = elapsed / args.hop_jobs
            records = sims[0].records()[-args.hop_jobs:]
            gaps[name] = statistics.median(idle_gaps(records))
            renders[name] = statistics.median(r["finished"] - r["started"] for r in records)
            log(f"  hop {name}: {args.hop_jobs} images in {elapsed:.2f}s ({per_image[name] * 1000:.1f} ms/image; "
                f"the worker idles {gaps[name] * 1000:.1f} ms between images, renders {renders[name] * 1000:.1f} ms)")
        hop_ms = (per_image["ray"] - per_image["direct"]) * 1000
        render_ms = args.hop_step * args.hop_steps * 1000
        rows.append([f"Ray hop per image, 1 simulated worker, depth 1 ({render_ms:.0f} ms of rendering per image)",
                     f"{per_image['direct'] * 1000:.1f} ms/image", f"{per_image['ray'] * 1000:.1f} ms/image",
                     f"{hop_ms:+.1f} ms per image", "≤ 20 ms"])
        rows.append(["the worker's idle time between images (median; collect, save, submit the next)",
                     f"{gaps['direct'] * 1000:.1f} ms", f"{gaps['ray'] * 1000:.1f} ms",
                     f"{(gaps['ray'] - gaps['direct']) * 1000:+.1f} ms", "—"])
        rows.append(["the worker's own time per image (median, from its start to its end of the prompt)",
                     f"{renders['direct'] * 1000:.1f} ms", f"{renders['ray'] * 1000:.1f} ms",
                     f"{(renders['ray'] - renders['direct']) * 1000:+.1f} ms", "—"])

        # b. makespan efficiency over nodes of different speeds, depth 2
        speeds = [1 / s for s in args.step_times]
        ideal = args.jobs * args.steps / sum(speeds)
        direct_b = RemoteRuntime([sim.entry for sim in sims[1:]])
        setups = {"direct": (direct_b, direct_b.slots()), "ray": (ray_runtime, ray_runtime.slots("bench=speeds"))}
        results = {}
        for name, (runtime, slots) in setups.items():
            warm(runtime, slots, scratch, 2)
            elapsed = run(runtime, slots, sim_jobs(args.jobs, args.steps, scratch / f"speeds-{name}"), 2)
            results[name] = elapsed
            log(f"  makespan {name}: {elapsed:.2f}s (ideal {ideal:.2f}s, efficiency {ideal / elapsed:.3f})")
        label = "/".join(f"{s:g}" for s in args.step_times)
        rows.append([f"makespan efficiency, {len(args.step_times)} nodes at {label} s/step, depth 2 "
                     f"({args.jobs} jobs × {args.steps} steps; ideal {ideal:.2f} s)",
                     f"{ideal / results['direct']:.3f} direct ({results['direct']:.2f} s)",
                     f"{ideal / results['ray']:.3f} ({results['ray']:.2f} s)",
                     f"{(ideal / results['ray']) / (ideal / results['direct']):.3f} of direct", "≥ 0.95"])
        ray_runtime.stop()
    except BaseException:
        traceback.print_exc()  # now: stopping the cluster below ends this process (Ray's driver aborts)
        raise
    finally:
        import ray

        ray.shutdown()
        cluster.stop()
        for sim in sims:
            sim.close()

    date = datetime.date.today().isoformat()
    ray_version = metadata.version("ray")
    machine = f"2-core CPU VM, no GPU ({platform.machine()}, Python {platform.python_version()}, Ray {ray_version})"
    lines = ["## Ray hop (`--runtime ray`)", "",
             f"`{COMMAND}` — {date}, {machine}. A real Ray cluster on this machine (head + one node per simulated",
             "worker, loopback, token authentication), each node's actor attached to a simulated worker",
             "(tests/sim_comfy.py) on its node; the same jobs through the Scheduler with RemoteRuntime (direct HTTP)",
             "and with RayRuntime (relayed by the actors), side by side in one run.", "",
             "| measure | direct | through Ray | Ray hop | goal |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "- The hop is one actor call to submit and one `next_finished` call that waits on the node and",
              "  returns when the prompt ends, with its PNG bytes. Actors are started (and each worker given one",
              "  job) before anything is timed: start-up is a cost per command (about a second here), not per image.",
              "- Makespan efficiency is ideal / measured, where ideal is the total work over the total speed. The",
              "  Scheduler's tail rule (routing.py: a slower worker leaves the last drafts to faster ones) keeps",
              "  the last jobs off the slowest node; before it, this measured about 0.89 direct and through Ray alike.",
              "  The Ray hop costs nothing measurable here; what is left is per-job overhead on this 2-core machine."]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("ray-hop", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
