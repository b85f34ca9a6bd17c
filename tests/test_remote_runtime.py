"""RemoteRuntime against simulated workers (tests/sim_comfy.py) of set GPU sizes and speeds, and the
simulator itself held to the client protocol: progress per step, load time on a model change,
latent batches, the bearer token, and its faults (hang, die, a failing prompt)."""

from __future__ import annotations

import io
import itertools
import json
import threading
import time

import pytest
import requests
from PIL import Image
from sim_comfy import SimWorker, run_graph

from imagegen.comfy.client import ComfyClient, Timeouts, output_images
from imagegen.comfy.workflows import Params, build
from imagegen.engine import render
from imagegen.engine.scheduler import Job, Scheduler
from imagegen.models.registry import Bundle, ModelFile
from imagegen.runtimes.remote import ENV, TOKEN_FILE_ENV, RemoteRuntime, parse_entries
from imagegen.util.errors import ImagegenError


def bundle(name: str = "sim-model") -> Bundle:
    return Bundle(name=name, family="sd15",
                  files={"checkpoint": ModelFile(key=f"{name}.checkpoint", folder="checkpoints",
                                                                           filename=f"{name}.safetensors")})


def params(seed: int = 1, steps: int = 5, width: int = 64, height: int = 64, batch_size: int = 1) -> Params:
    return Params(prompt=f"prompt {seed}", width=width, height=height, steps=steps, cfg=7.0, sampler="euler",
                  scheduler="normal", seed=seed, batch_size=batch_size, filename_prefix=f"imagegen/p{seed}")


def make_jobs(count: int, out_dir, steps: int = 5, model: str = "sim-model") -> list[Job]:
    return [Job(key=f"job-{i}", bundle=bundle(model), params=params(i, steps), targets=[out_dir / f"job-{i}.png"])
            for i in range(count)]


def run_scheduler(runtime, jobs, depth: int = 2, timeouts: Timeouts | None = None, on_outcome=None):
    outcomes = []

    def collect(outcome):
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcomes)

    scheduler = Scheduler(runtime, runtime.slots(), jobs, collect, lambda job, state: timeouts or Timeouts(), {}, set(),
                          depth=depth)
    scheduler.run()
    return outcomes, scheduler


# --- configuration --------------------------------------------------------------------------

def test_entries_take_tokens_inline_from_files_or_a_default_file(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_REMOTE_INSECURE", "1")  # these hosts are not loopback and plain http
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    remotes = parse_entries(" http://gpu-a:8188/#inline , "
                            f"https://gpu-b.example/comfy#@{token_file},http://10.0.0.3:9000")
    assert [(r.slot, r.url, r.token) for r in remotes] == [
        ("remote-1", "http://gpu-a:8188", "inline"), ("remote-2", "https://gpu-b.example/comfy", "from-file"),
        ("remote-3", "http://10.0.0.3:9000", "")]
    assert "inline" not in repr(remotes[0]) and remotes[0].name == "remote-1@gpu-a:8188"
    monkeypatch.setenv(ENV, "http://a:1,http://b:2#own")
    monkeypatch.setenv(TOKEN_FILE_ENV, str(token_file))
    assert [r.token for r in parse_entries()] == ["from-file", "own"]


@pytest.mark.parametrize("entry",
                         ["http://gpu-box:8188#s3cret", "http://10.0.0.3:9000#s3cret", "http://[fe80::1]:8188#s3cret"])
def test_a_token_over_plain_http_to_another_host_is_refused_unless_opted_in(entry, monkeypatch):
    monkeypatch.delenv("IMAGEGEN_REMOTE_INSECURE", raising=False)
    with pytest.raises(ImagegenError) as caught:
        parse_entries(entry)
    assert caught.value.code == "invalid_argument" and "unencrypted" in caught.value.message
    assert "https://" in caught.value.hint and "IMAGEGEN_REMOTE_INSECURE=1" in caught.value.hint
    monkeypatch.setenv("IMAGEGEN_REMOTE_INSECURE", "1")
    assert parse_entries(entry)[0].token == "s3cret"


def test_loopback_https_and_tokenless_entries_need_no_opt_in(monkeypatch):
    monkeypatch.delenv("IMAGEGEN_REMOTE_INSECURE", raising=False)
    entries = "http://127.0.0.1:8188#a,http://localhost:9#b,http://[::1]:7#c,https://gpu-box:443#d,http://gpu-box:8188"
    assert [r.token for r in parse_entries(entries)] == ["a", "b", "c", "d", ""]


@pytest.mark.parametrize("entry, fragment", [
    ("gpu-box:8188", "not an http(s)"), ("ftp://gpu-box", "not an http(s)"),
    ("http://user:pw@gpu-box", "not an http(s)"),
    ("http://gpu-box:99999", "bad port"), ("http://a:1,http://a:1/", "listed twice"),
    ("http://a:1#@/no/such/file", "cannot read the token file"),
])
def test_bad_entries_are_usage_errors(entry, fragment):
    with pytest.raises(ImagegenError) as caught:
        parse_entries(entry)
    assert caught.value.code == "invalid_argument" and fragment in caught.value.message
    assert "IMAGEGEN_REMOTE_WORKERS" in caught.value.hint


def test_no_entries_means_the_runtime_is_unavailable(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ImagegenError) as caught:
        RemoteRuntime()
    assert caught.value.code == "runtime_unavailable"


# --- finding, describing and diagnosing workers ---------------------------------------------

def test_an_imagegen_worker_is_found_and_renders_through_the_client():
    with SimWorker(step_seconds=0.002, gpu_name="NVIDIA GeForce RTX 4090", memory_total_mib=24564) as sim:
        runtime = RemoteRuntime([sim.entry])
        assert runtime.slots() == ["remote-1"]
        handle = runtime.ensure("remote-1", mounts={"/somewhere"})
        assert (handle.runtime, handle.device, handle.started_here, handle.url, handle.token) == ("remote", "cuda",
                                                                                                  False, sim.url,
                                                                                                  sim.token)
        assert handle.info["kind"] == "imagegen" and handle.info["gpu"]["name"] == "NVIDIA GeForce RTX 4090"
        assert handle.info["gpu"]["memory_total_mib"] == 24564 and handle.info["gpu"]["uuid"].startswith("GPU-")
        client = handle.client()
        entry = run_graph(client, build(bundle(), params(steps=3, width=96, height=64)))
        [ref] = output_images(entry)
        assert Image.open(io.BytesIO(client.fetch_file(ref))).size == (96, 64)
        assert runtime.ensure().name == handle.name  # the default slot is the first
        assert runtime.stop() == [] and runtime.stop("remote-1") == []
        assert runtime.diagnose(handle) is None  # stop() left it running


def test_the_token_is_required_everywhere_but_health():
    with SimWorker() as sim:
        assert requests.get(f"{sim.url}/imagegen/health", timeout=5).status_code == 200
        for method, path in (("GET", "/imagegen/info"), ("POST", "/prompt"), ("GET", "/history/x"), ("GET", "/queue"),
                             ("GET", "/view"), ("GET", "/system_stats"), ("GET", "/ws?clientId=x")):
            assert requests.request(method, sim.url + path, timeout=5).status_code == 401, path
            wrong = {"Authorization": "Bearer nope"}
            assert requests.request(method, sim.url + path, headers=wrong, timeout=5).status_code == 401, path
        with pytest.raises(ImagegenError) as caught:
            RemoteRuntime([f"{sim.url}#wrong-token"]).ensure()
        assert caught.value.code == "worker_unreachable" and "refused our credentials" in caught.value.message
        assert "URL#TOKEN" in caught.value.hint
        assert ComfyClient(sim.url, None).open_events("x") is None  # the websocket refuses it too


def test_a_plain_comfyui_is_detected_through_system_stats():
    with SimWorker(plain=True, token=None, gpu_name="NVIDIA H100 80GB HBM3", memory_total_mib=81559,
                   memory_free_mib=80000) as sim, \
            SimWorker(plain=True, token=None, device="cpu") as cpu:
        runtime = RemoteRuntime([sim.url, cpu.url])
        handle = runtime.ensure("remote-1")
        assert (handle.device, handle.info["kind"], handle.token) == ("cuda", "comfyui", "")
        assert handle.info["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "uuid": None, "memory_total_mib": 81559,
                                      "memory_free_mib": 80000}
        entry = run_graph(handle.client(), build(bundle(), params(steps=2)))
        assert len(output_images(entry)) == 1
        on_cpu = runtime.ensure("remote-2")
        assert on_cpu.device == "cpu" and on_cpu.info["gpu"] is None
        assert runtime.diagnose(handle) is None


def test_workers_lists_every_entry_and_never_shows_a_token():
    with SimWorker(gpu_name="RTX A4000", memory_total_mib=16376) as sim:
        dead = SimWorker()
        dead.start()
        dead.die()
        runtime = RemoteRuntime([sim.entry, dead.entry], request_timeout=2)
        listed = runtime.workers()
        assert [(w["slot"], w["healthy"]) for w in listed] == [("remote-1", True), ("remote-2", False)]
        assert listed[0]["gpu"]["name"] == "RTX A4000" and listed[0]["device"] == "cuda"
        assert listed[0]["runtime"] == "remote"
        assert "connection refused" in listed[1]["error"] and listed[1]["device"] == "unknown"
        assert sim.token not in json.dumps(listed) and dead.token not in json.dumps(listed)
        started = time.monotonic()
        with pytest.raises(ImagegenError) as caught:
            runtime.ensure("remote-2")
        assert caught.value.code == "worker_unreachable" and "does not start remote workers" in caught.value.hint
        assert time.monotonic() - started < 2
        assert runtime.find("remote-2") is None and runtime.find("remote-1").slot == "remote-1"
        dead.close()


def test_slots_choose_by_count_name_url_or_gpu_uuid():
    with SimWorker(gpu_uuid="GPU-aaaa-1111") as a, SimWorker(gpu_uuid="GPU-bbbb-2222") as b, SimWorker() as c:
        runtime = RemoteRuntime([a.entry, b.entry, c.entry])
        assert runtime.slots() == runtime.slots("all") == ["remote-1", "remote-2", "remote-3"]
        assert runtime.slots("2") == ["remote-1", "remote-2"]
        assert runtime.slots(f"remote-3,{a.url}/") == ["remote-3", "remote-1"]
        assert runtime.slots("GPU-bbbb") == ["remote-2"]
        assert runtime.slots("device=GPU-aaaa-1111,remote-1") == ["remote-1"]
        for bad in ("4", "remote-9", "GPU-cccc"):
            with pytest.raises(ImagegenError, match="--gpus"):
                runtime.slots(bad)


def test_diagnose_tells_a_hung_worker_from_a_dead_one():
    with SimWorker() as sim:
        runtime = RemoteRuntime([sim.entry], request_timeout=1, ready_timeout=0)
        handle = runtime.ensure()
        sim.hang()
        try:
            cause = runtime.diagnose(handle)
            assert cause.code == "worker_unreachable" and "may hang" in cause.message
            with pytest.raises(ImagegenError, match="may hang"):
                runtime.ensure()
        finally:
            sim.resume()
        assert runtime.diagnose(handle) is None  # it rejoins once it answers
        sim.die()
        assert "connection refused" in runtime.diagnose(handle).message


def test_a_worker_that_is_not_ready_is_waited_for_then_reported(monkeypatch):
    with SimWorker() as sim:
        runtime = RemoteRuntime([sim.entry], ready_timeout=1.5)
        real_get = requests.get
        answers = itertools.chain([503, 503, 200], itertools.repeat(503))

        def fake_get(url, **kwargs):
            response = real_get(url, **kwargs)
            if url.endswith("/imagegen/health"):
                response.status_code = next(answers)
            return response

        monkeypatch.setattr(requests, "get", fake_get)
        said = []
        assert runtime.ensure(on_status=said.append).info["kind"] == "imagegen"
        assert said == [f"waiting for the remote worker {runtime.remotes[0].name} to become ready"]
        with pytest.raises(ImagegenError, match="not ready"):
            runtime.ensure()


def test_process_mode_hangs_like_sigstop_and_dies_like_a_crash():
    with SimWorker(mode="process", step_seconds=0.001) as sim:
        runtime = RemoteRuntime([sim.entry], request_timeout=1, ready_timeout=0)
        handle = runtime.ensure()
        run_graph(handle.client(), build(bundle(), params(steps=2)))
        assert [r["status"] for r in sim.records()] == ["success"]
        sim.hang()
        assert "may hang" in runtime.diagnose(handle).message
        sim.resume()
        assert runtime.diagnose(handle) is None
        sim.die()
        assert "connection refused" in runtime.diagnose(handle).message
        assert len(sim.records()) == 1  # kept from before it died


# --- the simulator's rendering ---------------------------------------------------------------

def test_sim_renders_with_progress_load_time_and_latent_batches():
    with SimWorker(step_seconds=0.01, load_seconds=0.3, finish_seconds=0.0) as sim:
        client = ComfyClient(sim.url, sim.token)
        seen = []
        started = time.monotonic()
        entry = run_graph(client, build(bundle("a"), params(1, steps=8, width=64, height=48, batch_size=3)),
                           on_progress=lambda state: seen.append((state.phase, state.step, state.total)))
        first = time.monotonic() - started
        assert [s for s in seen if s[0] == "sampling"][-1][1:] == (8, 8)
        assert len({s[1] for s in seen if s[0] == "sampling"}) == 8  # one progress event per step
        refs = output_images(entry)
        assert len(refs) == 3 and len({r["filename"] for r in refs}) == 3
        assert {Image.open(io.BytesIO(client.fetch_file(r))).size for r in refs} == {(64, 48)}
        assert entry["status"]["completed"] and [m[0] for m in entry["status"]["messages"]][-1] == "execution_success"
        run_graph(client, build(bundle("a"), params(2, steps=8)))
        run_graph(client, build(bundle("b"), params(3, steps=8)))
        records = sim.records()
        assert [r["loaded"] for r in records] == [True, False,
                                                  True] and [r["model"] for r in records] == ["a.safetensors",
                                                                                              "a.safetensors",
                                                                                              "b.safetensors"]
        assert first >= 0.3 + 8 * 0.01 and records[1]["finished"] - records[1]["started"] < 0.3
        info = client.worker_info()
        assert info["last_model"] == "b.safetensors" and info["jobs_done"] == 3
        assert client.history("no-such-id") is None and client.queue() == {"queue_running": [], "queue_pending": []}


def test_sim_reports_failures_out_of_memory_and_interrupts():
    with SimWorker(step_seconds=0.05, memory_total_mib=8192, model_mib={"big.safetensors": 12000}) as sim:
        client = ComfyClient(sim.url, sim.token)
        sim.fail_next("mat1 and mat2 shapes cannot be multiplied (77x2048 and 768x320)")
        with pytest.raises(ImagegenError) as caught:
            run_graph(client, build(bundle(), params()))
        assert caught.value.code == "execution_failed" and caught.value.hint.startswith("The text encoder")
        with pytest.raises(ImagegenError) as caught:
            run_graph(client, build(bundle("big"), params()))
        assert caught.value.code == "out_of_memory"
        assert client.worker_info()["gpu"]["memory_free_mib"] == 8192
        run_graph(client, build(bundle(), params(steps=1)))  # the next prompt runs as usual
        with client.session() as session:
            prompt_id = session.submit(build(bundle(), params(steps=200)))
            while session.states[prompt_id].phase != "sampling":
                session._receive()
            client.cancel([prompt_id])
            with pytest.raises(ImagegenError) as caught:
                session.next_finished()
            assert caught.value.code == "interrupted"
        assert [r["status"] for r in sim.records()] == ["error", "error", "success", "error"]


def test_sim_rejects_a_graph_without_outputs():
    with SimWorker() as sim:
        with pytest.raises(ImagegenError) as caught:
            ComfyClient(sim.url, sim.token).submit({"x": {"class_type": "CheckpointLoaderSimple", "inputs": {}}}, "c")
        assert caught.value.code == "graph_rejected" and "no outputs" in caught.value.message


# --- the scheduler over remote workers ---------------------------------------------------------

def test_a_faster_remote_worker_takes_more_jobs(tmp_path):
    # 5x apart and long enough (0.1 s against 0.5 s a job) that a busy machine's overhead cannot even them out
    with SimWorker(step_seconds=0.01, name="fast") as fast, SimWorker(step_seconds=0.05, name="slow") as slow:
        runtime = RemoteRuntime([fast.entry, slow.entry])
        outcomes, scheduler = run_scheduler(runtime, make_jobs(30, tmp_path, steps=10))
        assert all(o.error is None for o in outcomes) and len(outcomes) == 30
        assert all((tmp_path / f"job-{i}.png").is_file() for i in range(30))
        done = {state.slot: state.done for state in scheduler.workers}
        assert done["remote-1"] > 2 * done["remote-2"] > 0, done
        assert len(fast.records()) == done["remote-1"] and len(slow.records()) == done["remote-2"]
        assert {o.worker for o in outcomes} == {runtime.remotes[0].name, runtime.remotes[1].name}


def test_a_dead_remote_workers_jobs_finish_elsewhere(tmp_path):
    with SimWorker(step_seconds=0.005, name="a") as a, SimWorker(step_seconds=0.05, name="b") as b:
        runtime = RemoteRuntime([a.entry, b.entry], request_timeout=2, ready_timeout=0)

        def kill_b_once_it_runs():
            deadline = time.monotonic() + 20
            while b.server.running is None and time.monotonic() < deadline:
                time.sleep(0.01)
            b.die()

        killer = threading.Thread(target=kill_b_once_it_runs)
        killer.start()
        outcomes, scheduler = run_scheduler(runtime, make_jobs(12, tmp_path, steps=10))
        killer.join()
        assert sorted(o.job.key for o in outcomes if o.error is None) == sorted(f"job-{i}" for i in range(12))
        assert {o.worker for o in outcomes} == {runtime.remotes[0].name}
        assert "worker_unreachable" in scheduler.workers[1].status  # it left the batch; nothing restarted it


def test_a_hung_remote_worker_is_routed_around(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "REQUEST_TIMEOUT", 1.0)
    with SimWorker(step_seconds=0.005, name="a") as a, SimWorker(step_seconds=0.05, name="b") as b:
        runtime = RemoteRuntime([a.entry, b.entry], request_timeout=1, ready_timeout=0)

        def hang_b_once_it_runs():
            deadline = time.monotonic() + 20
            while b.server.running is None and time.monotonic() < deadline:
                time.sleep(0.01)
            b.hang()

        def resume_b_when_all_done(outcomes):
            if len(outcomes) == 12:
                b.resume()  # only now: leaving its session asks the hung worker to drop its prompts

        hanger = threading.Thread(target=hang_b_once_it_runs)
        hanger.start()
        started = time.monotonic()
        try:
            outcomes, scheduler = run_scheduler(runtime, make_jobs(12, tmp_path, steps=10),
                                                timeouts=Timeouts(stall=1.0),
                                                on_outcome=resume_b_when_all_done)
        finally:
            b.resume()
            hanger.join()
        assert sorted(o.job.key for o in outcomes if o.error is None) == sorted(f"job-{i}" for i in range(12))
        assert {o.worker for o in outcomes} == {runtime.remotes[0].name}
        assert time.monotonic() - started < 20


def test_a_failing_prompt_is_recorded_and_the_batch_goes_on(tmp_path):
    with SimWorker(step_seconds=0.002) as sim:
        sim.fail_next("CUDA error: an illegal memory access was encountered")
        outcomes, _ = run_scheduler(RemoteRuntime([sim.entry]), make_jobs(5, tmp_path), depth=1)
        failed = [o for o in outcomes if o.error is not None]
        assert len(outcomes) == 5 and len(failed) == 1 and failed[0].error.code == "execution_failed"
        assert "illegal memory access" in failed[0].error.message


def test_depth_two_closes_the_idle_gap_between_jobs(tmp_path):
    # Not a timing threshold (a loaded machine stretches every gap): with depth 2 the next job is already
    # queued in ComfyUI when the one before it finishes, so the worker never waits on a round trip.
    # Jobs of ~0.2 s leave the CLI time to save one image and queue the next even on a busy machine.
    queued_ahead = {}
    for depth in (1, 2):
        with SimWorker(step_seconds=0.035) as sim:
            outcomes, _ = run_scheduler(RemoteRuntime([sim.entry]), make_jobs(10, tmp_path / str(depth), steps=6),
                                        depth=depth)
            assert all(o.error is None for o in outcomes)
            ordered = sorted(sim.records(), key=lambda r: r["started"])
            queued_ahead[depth] = sum(b["submitted"] < a["finished"] for a, b in itertools.pairwise(ordered))
    assert queued_ahead[1] == 0 and queued_ahead[2] >= 8, queued_ahead


def test_the_scheduler_drives_a_plain_comfyui(tmp_path):
    with SimWorker(plain=True, token=None, step_seconds=0.002, gpu_name="NVIDIA L4", memory_total_mib=22700) as sim:
        outcomes, scheduler = run_scheduler(RemoteRuntime([sim.url]), make_jobs(4, tmp_path))
        assert [o.error for o in outcomes] == [None] * 4
        assert scheduler.workers[0].gpu["name"] == "NVIDIA L4"
