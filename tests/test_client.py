"""ComfyClient against workers whose ComfyUI is newer than the pin (tests/sim_comfy.py): the worker's own
sampler and scheduler names (/object_info) and its ComfyUI version (/system_stats) are what count."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from sim_comfy import SimWorker

from imagegen.comfy import choices
from imagegen.comfy.client import ComfyClient, Timeouts
from imagegen.comfy.workflows import SAMPLERS, SCHEDULERS, Params, build
from imagegen.engine import generate
from imagegen.engine.scheduler import Job, Scheduler
from imagegen.models.registry import Bundle, ModelFile
from imagegen.runtimes.remote import RemoteRuntime
from imagegen.util.errors import ImagegenError

NEW_SAMPLER = "exp_heun_2_x0"


def bundle() -> Bundle:
    return Bundle(name="sim-model", family="sd15", files={"checkpoint": ModelFile(
        key="sim-model.checkpoint", folder="checkpoints", filename="sim-model.safetensors")})


def params(sampler: str = "euler", scheduler: str = "normal", seed: int = 1) -> Params:
    return Params(prompt="p", width=64, height=64, steps=2, cfg=7.0, sampler=sampler, scheduler=scheduler, seed=seed,
                  filename_prefix=f"imagegen/t{seed}")


def run_jobs(sim: SimWorker, jobs: list[Job]):
    runtime = RemoteRuntime([sim.entry])
    outcomes = []
    scheduler = Scheduler(runtime, runtime.slots(), jobs, outcomes.append, lambda job, state: Timeouts(), {}, set(),
                          depth=1)
    scheduler.run()
    return outcomes


def test_the_pinned_lists_are_read_from_both_object_info_styles():
    old = {"KSampler": {"input": {"required": {"sampler_name": [list(SAMPLERS), {}], "scheduler": [list(SCHEDULERS)]}}}}
    new = {"KSampler": {"input": {"required": {"sampler_name": ["COMBO", {"options": [*SAMPLERS, NEW_SAMPLER]}],
                                               "scheduler": ["COMBO", {"options": list(SCHEDULERS)}]}}}}
    assert choices.from_object_info(old) == (SAMPLERS, SCHEDULERS)
    assert choices.from_object_info(new) == ((*SAMPLERS, NEW_SAMPLER), SCHEDULERS)
    assert choices.from_object_info({}) is None
    assert choices.from_object_info({"KSampler": {"input": {"required": {"sampler_name": "INT"}}}}) is None


def test_up_front_a_name_outside_the_pinned_list_waits_for_the_worker_and_nonsense_is_refused():
    request = generate.Request(prompt="p", sampler=NEW_SAMPLER)
    [job] = generate.plan_jobs(request, bundle())
    assert job.sampler == NEW_SAMPLER
    for sampler in ("euler a", "Euler", "../x"):
        with pytest.raises(ImagegenError) as caught:
            generate.plan_jobs(generate.Request(prompt="p", sampler=sampler), bundle())
        assert caught.value.code == "invalid_argument"
        assert "euler_ancestral" in caught.value.hint
    with pytest.raises(ImagegenError) as caught:
        generate.plan_jobs(generate.Request(prompt="p", scheduler="Karras"), bundle())
    assert caught.value.code == "invalid_argument" and "karras" in caught.value.hint


def test_a_newer_comfyuis_sampler_renders_and_its_version_is_recorded(tmp_path):
    with SimWorker(step_seconds=0.002, comfyui_version="0.33.0", samplers=(*SAMPLERS, NEW_SAMPLER),
                   combo_inputs=True) as sim:
        jobs = [Job(key="new", bundle=bundle(), params=params(NEW_SAMPLER), targets=[tmp_path / "new.png"])]
        [outcome] = run_jobs(sim, jobs)
        assert outcome.error is None, outcome.error
        [record] = outcome.records
        assert record["sampler"] == NEW_SAMPLER
        assert record["comfyui_version"] == "0.33.0"
        embedded = json.loads(Image.open(tmp_path / "new.png").text["imagegen"])
        assert embedded["comfyui_version"] == "0.33.0" and embedded["sampler"] == NEW_SAMPLER
        assert sim.server.object_info_requests == 1


def test_a_sampler_the_worker_lacks_is_invalid_argument_listing_the_workers_names(tmp_path):
    with SimWorker(step_seconds=0.002) as sim:
        jobs = [Job(key="new", bundle=bundle(), params=params(NEW_SAMPLER), targets=[tmp_path / "new.png"]),
                Job(key="ok", bundle=bundle(), params=params(seed=2), targets=[tmp_path / "ok.png"])]
        outcomes = {outcome.job.key: outcome for outcome in run_jobs(sim, jobs)}
        error = outcomes["new"].error
        assert error is not None and error.code == "invalid_argument", error
        assert f"--sampler {NEW_SAMPLER!r} is not a sampler of the worker's ComfyUI 0.3.75" == error.message
        assert error.hint.startswith("Its samplers: euler, ") and "uni_pc_bh2" in error.hint
        assert not (tmp_path / "new.png").exists()
        assert outcomes["ok"].error is None and (tmp_path / "ok.png").is_file()  # the worker is fine


def test_the_workers_lists_and_version_are_asked_once_per_process():
    with SimWorker(step_seconds=0.002, comfyui_version="0.34.1", samplers=(*SAMPLERS, NEW_SAMPLER)) as sim:
        client = ComfyClient(sim.url, sim.token)
        client.check_choices(build(bundle(), params("dpmpp_2m", "karras")))
        assert sim.server.object_info_requests == 0
        for _ in range(3):
            ComfyClient(sim.url, sim.token).check_choices(build(bundle(), params(NEW_SAMPLER)))
            assert ComfyClient(sim.url, sim.token).comfyui_version() == "0.34.1"
        assert sim.server.object_info_requests == 1
        with pytest.raises(ImagegenError) as caught:
            client.check_choices(build(bundle(), params(NEW_SAMPLER, "exp_schedule")))
        assert caught.value.message == "--scheduler 'exp_schedule' is not a scheduler of the worker's ComfyUI 0.34.1"


def test_a_worker_that_cannot_say_falls_back_to_comfyuis_own_validation():
    with SimWorker(step_seconds=0.002, plain=True, token=None) as sim:
        client = ComfyClient(sim.url + "/nothing-here")
        assert client.choices() is None and client.comfyui_version() is None
        client.check_choices(build(bundle(), params(NEW_SAMPLER)))  # no list: ComfyUI decides on submit


def test_an_imagegen_workers_info_answers_the_version_without_another_request():
    with SimWorker(step_seconds=0.002, comfyui_version="0.35.2") as sim:
        client = ComfyClient(sim.url, sim.token)
        assert client.worker_info()["comfyui_version"] == "0.35.2"
        sim.server.config.comfyui_version = "changed"  # /system_stats would now say otherwise
        assert ComfyClient(sim.url, sim.token).comfyui_version() == "0.35.2"
