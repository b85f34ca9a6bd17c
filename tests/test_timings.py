from imagegen.comfy.client import Timeouts
from imagegen.engine import timings


def test_load_budget_grows_with_bytes_and_shrinks_when_resident():
    base = Timeouts()
    cold = timings.budgets(base, timings.Estimate(), 24e9, resident=False, steps=20, explicit=set())
    warm = timings.budgets(base, timings.Estimate(), 24e9, resident=True, steps=20, explicit=set())
    small = timings.budgets(base, timings.Estimate(), 2e9, resident=False, steps=20, explicit=set())
    assert cold.load > small.load > warm.load >= timings.MIN_LOAD_BUDGET
    assert cold.load >= 24e9 / timings.COLD_LOAD_BYTES_PER_S


def test_compiling_jobs_get_minutes_for_the_first_step_and_for_recompiles():
    plain = timings.budgets(Timeouts(), timings.Estimate(load=2, step=0.1, finish=1), 2e9, True, 20, set())
    fast = timings.budgets(Timeouts(), timings.Estimate(load=2, step=0.1, finish=1), 2e9, True, 20, set(),
                           compiles=True)
    assert fast.load >= plain.load + timings.COMPILE_BUDGET and fast.stall >= timings.COMPILE_BUDGET > plain.stall
    pinned = timings.budgets(Timeouts(stall=3, load=7), timings.Estimate(), 0, True, 20, {"stall", "load"},
                             compiles=True)
    assert (pinned.stall, pinned.load) == (3, 7)


def test_stall_budget_scales_with_the_learned_step_time_and_explicit_budgets_win():
    slow = timings.budgets(Timeouts(), timings.Estimate(load=30, step=12.0, finish=5), 0, True, 20, set())
    assert slow.stall == 12.0 * timings.STALL_FACTOR and slow.load >= 150
    pinned = timings.budgets(Timeouts(stall=3, load=7), timings.Estimate(step=12.0), 10e9, False, 20, {"stall", "load"})
    assert (pinned.stall, pinned.load) == (3, 7)


def test_observations_are_learned_per_model_size_and_device(isolated_home):
    assert timings.estimate("sd15", 512, 512, "cuda").step is None
    timings.record("sd15", 512, 512, "cuda", {"loading": 9.0, "sampling": 2.0, "finishing": 0.5}, steps=20)
    timings.record("sd15", 512, 512, "cuda", {"loading": 3.0, "sampling": 2.6, "finishing": 0.5}, steps=20)
    learned = timings.estimate("sd15", 512, 512, "cuda")
    assert learned.load == 9.0 + (3.0 - 9.0) / 3 and abs(learned.step - (0.1 + (0.13 - 0.1) / 3)) < 1e-9
    assert timings.estimate("sd15", 512, 512, "cpu").step is None
    assert timings.eta(learned, 20, resident=True) == learned.step * 20 + learned.finish
