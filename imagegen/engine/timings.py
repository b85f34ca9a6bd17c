"""Learned timings: what earlier runs took, to size later budgets and give ETAs.

Kept per (model, size, device) in a small JSON file in the state dir: load seconds (cold and
warm), seconds per sampling step, and seconds to finish (decode + save). Each new observation
moves the estimate a third of the way (an exponential moving average).
"""

from __future__ import annotations

from dataclasses import dataclass

from imagegen.comfy.client import Timeouts
from imagegen.util import paths

WEIGHT = 1 / 3
COLD_LOAD_BYTES_PER_S = 50e6   # a slow disk plus safetensors parsing on a small CPU: the floor
MIN_LOAD_BUDGET = 120.0
MIN_STALL_BUDGET = 60.0
STALL_FACTOR = 20.0            # a step may take this many times its usual time before it is a stall
COMPILE_BUDGET = 900.0         # fast mode: torch.compile on the first step (and on a new size) of a big model


@dataclass
class Estimate:
    load: float | None = None
    step: float | None = None
    finish: float | None = None


STORE = "timings.json"


def _key(model: str, width: int, height: int, device: str) -> str:
    return f"{model}|{width}x{height}|{device}"


def load_store() -> dict:
    return paths.read_state(STORE)


def estimate(model: str, width: int, height: int, device: str) -> Estimate:
    entry = load_store().get(_key(model, width, height, device), {})
    return Estimate(entry.get("load"), entry.get("step"), entry.get("finish"))


def record(model: str, width: int, height: int, device: str, phase_times: dict, steps: int) -> None:
    """Fold one finished job's phase times into the store (best effort: never fails a job)."""
    observed = {"load": phase_times.get("loading"), "finish": phase_times.get("finishing"),
                "step": phase_times["sampling"] / steps if phase_times.get("sampling") and steps else None}

    def fold(store: dict) -> None:
        entry = store.setdefault(_key(model, width, height, device), {})
        for name, value in observed.items():
            if value is not None and value >= 0:
                entry[name] = value if entry.get(name) is None else entry[name] + WEIGHT * (value - entry[name])

    paths.update_state(STORE, fold)  # locked: concurrent jobs and processes all keep their update


def budgets(base: Timeouts, learned: Estimate, bytes_to_load: int, resident: bool, steps: int, explicit: set[str],
            compiles: bool = False) -> Timeouts:
    """Phase budgets for one job. A budget the user set explicitly (flag or env) is kept as is.
    A compiling job (fast mode) may spend minutes in any step where torch.compile (re)compiles."""
    load = MIN_LOAD_BUDGET + (0 if resident else bytes_to_load / COLD_LOAD_BYTES_PER_S)
    if learned.load is not None:
        load = max(load, 5 * learned.load)
    stall = max(MIN_STALL_BUDGET, STALL_FACTOR * (learned.step or 0), 3 * (learned.finish or 0))
    if compiles:
        load, stall = load + COMPILE_BUDGET, max(stall, COMPILE_BUDGET)
    sized = Timeouts(queue=base.queue, load=load, stall=stall, overall=base.overall)
    for name in ("load", "stall"):
        if name in explicit:
            setattr(sized, name, getattr(base, name))
    return sized


def eta(learned: Estimate, steps: int, resident: bool) -> float | None:
    if learned.step is None:
        return None
    return (0 if resident else (learned.load or 0)) + learned.step * steps + (learned.finish or 0)
