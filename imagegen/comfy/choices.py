"""Sampler and scheduler names: the pinned ComfyUI's as a fallback, a worker's own from its /object_info.

A newer ComfyUI adds samplers (e.g. exp_heun_2_x0), so the names a job may use are those of the
worker that runs it. Up front, before any worker is known, only the pinned ComfyUI 0.3.75's lists are
known: a name outside them is let through if it looks like a ComfyUI name, and checked against the
worker's KSampler inputs when the job is submitted (ComfyClient.submit).
"""

from __future__ import annotations

import re

from imagegen import COMFYUI_VERSION
from imagegen.util.errors import ImagegenError

SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
    "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)
SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")  # how ComfyUI names its samplers and schedulers


def looks_like_a_name(name: str) -> bool:
    """Whether a name could be a newer ComfyUI's sampler or scheduler (lower-case, digits, underscores)."""
    return bool(_NAME.match(name or ""))


def check_up_front(sampler: str, scheduler: str) -> None:
    """Before a worker is known: a pinned name passes; another one passes only if it could be a
    newer ComfyUI's (lower-case, digits, underscores), to be checked against the worker's list."""
    for what, name, known in (("sampler", sampler, SAMPLERS), ("scheduler", scheduler, SCHEDULERS)):
        if name not in known and not _NAME.match(name or ""):
            raise ImagegenError("invalid_argument", f"--{what} {name!r} is not a ComfyUI {what}",
                                hint=f"Known to ComfyUI {COMFYUI_VERSION}: {', '.join(known)}")


def from_object_info(info: dict) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(samplers, schedulers) from /object_info or /object_info/KSampler; None when it has no KSampler.
    Reads both input styles: [[names...], {...}] (0.3.x) and ["COMBO", {"options": [names...]}] (newer)."""
    required = ((info.get("KSampler") or {}).get("input") or {}).get("required") or {}
    lists = tuple(_combo(required.get(key)) for key in ("sampler_name", "scheduler"))
    if any(names is None for names in lists):
        return None
    return lists  # type: ignore[return-value]


def _combo(spec) -> tuple[str, ...] | None:
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], (list, tuple)):
        return tuple(str(name) for name in spec[0])
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        options = spec[1].get("options")
        if isinstance(options, (list, tuple)):
            return tuple(str(name) for name in options)
    return None


def graph_names(graph: dict) -> tuple[set[str], set[str]]:
    """The sampler and scheduler names a graph uses (KSampler, KSamplerSelect, BasicScheduler, ...)."""
    samplers, schedulers = set(), set()
    for node in graph.values():
        inputs = (node.get("inputs") or {}) if isinstance(node, dict) else {}
        if isinstance(inputs.get("sampler_name"), str):
            samplers.add(inputs["sampler_name"])
        if isinstance(inputs.get("scheduler"), str):
            schedulers.add(inputs["scheduler"])
    return samplers, schedulers


def pinned_only(graph: dict) -> bool:
    """Whether every name the graph uses is the pinned ComfyUI's (then no worker list is needed)."""
    samplers, schedulers = graph_names(graph)
    return samplers <= set(SAMPLERS) and schedulers <= set(SCHEDULERS)


def check_graph(graph: dict, samplers: tuple[str, ...], schedulers: tuple[str, ...], where: str) -> None:
    """Refuse a graph whose sampler or scheduler the worker's ComfyUI does not offer, naming its lists."""
    used_samplers, used_schedulers = graph_names(graph)
    for what, used, offered in (("sampler", used_samplers, samplers), ("scheduler", used_schedulers, schedulers)):
        for name in sorted(used - set(offered)):
            raise ImagegenError("invalid_argument", f"--{what} {name!r} is not a {what} of {where}",
                                hint=f"Its {what}s: {', '.join(offered)}")
