import pytest

from imagegen.comfy import workflows
from imagegen.engine import routing
from imagegen.engine.scheduler import Job, WorkerState
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError

GIB = 1024 ** 3
REGISTRY = Registry.load()


def job(model, size=512, steps=20, quality=False, key=None):
    params = workflows.Params("x", size, size, steps, 7.0, "euler", "normal", 1)
    return Job(key=key or f"{model}-{size}", bundle=REGISTRY.get(model), params=params, targets=[], quality=quality)


def worker(slot, gib, speed=None, busy=()):
    state = WorkerState(slot, name=slot, status="ready", memory_bytes=gib * GIB, speed=speed)
    for index, queued in enumerate(busy):
        state.inflight[f"p{index}"] = (queued, 0.0)
    return state


def test_memory_estimates_grow_with_model_size_and_batch():
    small = routing.estimate_bytes(REGISTRY.get("sd15"), job("sd15").params)
    big = routing.estimate_bytes(REGISTRY.get("sdxl"), job("sdxl", 1024).params)
    assert 2 * GIB < small < 6 * GIB and 8 * GIB < big < 14 * GIB
    batch = job("sd15").params
    batch.batch_size = 8
    assert routing.estimate_bytes(REGISTRY.get("sd15"), batch) > small + GIB
    assert routing.model_bytes(REGISTRY.get("flux-dev-fp8")) < 0.6 * routing.model_bytes(REGISTRY.get("flux-dev"))


def test_a_job_too_large_for_a_small_gpu_never_goes_there():
    gpus = [worker("16g", 16), worker("8g", 8), worker("4g", 4)]
    router = routing.Router(gpus)
    sdxl = job("sdxl", 1024)
    assert [w.slot for w in gpus if router.fits(sdxl, w)] == ["16g"]
    assert router.choose(gpus[2], [sdxl]) is None and router.choose(gpus[1], [sdxl]) is None
    assert router.choose(gpus[0], [sdxl]) is sdxl
    assert router.someone_else_can_take(gpus[2], [sdxl])


def test_a_job_no_gpu_can_hold_fails_before_starting_with_the_estimate_and_a_smaller_variant():
    router = routing.Router([], REGISTRY)
    flux = job("flux-dev", 1024)
    with pytest.raises(ImagegenError) as caught:
        router.check_feasible([(flux.bundle, flux.params)], [16 * GIB, 8 * GIB])
    error = caught.value
    assert error.code == "insufficient_gpu_memory" and error.exit_code == 2
    assert "needs about 2" in error.message and "largest GPU here has 17.2 GB" in error.message
    assert "flux-dev-fp8" in error.message or "flux-schnell-fp8" in error.message
    fp8 = job("flux-dev-fp8", 1024)
    router.check_feasible([(fp8.bundle, fp8.params)], [16 * GIB, 8 * GIB])  # the fp8 variant fits


def test_quality_work_goes_to_the_worker_that_finishes_first_and_overflows_when_it_is_busy():
    fast, slow = worker("fast", 24, speed=0.05), worker("slow", 24, speed=0.20)
    router = routing.Router([fast, slow])
    final = job("sdxl", 1024, steps=30, quality=True)
    assert router.choose(slow, [final]) is None, "the slow worker leaves quality work to the fast one"
    assert router.choose(fast, [final]) is final
    fast.inflight = {f"p{i}": (job("sdxl", 1024, steps=30, key=f"q{i}"), 0.0) for i in range(6)}
    assert router.choose(slow, [final]) is final, "with the fast worker backed up, the slow one takes it"


def test_drafts_go_to_any_idle_worker_and_retries_come_first():
    fast, slow = worker("fast", 24, speed=0.05), worker("slow", 8, speed=0.20)
    router = routing.Router([fast, slow])
    drafts = [job("sd15", 512, key=f"d{i}") for i in range(20)]
    assert router.choose(slow, drafts) is drafts[0]
    drafts[2].attempts = 1
    assert router.choose(fast, drafts) is drafts[2]


def test_at_a_batchs_tail_a_slow_worker_leaves_the_last_drafts_to_a_faster_one():
    """The fast worker (4x) finishes three drafts in 0.15 units of time, before the slow one would finish one
    (0.2): taking one would only make the batch end later. With its backlog too long, the slow one helps."""
    fast, slow = worker("fast", 24, speed=0.05), worker("slow", 24, speed=0.20)
    router = routing.Router([fast, slow])
    tail = [job("sd15", 512, key=f"d{i}") for i in range(3)]
    assert router.choose(slow, tail) is None and router.someone_else_can_take(slow, tail)
    assert router.choose(fast, tail) is tail[0]
    fast.inflight = {f"p{i}": (job("sd15", 512, key=f"q{i}"), 0.0) for i in range(2)}
    assert router.choose(slow, tail) is tail[0], "the fast worker's backlog makes the slow one worth it"
    fast.status = "restarting"
    fast.healthy = False
    assert router.choose(slow, tail[:1]) is tail[0], "a worker out of the rotation is no rival"


def test_speed_is_learned_and_a_far_slower_run_marks_the_worker_unhealthy():
    state = worker("w", 24)
    draft = job("sd15", 512, steps=20)
    for _ in range(3):
        assert routing.Router.observe(state, draft, {"loading": 1.0, "sampling": 2.0})
    assert abs(state.speed - 2.0 / (20 * 0.262144)) < 1e-6
    assert not routing.Router.observe(state, draft, {"sampling": 2.0 * 6})
