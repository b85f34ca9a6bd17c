"""Routing over simulated workers of set GPU sizes and speeds (this machine has no GPUs): a job too
large for a small GPU never goes there, quality work lands on the fast worker, and a worker that
hangs is routed around, its jobs finish elsewhere, and it rejoins once it answers again."""

from __future__ import annotations

import threading
import time

from sim_comfy import SimWorker

from imagegen.comfy import workflows
from imagegen.comfy.client import Timeouts
from imagegen.engine.scheduler import Job, Scheduler
from imagegen.models.registry import Registry
from imagegen.runtimes.remote import RemoteRuntime

REGISTRY = Registry.load()


def job(key, model, size, steps=4, quality=False, out=None):
    params = workflows.Params(f"prompt {key}", size, size, steps, 7.0, "euler", "normal", hash(key) % 1000,
                              filename_prefix=f"imagegen/{key}")
    return Job(key=key, bundle=REGISTRY.get(model), params=params, targets=[out / f"{key}.png"], quality=quality)


def run(sims, jobs, timeouts=None):
    outcomes = []
    runtime = RemoteRuntime([sim.entry for sim in sims])
    scheduler = Scheduler(runtime, runtime.slots(), jobs, outcomes.append, lambda j, w: timeouts or Timeouts(), {},
                          set(),
                          registry=REGISTRY)
    scheduler.run()
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes if o.error]
    by_worker = {}
    for outcome in outcomes:
        by_worker.setdefault(outcome.job.key, outcome.worker)
    names = {state.slot: state.name for state in scheduler.workers}
    return by_worker, names


def test_a_job_too_large_for_a_small_gpu_never_goes_there(tmp_path):
    with SimWorker(gpu_name="16 GB card", memory_total_mib=16384, step_seconds=0.02) as big, \
            SimWorker(gpu_name="4 GB card", memory_total_mib=4096, step_seconds=0.005) as small:
        jobs = [job(f"xl{i}", "sdxl", 1024, out=tmp_path) for i in range(4)] + \
               [job(f"d{i}", "sd15", 256, out=tmp_path) for i in range(8)]
        placed, names = run([big, small], jobs)
    small_name = next(name for name in names.values() if str(small.port) in name)
    assert not [key for key, worker in placed.items() if key.startswith("xl") and worker == small_name]
    assert [key for key, worker in placed.items() if key.startswith("d") and worker == small_name], \
        "the small GPU still helps with the drafts it can hold"


def test_quality_stages_land_on_the_fast_worker(tmp_path):
    with SimWorker(gpu_name="fast", step_seconds=0.02) as fast, SimWorker(gpu_name="slow", step_seconds=0.2) as slow:
        drafts = [job(f"d{i}", "sd15", 128, steps=6, out=tmp_path) for i in range(8)]
        run([fast, slow], drafts)  # the speeds are learned here, as in a funnel's draft stage
        finals = [job(f"q{i}", "sd15", 128, steps=20, quality=True, out=tmp_path) for i in range(4)]
        placed, names = run([fast, slow], finals)
    fast_name = next(name for name in names.values() if str(fast.port) in name)
    assert all(worker == fast_name for worker in placed.values()), placed


def test_a_hung_worker_is_routed_around_and_rejoins_when_healthy(tmp_path):
    with SimWorker(gpu_name="steady", step_seconds=0.01) as steady, SimWorker(gpu_name="flaky",
                                                                              step_seconds=0.01) as flaky:
        jobs = [job(f"j{i}", "sd15", 128, steps=10, out=tmp_path) for i in range(80)]
        resumed_at = []

        def hang_then_recover():
            time.sleep(0.6)
            flaky.hang()
            time.sleep(4.0)
            flaky.resume()
            resumed_at.append(time.monotonic())  # the simulator stamps jobs with the monotonic clock

        threading.Thread(target=hang_then_recover, daemon=True).start()
        placed, names = run([steady, flaky], jobs, Timeouts(stall=1.5, load=1.5))
        flaky_records = flaky.records()
    flaky_name = next(name for name in names.values() if str(flaky.port) in name)
    assert len(placed) == 80, "every job finished somewhere"
    assert resumed_at and any(r["started"] > resumed_at[0] for r in flaky_records if "started" in r), \
        "the flaky worker took jobs again after it recovered"
    assert any(worker == flaky_name for worker in placed.values())


def test_generate_and_workers_through_the_cli_with_a_remote_worker(tmp_path):
    import json

    from conftest import run_cli
    from safetensors_util import write_safetensors

    from imagegen.comfy import png

    checkpoint = write_safetensors(tmp_path / "remote-sd15.safetensors", {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ("F16", [320, 768])})
    with SimWorker(gpu_name="NVIDIA L40S", memory_total_mib=46068, step_seconds=0.002) as sim:
        env = {"IMAGEGEN_RUNTIME": "remote", "IMAGEGEN_REMOTE_WORKERS": sim.entry}
        refused = run_cli("generate", "a fox", "--checkpoint", str(checkpoint), "--size", "96x64", "--json", env=env)
        assert refused.returncode == 2 and "cannot read the local file" in refused.stderr.decode()
        result = run_cli("generate", "a remote fox", "-m", "sd15", "--size", "96x64", "--steps", "3",
                         "-o", str(tmp_path / "fox.png"), "--json", env=env)
        assert result.returncode == 0, result.stderr.decode()
        checkpoints = tmp_path / "imagegen-home" / "models" / "checkpoints"
        assert not checkpoints.exists(), "nothing is downloaded for a remote worker"
        assert png.png_size((tmp_path / "fox.png").read_bytes()) == (96, 64)
        assert json.loads(result.stdout)["worker"].startswith("remote-1")
        listed = [json.loads(line) for line in run_cli("workers", "--json", env=env).stdout.decode().splitlines()]
        assert listed[0]["gpu"]["name"] == "NVIDIA L40S" and sim.token not in json.dumps(listed)
