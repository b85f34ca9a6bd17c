"""`imagegen generate`: validate a request, find a worker, and render through the Scheduler (one slot), which
writes self-describing PNGs."""

from __future__ import annotations

import math
import os
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from imagegen.comfy import workflows
from imagegen.comfy.client import Timeouts
from imagegen.engine import addons, hires, inputs, output, timings
from imagegen.engine.progress import Reporter
from imagegen.engine.render import is_resident, job_budgets, timing_name
from imagegen.models import cache, modelfile
from imagegen.models.registry import Bundle, Registry, local_bundle
from imagegen.util import paths
from imagegen.util.errors import ImagegenError

MAX_PROMPT_CHARS = 10000
MAX_COUNT = 100
DEFAULT_MODEL = os.environ.get("IMAGEGEN_MODEL", "sd15")


@dataclass
class Request:
    prompt: str
    model: str | None = None
    checkpoint: Path | None = None
    family: str | None = None
    negative: str | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    size: str | None = None
    sampler: str | None = None
    scheduler: str | None = None
    guidance: float | None = None
    count: int = 1
    output: str | None = None
    overwrite: bool = False
    force: bool = False  # skip the GPU-memory check
    fast: bool = False  # torch.compile + fp8 matmul (workflows.compiled)
    timeouts: Timeouts = field(default_factory=Timeouts)
    explicit_timeouts: set[str] = field(default_factory=set)  # budgets the user set: never resized
    image: Path | None = None  # img2img / inpainting source (engine/inputs.py)
    mask: Path | None = None  # inpainting: white repaints, black keeps
    mask_grow: int | None = None  # 0 when omitted
    denoise: float | None = None  # default: inputs.DEFAULT_DENOISE with an image
    extend: str | list[int] | None = None  # outpainting: PX or LEFT,TOP,RIGHT,BOTTOM
    loras: list | None = None  # --lora NAME_OR_FILE[:STRENGTH] (or {name, strength}): engine/addons.py
    controls: list | None = None  # --control MODEL:IMAGE[:STRENGTH[:START:END]] (or a mapping)
    control_preprocess: str | None = None  # "canny"
    hires: workflows.hires.HiresFix | None = None  # --hires: a second pass at a larger size (engine/hires.py)


def timeouts_from_env(overall: float | None = None) -> tuple[Timeouts, set[str]]:
    """Phase budgets from IMAGEGEN_TIMEOUT_* and --timeout, and which of them were set explicitly."""
    from imagegen.util.env import env_float

    values = {}
    for name in ("queue", "load", "stall", "overall"):
        if os.environ.get(f"IMAGEGEN_TIMEOUT_{name.upper()}", "").strip():
            values[name] = env_float(f"IMAGEGEN_TIMEOUT_{name.upper()}", getattr(Timeouts(), name) or 0.0, minimum=0.1)
    env_float("IMAGEGEN_TIMEOUT_REQUEST", 30.0, minimum=0.1)  # checked here too: before any worker starts
    if overall is not None:
        if not overall > 0:
            raise ImagegenError("invalid_argument", f"--timeout must be a positive number of seconds, got {overall}")
        values["overall"] = overall
    return Timeouts(**values), set(values)


def merge_source(image: Path, given: dict, has_checkpoint: bool) -> dict:
    """Parameters for `--from IMAGE`: the image's, with every flag the user gave taking precedence."""
    from imagegen.comfy.provenance import read_parameters

    found = read_parameters(image)
    merged = dict(given)
    for key in ("prompt", "negative", "seed", "steps", "cfg", "sampler", "scheduler", "guidance"):
        if merged.get(key) is None and found.get(key) is not None:
            merged[key] = found[key]
    recorded = found.get("inputs") or {}
    if "image" in recorded:  # made from the user's image: the same image (and mask), denoise and grow
        for key in ("denoise", "mask_grow", "extend"):
            if merged.get(key) is None and found.get(key) is not None:
                merged[key] = found[key]
        for role, record in recorded.items():
            if role in inputs.ROLES and merged.get(role) is None:
                merged[role] = inputs.find_recorded(role, record, image)
    merged.update(addons.from_record(found, merged, image))  # its LoRAs and ControlNets, where none are given
    if merged.get("hires") is None and found.get("hires"):  # the same two passes, from the first pass's size
        merged["hires"], first_size = hires.from_record(found["hires"])
        merged["size"] = merged.get("size") or first_size
    if merged.get("size") is None and found.get("width") and found.get("height"):
        merged["size"] = f"{found['width']}x{found['height']}"
    if merged.get("model") is None and not has_checkpoint and found.get("model"):
        registry = Registry.load()
        if found["model"] not in registry.bundles:
            raise ImagegenError(
                "unknown_model",
                f"{image} was made with model {found['model']!r}, which is not registered here",
                hint="Pass the same model file with --checkpoint PATH, or register it with `imagegen models add`.",
            )
        merged["model"] = found["model"]
    return merged


def check_prompt(prompt: str, what: str = "prompt") -> str:
    if not prompt or not prompt.strip():
        raise ImagegenError(
            "invalid_prompt",
            f"the {what} is empty",
            hint='Pass the prompt as an argument: imagegen generate "a red fox".',
        )
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ImagegenError(
            "invalid_prompt", f"the {what} has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}"
        )
    bad = [c for c in prompt if unicodedata.category(c) == "Cc" and c not in "\n\t"]
    if bad:
        raise ImagegenError(
            "invalid_prompt",
            f"the {what} contains control character(s) {', '.join(repr(c) for c in sorted(set(bad)))}",
            hint="Remove NUL and other control characters from the prompt.",
        )
    return prompt.strip()


def parse_size(size: str, multiple: int = workflows.SIZE_MULTIPLE) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", size or "")
    if not match:
        raise ImagegenError("invalid_size", f"--size {size!r} is not WIDTHxHEIGHT")
    width, height = int(match.group(1)), int(match.group(2))
    for name, value in (("width", width), ("height", height)):
        if not 16 <= value <= workflows.MAX_RESOLUTION:
            raise ImagegenError("invalid_size", f"{name} {value} is outside 16..{workflows.MAX_RESOLUTION}")
        if value % multiple:
            lower = value // multiple * multiple
            raise ImagegenError(
                "invalid_size",
                f"{name} {value} is not a multiple of {multiple}",
                hint=f"Use {max(lower, multiple)} or {lower + multiple}.",
            )
    return width, height


def _check_range(name: str, value, low, high):
    if value is None:
        return None
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        raise ImagegenError("invalid_argument", f"--{name} must be a finite number, got {value}")
    if not low <= value <= high:
        raise ImagegenError("invalid_argument", f"--{name} {value} is outside {low}..{high}")
    return value


def resolve_bundle(request: Request, registry: Registry | None) -> Bundle:
    if request.checkpoint:
        path = Path(request.checkpoint).expanduser()
        detected = modelfile.detect(modelfile.read_header(path))
        family = request.family or detected.family
        if family not in ("sd15", "sdxl"):
            raise ImagegenError(
                "invalid_model_file",
                f"{path.name}: cannot use it as a checkpoint "
                f"(looks like {detected.family or 'an unknown model'} {detected.kind})",
                hint="--checkpoint takes an SD1.5 or SDXL all-in-one .safetensors; "
                "pass --family to override detection.",
            )
        return local_bundle(path, family)
    return (registry or Registry.load()).get(request.model or DEFAULT_MODEL)


def plan_jobs(request: Request, bundle: Bundle, chosen: addons.Chosen | None = None) -> list[workflows.Params]:
    if bundle.family == "upscale":
        raise ImagegenError(
            "invalid_argument",
            f"{bundle.name!r} is an upscale model: it enlarges images, it does not draw them",
            hint="Use it as a funnel's upscale stage (imagegen funnel --upscale-model NAME), or pick a drawing model.",
        )
    if bundle.family in ("lora", "controlnet"):
        flag = "--lora" if bundle.family == "lora" else "--control"
        raise ImagegenError(
            "invalid_argument",
            f"{bundle.name!r} is a {bundle.family}: it changes how a model draws, it does not draw by itself",
            hint=f"Use it with {flag} {bundle.name}{'' if bundle.family == 'lora' else ':IMAGE'} on a "
            f"{bundle.base or 'matching'} model.",
        )
    prompt = check_prompt(request.prompt)
    if chosen is None:  # a caller that carries no LoRA/ControlNet files to its workers (funnel/loras.py plans its own)
        chosen = addons.choose(prompt, request.loras, request.controls, request.control_preprocess, bundle)
        if chosen.bundles:
            raise ImagegenError("invalid_argument", "LoRAs and ControlNets (here: "
                                f"{', '.join(b.name for b in chosen.bundles)}) work with generate and batch, not here",
                                hint="Remove the <lora:...> tags from the prompt, or render it with generate or batch.")
    prompt = check_prompt(chosen.prompt)  # without its <lora:...> tags
    negative = check_prompt(request.negative, "negative prompt") if request.negative else bundle.default("negative", "")
    given = inputs.prepare(request.image, request.mask, request.denoise, request.mask_grow, request.extend)
    if request.size:
        width, height = parse_size(request.size)
    else:
        width, height = given.size() or (bundle.default("width", 512), bundle.default("height", 512))
    steps = _check_range("steps", request.steps, 1, workflows.MAX_STEPS) or bundle.default("steps", 20)
    cfg = _check_range("cfg", request.cfg, 0.0, workflows.MAX_CFG)
    guidance = _check_range("guidance", request.guidance, 0.0, workflows.MAX_GUIDANCE)
    count = _check_range("count", request.count, 1, MAX_COUNT)
    seed = _check_range("seed", request.seed, 0, workflows.MAX_SEED - MAX_COUNT)
    sampler = request.sampler or bundle.default("sampler", "euler")
    scheduler = request.scheduler or bundle.default("scheduler", "normal")
    workflows.choices.check_up_front(sampler, scheduler)  # the worker's own lists: at submission (comfy/choices.py)
    hires_fix = hires.check(request.hires, width, height, has_image=request.image is not None)
    base_seed = secrets.randbelow(2**32) if seed is None else seed
    return [
        workflows.Params(
            prompt=prompt,
            negative=negative,
            width=width,
            height=height,
            steps=steps,
            cfg=cfg if cfg is not None else bundle.default("cfg", 7.0),
            sampler=sampler,
            scheduler=scheduler,
            seed=base_seed + i,
            guidance=guidance if guidance is not None else bundle.default("guidance", 3.5),
            filename_prefix=f"imagegen/{secrets.token_hex(4)}",
            fast=request.fast,
            denoise=given.denoise,
            mask_grow=given.mask_grow,
            extend=given.extend,
            sources=given.sources(),
            loras=list(chosen.loras),
            controls=list(chosen.controls),
            hires=hires_fix,
        )
        for i in range(count)
    ]


@dataclass
class Plan:
    bundle: Bundle
    jobs: list[workflows.Params]
    targets: list[Path | None]
    request: Request
    chosen: addons.Chosen | None = None  # its LoRAs and ControlNets


def plan(request: Request, registry: Registry | None = None) -> Plan:
    """Validate everything and decide every output path; nothing is started."""
    bundle = resolve_bundle(request, registry)
    chosen = addons.choose(check_prompt(request.prompt), request.loras, request.controls, request.control_preprocess,
                           bundle, registry) if bundle.family != "upscale" else None
    jobs = plan_jobs(request, bundle, chosen)
    names = [output.default_name(p.prompt, p.seed) for p in jobs]
    targets = output.plan_outputs(request.output, len(jobs), names, request.overwrite, paths.default_output_dir())
    return Plan(bundle, jobs, targets, request, chosen)


def execute(planned: Plan, runtime, reporter: Reporter, fetch=None):
    """Make the model loadable, find a worker, and yield one result record per image, in order. The
    jobs run through the Scheduler with this one worker, as batch, funnel and MCP jobs do."""
    from imagegen.engine.scheduler import Job, Scheduler
    from imagegen.models.fetch import make_fetcher

    bundle, request = planned.bundle, planned.request
    if not request.force:
        check_gpu_memory(bundle, planned.jobs[0])
    check_fast_toolchain(runtime, request.fast)
    check_cap_before_start(planned, runtime)
    make_loadable(bundle, runtime, fetch or make_fetcher(reporter))
    upscalers = hires.model_bundles(planned.jobs[:1])  # --hires-model: loaded by the same graph
    for upscaler in upscalers:
        make_loadable(upscaler, runtime, fetch or make_fetcher(reporter))
    extras = planned.chosen.bundles if planned.chosen else []  # its LoRAs and ControlNets
    for extra in extras:
        make_loadable(extra, runtime, fetch or make_fetcher(reporter))
    for note in planned.chosen.notes if planned.chosen else []:
        reporter.warn(note)
    mounts = local_dirs(bundle).union(*(local_dirs(upscaler) for upscaler in upscalers), addons.local_files(extras))
    worker = runtime.ensure(on_status=reporter.status, mounts=mounts)
    if worker.device == "cpu":
        reporter.once("cpu", "no GPU in use: running on CPU (slow; fine for small models and tests)")
    first = workflows.for_device(planned.jobs[0], worker.device)
    if request.fast and not first.fast:
        reporter.once("fast-cpu", workflows.FAST_ON_CPU_NOTE)
    resident = is_resident(bundle, worker.client().worker_info())
    budgets = job_budgets(bundle, first, worker.device, resident, request.timeouts, request.explicit_timeouts)
    learned = timings.estimate(timing_name(bundle, first), first.width, first.height, worker.device)
    each = timings.eta(learned, first.steps, resident)
    count = len(planned.jobs)
    if each is not None:
        check_overall_cap(request, each * count, f"{count} image(s) with {bundle.name} on {worker.name}")
        reporter.status(
            f"rendering {count} image(s) with {bundle.name} on {worker.name}: about {each * count:.0f}s "
            "(from earlier runs)"
        )
    reporter.job(f"{bundle.name} {first.width}x{first.height}")
    jobs = [
        Job(key=str(index), bundle=bundle, params=addons.hashed(params, extras),
            targets=[target],  # type: ignore[list-item]  # None: stdout
            inputs={**inputs.job_files(params.sources), **addons.job_files(params)})
        for index, (params, target) in enumerate(zip(planned.jobs, planned.targets, strict=True))
    ]
    scheduler = Scheduler(
        runtime,
        [worker.slot],
        jobs,
        lambda outcome: None,
        lambda job, state: budgets,
        {bundle.name: cache.file_hashes(bundle)},
        mounts,
        overwrite=request.overwrite,
        depth=count,
        max_attempts=1,
        max_restarts=0,
        reporter=reporter,
        force=True,
        session_timeouts=budgets,
        handles={worker.slot: worker},
    )
    yield from in_order(scheduler.stream())


def in_order(outcomes):
    """Records of outcomes keyed 0, 1, 2, ..., in key order; the first failure is raised (which ends
    the run: the prompts still queued are cancelled)."""
    from contextlib import closing

    finished: dict[int, list[dict]] = {}
    following = 0
    with closing(outcomes):
        for outcome in outcomes:
            if outcome.error is not None:
                raise outcome.error from None
            finished[int(outcome.job.key)] = outcome.records
            while following in finished:
                yield from finished.pop(following)
                following += 1


def check_cap_before_start(planned: Plan, runtime) -> None:
    """The --timeout check before any worker starts, where the worker runs on this machine (its device
    is this machine's): with the model taken as loaded, the least the call can take."""
    from imagegen.util.gpus import detect_device

    if "overall" not in planned.request.explicit_timeouts or not getattr(runtime, "uses_host_cache", False):
        return
    device = detect_device()
    first = workflows.for_device(planned.jobs[0], device)
    learned = timings.estimate(timing_name(planned.bundle, first), first.width, first.height, device)
    least = timings.eta(learned, first.steps, resident=True)
    if least is not None:
        count = len(planned.jobs)
        check_overall_cap(planned.request, least * count, f"{count} image(s) with {planned.bundle.name} on {device}")


TIMEOUT_SLACK = 2.0  # refuse a --timeout when earlier runs say the call needs more than this many times it


def check_overall_cap(request: Request, estimate: float, what: str) -> None:
    """Refuse, before any job is queued, an overall cap far below what earlier runs say the call takes:
    it could only end in a timeout, and the worker's time would be wasted."""
    if "overall" not in request.explicit_timeouts or estimate <= TIMEOUT_SLACK * request.timeouts.overall:
        return
    cap = request.timeouts.overall
    raise ImagegenError(
        "invalid_argument",
        f"--timeout {cap:g}s is far below the {estimate:.0f}s that {what} took in earlier runs (the learned estimate)",
        hint=f"Pass --timeout {math.ceil(estimate * 1.5)} or more, or use fewer --steps, a smaller --size or --count.",
        estimate_seconds=round(estimate, 1),
        timeout_seconds=cap,
    )


def generate(request: Request, runtime, reporter: Reporter, registry: Registry | None = None, fetch=None):
    """Yield one result record per image. All validation happens before any worker starts."""
    yield from execute(plan(request, registry), runtime, reporter, fetch)


def make_loadable(bundle: Bundle, runtime, fetch) -> None:
    """Fetch and link a bundle's files into the model cache the workers read. Remote workers have
    their own models folders: nothing is sent to them, so a local file cannot be used there."""
    local = [f.local_path for f in bundle.files.values() if f.local_path]
    if local and not getattr(runtime, "reads_local_files", True):
        raise ImagegenError(
            "invalid_argument",
            f"remote workers cannot read the local file {local[0]}",
            hint="Use a registered model the remote workers hold (under the same file name), or another --runtime.",
        )
    if getattr(runtime, "uses_host_cache", True):
        cache.ensure_bundle(bundle, fetch=fetch)
    elif hasattr(runtime, "ensure_bundle"):  # workers with caches of their own that the runtime fills (Ray nodes)
        runtime.ensure_bundle(bundle)
    on_hosts = getattr(runtime, "fetch_on_hosts", None)  # Docker hosts over SSH: each fetches into its own cache
    if on_hosts is not None:
        on_hosts(bundle, getattr(fetch, "renderer", None))


def check_fast_toolchain(runtime, fast: bool) -> None:
    """Fast mode compiles where the worker runs: for the local runtime on this machine, with this
    interpreter (the worker image brings its own compiler). Refuse before anything starts, not after
    the model has loaded, when torch.compile would find no compiler or no Python.h."""
    import shutil
    import sysconfig

    from imagegen.util.gpus import detect_device

    device = detect_device()
    if not fast or not getattr(runtime, "compiles_on_host", False) or not workflows.compiles_on(device):
        return
    missing = []
    if not (shutil.which("cc") or shutil.which("gcc")):
        missing.append("a C compiler (cc or gcc)")
    if device == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        missing.append("a C++ compiler (c++ or g++), which inductor uses for CPU kernels")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        missing.append(f"Python's headers ({headers})")
    if missing:
        raise ImagegenError(
            "fast_unavailable", f"--fast compiles the model on this machine, which lacks {' and '.join(missing)}"
        )


def check_gpu_memory(bundle: Bundle, params: workflows.Params) -> None:
    """Refuse, before downloading or starting anything, a job no GPU on this machine can hold."""
    from imagegen.engine.routing import Router
    from imagegen.util import gpus

    found = gpus.list_gpus()
    if found:
        Router([], Registry.load()).check_feasible(
            [(bundle, params)], [g.memory_total_mib * 1024 * 1024 for g in found]
        )


def local_dirs(bundle: Bundle) -> set[str]:
    """A bundle's local files (the files, never their folders): a container mounts each one read-only
    at the same path, so the cache's symlink to it resolves there and nothing else of the host shows."""
    return {str(Path(f.local_path).absolute()) for f in bundle.files.values() if f.local_path}


def worker_failure(runtime, worker, error: ImagegenError) -> ImagegenError:
    """After a stall, a timeout or a lost connection: say what happened (the phase, and whether the
    worker died, hung or ran out of memory). The worker is stopped only when this command started it;
    a shared worker is left running (the Scheduler has cancelled this command's own prompts)."""
    from imagegen.engine.scheduler import worker_fault

    if error.code not in ("timeout", "worker_unreachable", "out_of_memory"):
        return error
    return worker_fault(runtime, worker, error, stop=bool(worker.started_here))
