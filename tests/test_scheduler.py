"""The job loop (engine/scheduler.py) against simulated workers (tests/sim_comfy.py): any exception in
a worker thread settles its jobs (the run ends, every job exactly once, with its code); Ctrl-C and
faults stop only a worker this command started and nobody else uses; fast-mode compile time is not
learned as speed; a flat black image is warned about once; generate runs through the same loop."""

from __future__ import annotations

import _thread
import errno
import threading
import time
from dataclasses import replace

import pytest
import requests
import sim_comfy
from sim_comfy import SimWorker

from imagegen.comfy import workflows
from imagegen.comfy.client import ComfyClient, Timeouts
from imagegen.engine import generate, render, timings
from imagegen.engine.progress import Reporter
from imagegen.engine.routing import Router
from imagegen.engine.scheduler import Job, Scheduler
from imagegen.models.registry import Bundle, ModelFile
from imagegen.runtimes.remote import RemoteRuntime
from imagegen.util.errors import ImagegenError

DEADLINE = 120.0  # seconds: far beyond what these runs take on a loaded machine; only a hang reaches it


def bundle(name: str = "sim-model") -> Bundle:
    main = ModelFile(key=f"{name}.checkpoint", folder="checkpoints", filename=f"{name}.safetensors")
    return Bundle(name=name, family="sd15", files={"checkpoint": main})


def make_jobs(count: int, out_dir, steps: int = 4, size: int = 64, fast: bool = False) -> list[Job]:
    return [Job(key=f"job-{i}", bundle=bundle(), targets=[out_dir / f"job-{i}.png"],
                params=workflows.Params(f"prompt {i}", size, size, steps, 7.0, "euler", "normal", i, fast=fast,
                                        filename_prefix=f"imagegen/p{i}"))
            for i in range(count)]


class OwnedRuntime(RemoteRuntime):
    """Simulated workers as a runtime that starts its own (started_here) and can restart them; stop()
    is recorded, not done, so a test sees exactly which workers a command would have stopped."""
    can_restart = True

    def __init__(self, entries, started_here: bool = True, **kwargs):
        super().__init__(entries, **kwargs)
        self.started_here, self.stopped = started_here, []

    def ensure(self, slot=None, on_status=None, mounts=frozenset()):
        return replace(super().ensure(slot, on_status, mounts), started_here=self.started_here)

    def stop(self, slot=None):
        self.stopped.append(slot)
        return []


def scheduler_for(runtime, jobs, timeouts=None, **kwargs):
    outcomes = []
    scheduler = Scheduler(runtime, runtime.slots(), jobs, outcomes.append, lambda job, state: timeouts or Timeouts(),
                          {}, set(), **kwargs)
    return scheduler, outcomes


def run_with_deadline(scheduler) -> BaseException | None:
    """Run the scheduler; fail the test if it does not end (the bug being tested was a hang)."""
    raised = []

    def target():
        try:
            scheduler.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), "the run hung"
    return raised[0] if raised else None


def once_each(outcomes, jobs):
    keys = [outcome.job.key for outcome in outcomes]
    assert sorted(keys) == sorted(job.key for job in jobs), keys
    return {outcome.job.key: outcome for outcome in outcomes}


def failing_on_call(monkeypatch, target, name, exc, call: int):
    """Make target.name raise exc on its call-th call (1-based); every other call is the real one."""
    real, calls, lock = getattr(target, name), [], threading.Lock()

    def wrapper(*args, **kwargs):
        with lock:
            calls.append(1)
            mine = len(calls)
        if mine == call:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


# --- any exception settles its jobs -------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_on_the_second_image_fails_that_job_as_disk_full_and_the_run_ends(tmp_path, monkeypatch, workers):
    failing_on_call(monkeypatch, render.output, "write_atomic", OSError(errno.ENOSPC, "No space left on device"), 2)
    sims = [SimWorker(step_seconds=0.002) for _ in range(workers)]
    try:
        for sim in sims:
            sim.start()
        jobs = make_jobs(6, tmp_path)
        scheduler, outcomes = scheduler_for(RemoteRuntime([sim.entry for sim in sims]), jobs)
        assert run_with_deadline(scheduler) is None
    finally:
        for sim in sims:
            sim.close()
    ended = once_each(outcomes, jobs)
    failed = [o for o in ended.values() if o.error is not None]
    assert len(failed) == 1 and failed[0].error.code == "disk_full", [o.error for o in failed]
    assert "no space left" in failed[0].error.message and "Free disk space" in failed[0].error.hint
    assert sum(1 for o in ended.values() if o.records) == 5


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unexpected_exception_while_saving_fails_that_job_naming_it(tmp_path, monkeypatch, workers):
    failing_on_call(monkeypatch, render.png, "add_text_chunks", RuntimeError("a bug in the PNG code"), 3)
    sims = [SimWorker(step_seconds=0.002) for _ in range(workers)]
    try:
        for sim in sims:
            sim.start()
        jobs = make_jobs(5, tmp_path)
        scheduler, outcomes = scheduler_for(RemoteRuntime([sim.entry for sim in sims]), jobs)
        assert run_with_deadline(scheduler) is None
    finally:
        for sim in sims:
            sim.close()
    failed = [o.error for o in once_each(outcomes, jobs).values() if o.error is not None]
    assert [e.code for e in failed] == ["internal_error"] and "RuntimeError: a bug in the PNG code" in failed[0].message


def test_an_exception_outside_every_guarded_step_still_settles_the_workers_jobs(tmp_path, monkeypatch):
    """A bug anywhere in the worker thread (here: learning speeds) fails the jobs it held; the other
    worker's thread ends too instead of waiting in JobQueue.take for ever."""
    failing_on_call(monkeypatch, Router, "observe", NameError("name 'speeed' is not defined"), 2)
    with SimWorker(step_seconds=0.002) as a, SimWorker(step_seconds=0.002) as b:
        jobs = make_jobs(8, tmp_path)
        scheduler, outcomes = scheduler_for(RemoteRuntime([a.entry, b.entry]), jobs)
        assert run_with_deadline(scheduler) is None
    ended = once_each(outcomes, jobs)
    errors = [o.error for o in ended.values() if o.error is not None]
    assert errors and {e.code for e in errors} <= {"internal_error", "worker_died"}, errors
    assert any("NameError" in e.message for e in errors), errors


def test_an_http_error_answer_fails_the_job_and_a_vanished_source_file_fails_its_job(tmp_path, monkeypatch):
    response = requests.Response()
    response.status_code, response.url = 404, "http://127.0.0.1/view?filename=x.png"
    failing_on_call(monkeypatch, ComfyClient, "fetch_file", requests.HTTPError("404", response=response), 1)
    with SimWorker(step_seconds=0.002) as sim:
        jobs = make_jobs(3, tmp_path)
        jobs[2].inputs = {"init_image": tmp_path / "gone.png"}  # an input image deleted while the run went on
        scheduler, outcomes = scheduler_for(RemoteRuntime([sim.entry]), jobs)
        assert run_with_deadline(scheduler) is None
    ended = once_each(outcomes, jobs)
    codes = sorted(o.error.code for o in ended.values() if o.error is not None)
    assert codes == ["execution_failed", "invalid_source_image"], codes
    assert "gone.png" in ended["job-2"].error.message


def test_a_plain_exception_while_starting_a_worker_is_reported_and_the_others_do_the_work(tmp_path):
    class HalfBroken(RemoteRuntime):
        def ensure(self, slot=None, on_status=None, mounts=frozenset()):
            if slot == "remote-2" or self.broken:
                raise ValueError("a bug in ensure")
            return super().ensure(slot, on_status, mounts)

    with SimWorker(step_seconds=0.002) as a, SimWorker(step_seconds=0.002) as b:
        runtime = HalfBroken([a.entry, b.entry])
        runtime.broken = False
        jobs = make_jobs(4, tmp_path)
        scheduler, outcomes = scheduler_for(runtime, jobs)
        assert run_with_deadline(scheduler) is None
        assert all(o.error is None for o in once_each(outcomes, jobs).values())
        assert "worker_start_failed" in scheduler.workers[1].status
        runtime.broken = True
        raised = run_with_deadline(scheduler_for(runtime, make_jobs(1, tmp_path))[0])
    assert isinstance(raised, ImagegenError) and raised.code == "worker_start_failed" and "ValueError" in raised.message


def test_a_full_disk_in_on_outcome_ends_the_run_with_disk_full(tmp_path):
    def on_outcome(outcome):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "manifest.jsonl"))

    with SimWorker(step_seconds=0.002) as a, SimWorker(step_seconds=0.002) as b:
        runtime = RemoteRuntime([a.entry, b.entry])
        scheduler = Scheduler(runtime, runtime.slots(), make_jobs(6, tmp_path, steps=30), on_outcome,
                              lambda job, state: Timeouts(), {}, set())
        raised = run_with_deadline(scheduler)
        assert isinstance(raised, ImagegenError) and raised.code == "disk_full" and "manifest.jsonl" in raised.message
        deadline = time.monotonic() + 30
        while (a.server.running or b.server.running or a.server.pending or b.server.pending) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (a.server.pending or b.server.pending), "the prompts still queued were cancelled"


def test_as_error_names_every_kind_of_exception():
    assert render.as_error(OSError(errno.EDQUOT, "Disk quota exceeded")).code == "disk_full"
    assert render.as_error(requests.ConnectionError("refused")).code == "worker_unreachable"
    assert render.as_error(OSError(errno.EACCES, "Permission denied"), "/x/y.png").code == "output_not_writable"
    error = render.as_error(KeyError("images"))
    assert error.code == "internal_error" and "KeyError" in error.message
    original = ImagegenError("timeout", "stalled")
    assert render.as_error(original) is original


# --- only what this command started, and only when nobody else uses it ----------------------------

def long_graph(seed: int) -> dict:
    return workflows.build(bundle(), workflows.Params(f"other {seed}", 64, 64, 40, 7.0, "euler", "normal", seed))


def interrupt_when_running(sim, scheduler, before=None):
    """Press Ctrl-C (in the main thread) once one of the scheduler's prompts runs on the worker."""
    def press():
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            running = sim.server.running
            if running and running["id"] in scheduler.prompt_ids:
                break
            time.sleep(0.01)
        if before:
            before()
        _thread.interrupt_main()
    threading.Thread(target=press, daemon=True).start()


def test_ctrl_c_cancels_only_our_prompts_and_leaves_a_worker_another_command_uses(tmp_path):
    with SimWorker(step_seconds=0.05) as sim:
        runtime = OwnedRuntime([sim.entry])
        scheduler, _ = scheduler_for(runtime, make_jobs(3, tmp_path, steps=200))
        other = ComfyClient(sim.url, sim.token)
        theirs = []
        interrupt_when_running(sim, scheduler,
                               before=lambda: theirs.append(other.submit(long_graph(1), "another-command")))
        with pytest.raises(KeyboardInterrupt):
            scheduler.run()
        assert runtime.stopped == [], "another command's prompt is queued there: the worker must keep running"
        deadline = time.monotonic() + DEADLINE
        while other.history(theirs[0]) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        entry = other.history(theirs[0])
        assert entry and entry["status"]["completed"], "the other command's job still finishes"
        ours = [r for r in sim.records() if r["prompt_id"] in scheduler.prompt_ids]
        assert len(ours) == 1 and ours[0]["status"] == "error", "ours: the running one interrupted, the rest dropped"


def test_ctrl_c_stops_a_worker_this_command_started_when_nobody_else_uses_it(tmp_path):
    with SimWorker(step_seconds=0.05) as sim:
        runtime = OwnedRuntime([sim.entry])
        scheduler, _ = scheduler_for(runtime, make_jobs(2, tmp_path, steps=200))
        interrupt_when_running(sim, scheduler)
        with pytest.raises(KeyboardInterrupt):
            scheduler.run()
    assert runtime.stopped == ["remote-1"]


def test_ctrl_c_never_stops_a_worker_this_command_did_not_start(tmp_path):
    with SimWorker(step_seconds=0.05) as sim:
        runtime = OwnedRuntime([sim.entry], started_here=False)
        scheduler, _ = scheduler_for(runtime, make_jobs(2, tmp_path, steps=200))
        interrupt_when_running(sim, scheduler)
        with pytest.raises(KeyboardInterrupt):
            scheduler.run()
    assert runtime.stopped == []


def test_a_stall_on_a_worker_this_command_did_not_start_leaves_it_running(tmp_path):
    with SimWorker(step_seconds=0.05) as sim:
        runtime = OwnedRuntime([sim.entry], started_here=False, request_timeout=2, ready_timeout=0)
        scheduler, outcomes = scheduler_for(runtime, make_jobs(1, tmp_path, steps=400), Timeouts(load=1.5, stall=1.5),
                                            max_attempts=1, max_restarts=0)
        threading.Thread(target=lambda: (time.sleep(0.5), sim.hang()), daemon=True).start()
        try:
            assert run_with_deadline(scheduler) is None
        finally:
            sim.resume()
    [outcome] = outcomes
    assert outcome.error.code in ("timeout", "worker_unreachable") and "left running" in outcome.error.message
    assert runtime.stopped == []


def test_worker_failure_stops_only_a_worker_this_command_started():
    class Recording:
        def __init__(self):
            self.stopped = []

        def diagnose(self, worker):
            return None

        def stop(self, slot=None):
            self.stopped.append(slot)

    for started_here, stopped, fragment in ((False, [], "left running"), (True, ["0"], "fresh one")):
        runtime = Recording()
        worker = type("Handle", (), {"slot": "0", "started_here": started_here})()
        error = generate.worker_failure(runtime, worker, ImagegenError("timeout", "stalled", phase="sampling"))
        assert runtime.stopped == stopped and fragment in error.message


# --- learning and checking --------------------------------------------------------------------

def test_fast_mode_compile_time_is_not_learned_and_does_not_mark_the_worker_unhealthy(tmp_path):
    with SimWorker(step_seconds=0.01) as sim:
        runtime = RemoteRuntime([sim.entry])
        learning, _ = scheduler_for(runtime, make_jobs(4, tmp_path, steps=5), depth=1)
        assert run_with_deadline(learning) is None
        learned = learning.workers[0].speed
        assert learned and learning.workers[0].samples >= 3
        sim.set(step_seconds=0.3)  # the first compiled job: 30x its usual time
        compiled, outcomes = scheduler_for(runtime, make_jobs(1, tmp_path / "fast", steps=5, fast=True))
        assert run_with_deadline(compiled) is None
    assert outcomes[0].error is None
    state = compiled.workers[0]
    assert state.status == "done" and state.healthy, state.status
    assert state.speed == pytest.approx(learned), "compile time is not folded into the worker's speed"


def test_a_flat_black_image_is_warned_about_once(tmp_path, monkeypatch, capsys):
    def black(width, height, seed_text):
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (0, 0, 0)).save(buffer, "PNG")
        return buffer.getvalue()

    monkeypatch.setattr(sim_comfy, "png_bytes", black)
    with SimWorker(step_seconds=0.002) as sim:
        jobs = make_jobs(3, tmp_path)
        scheduler, outcomes = scheduler_for(RemoteRuntime([sim.entry]), jobs, reporter=Reporter(quiet=True))
        assert run_with_deadline(scheduler) is None
    assert all(o.error is None for o in outcomes)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "VAE" in warnings[0] and "--fast" in warnings[0], warnings


def test_looks_blank_only_for_one_flat_dark_colour():
    import io

    from PIL import Image

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()

    assert render.looks_blank(png(Image.new("RGB", (32, 32), (0, 0, 0))))
    assert not render.looks_blank(png(Image.new("RGB", (32, 32), (128, 128, 128))))
    assert not render.looks_blank(sim_comfy.png_bytes(32, 32, "a picture"))
    assert not render.looks_blank(b"not a png")


# --- generate runs through the same loop ----------------------------------------------------------

def test_generate_runs_through_the_scheduler_in_order(tmp_path):
    from imagegen.engine import output

    with SimWorker(step_seconds=0.002) as sim:
        request = generate.Request(prompt="a fox", model="sd15", size="64x64", steps=3, count=3, seed=7,
                                   output=str(tmp_path) + "/")
        records = list(generate.execute(generate.plan(request), RemoteRuntime([sim.entry]), Reporter(quiet=True)))
        assert [r["seed"] for r in records] == [7, 8, 9]
        assert all(output.RESULT_SCHEMA == r["schema"] and (tmp_path / r["path"]).is_file() for r in records)
        sim.fail_next("CUDA error: an illegal memory access")
        request = replace(request, seed=20)
        with pytest.raises(ImagegenError) as caught:
            list(generate.execute(generate.plan(request), RemoteRuntime([sim.entry]), Reporter(quiet=True)))
    assert caught.value.code == "execution_failed" and "illegal memory access" in caught.value.message


def test_a_timeout_far_below_the_learned_estimate_is_refused_before_anything_is_queued(tmp_path):
    timings.record("sd15", 64, 64, "cuda", {"sampling": 600.0, "loading": 5.0, "finishing": 1.0}, steps=20)
    timeouts, explicit = generate.timeouts_from_env(5)
    request = generate.Request(prompt="a fox", model="sd15", size="64x64", steps=20, output=str(tmp_path / "fox.png"),
                               timeouts=timeouts, explicit_timeouts=explicit)
    with SimWorker(step_seconds=0.002) as sim:
        with pytest.raises(ImagegenError) as caught:
            list(generate.execute(generate.plan(request), RemoteRuntime([sim.entry]), Reporter(quiet=True)))
        assert sim.records() == [] and not sim.server.pending, "nothing was queued"
    assert caught.value.code == "invalid_argument" and caught.value.exit_code == 2
    assert "--timeout 5s" in caught.value.message and "606s" in caught.value.message
    assert "--timeout 909" in caught.value.hint


def test_a_closed_stdout_ends_generate_with_the_broken_pipe_itself(monkeypatch):
    """`-o - | head -c 10`: the BrokenPipeError reaches the CLI (exit 141), not a failed job's internal_error."""
    def closed(data):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(render.output, "write_stdout", closed)
    with SimWorker(step_seconds=0.002) as sim:
        request = generate.Request(prompt="a fox", model="sd15", size="64x64", steps=2, output="-")
        with pytest.raises(BrokenPipeError):
            list(generate.execute(generate.plan(request), RemoteRuntime([sim.entry]), Reporter(quiet=True)))


def test_a_slow_job_on_the_only_worker_of_a_generate_call_does_not_fail_the_rest(tmp_path):
    """The 5x-slower verdict takes a worker out of a rotation; with one worker and no restarts (generate)
    there is none, so the remaining jobs still run there."""
    with SimWorker(step_seconds=0.01) as sim:
        runtime = OwnedRuntime([sim.entry])
        learning, _ = scheduler_for(runtime, make_jobs(4, tmp_path, steps=5), depth=1)
        assert run_with_deadline(learning) is None
        sim.set(step_seconds=0.3)
        jobs = make_jobs(2, tmp_path / "slow", steps=5)
        scheduler, outcomes = scheduler_for(runtime, jobs, depth=1, max_attempts=1, max_restarts=0)
        assert run_with_deadline(scheduler) is None
    assert [o.error for o in once_each(outcomes, jobs).values()] == [None, None]
    assert runtime.stopped == []


def test_a_shared_worker_that_dies_for_good_ends_the_run_instead_of_waiting_for_ever(tmp_path):
    """A worker this command did not start is not stopped, but starting it again is still bounded."""
    class GoneAfterFirst(OwnedRuntime):
        calls = 0

        def ensure(self, slot=None, on_status=None, mounts=frozenset()):
            self.calls += 1
            if self.calls > 1:
                raise ImagegenError("worker_start_failed", "the worker is gone")
            return super().ensure(slot, on_status, mounts)

    with SimWorker(step_seconds=0.02) as sim:
        runtime = GoneAfterFirst([sim.entry], started_here=False, request_timeout=2, ready_timeout=0)
        jobs = make_jobs(3, tmp_path, steps=50)
        scheduler, outcomes = scheduler_for(runtime, jobs)

        def kill_once_running():
            deadline = time.monotonic() + DEADLINE
            while sim.server.running is None and time.monotonic() < deadline:
                time.sleep(0.01)
            sim.die()

        threading.Thread(target=kill_once_running, daemon=True).start()
        assert run_with_deadline(scheduler) is None
    ended = once_each(outcomes, jobs)
    assert all(o.error is not None for o in ended.values()) and runtime.stopped == []


def test_a_timeout_far_below_the_estimate_is_refused_before_a_local_worker_starts(tmp_path):
    from imagegen.runtimes.local import LocalRuntime

    class NeverStarted(LocalRuntime):
        def ensure(self, slot=None, on_status=None, mounts=frozenset()):
            raise AssertionError("a worker was started for a call that was refused")

    from imagegen.util.gpus import detect_device

    timings.record("sd15", 64, 64, detect_device(), {"sampling": 600.0, "loading": 5.0, "finishing": 1.0}, steps=20)
    timeouts, explicit = generate.timeouts_from_env(5)
    request = generate.Request(prompt="a fox", model="sd15", size="64x64", steps=20, output=str(tmp_path / "fox.png"),
                               timeouts=timeouts, explicit_timeouts=explicit)
    with pytest.raises(ImagegenError) as caught:
        list(generate.execute(generate.plan(request), NeverStarted(), Reporter(quiet=True), fetch=lambda *a: None))
    assert caught.value.code == "invalid_argument" and "601s" in caught.value.message
