"""`imagegen run WORKFLOW`: a user's own ComfyUI graph (API or UI format, or a PNG that carries one), checked
and planned before any worker starts: node classes, an output node, its `--set` values and input images,
every model file it names (engine/workflow_models.py)."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagegen.comfy import graph_params, node_info, png, ui_graph, workflows
from imagegen.engine import inputs as image_inputs
from imagegen.engine import workflow_jobs
from imagegen.engine.jobs import Job
from imagegen.engine.workflow_jobs import WorkflowJob
from imagegen.engine.workflow_models import resolve_models
from imagegen.models.registry import Bundle, Registry
from imagegen.util.errors import ImagegenError

MAX_WORKFLOW_BYTES = 16 * 1024 * 1024
# Core output nodes that save no PNG image imagegen could fetch (models, latents, audio, video, 3D, text)
NOT_IMAGES = {"CLIPSave", "CheckpointSave", "ImageOnlyCheckpointSave", "LoraSave", "ModelSave", "VAESave", "SaveLoRA",
              "SaveLatent", "Preview3D", "SaveGLB", "PreviewAny", "PreviewAudio", "SaveAudio", "SaveAudioMP3",
              "SaveAudioOpus", "SaveAnimatedWEBP", "SaveVideo", "SaveWEBM", "SaveSVGNode", "SaveTrainingDataset",
              "SaveImageDataSetToFolder", "SaveImageTextDataSetToFolder"}


@dataclass
class Workflow:
    graph: dict                    # API format
    source: Path
    sha256: str                    # of the file as given
    format: str                    # "api", "ui" or "png"
    ui: dict | None = None         # the UI graph, when the file held one
    slots: dict = field(default_factory=dict)
    record: dict | None = None     # a PNG's imagegen record (for --from)


def _refuse(path: Path, why: str, hint: str = "Pass a workflow saved by ComfyUI (Save or Export (API)) or a PNG "
                                              "that carries one.") -> ImagegenError:
    return ImagegenError("invalid_workflow", f"{path}: {why}", hint=hint)


def load(path: Path, info: dict | None = None) -> Workflow:
    """Read a workflow file: API JSON, UI JSON, or a PNG with a `prompt` (API) or `workflow` (UI) chunk."""
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            raise _refuse(path, "is a directory")
        data = path.read_bytes() if path.stat().st_size <= MAX_WORKFLOW_BYTES else None
    except FileNotFoundError:
        raise _refuse(path, "no such file", hint="Check the workflow's path.") from None
    except OSError as exc:
        raise _refuse(path, f"cannot be read ({exc.strerror or exc})") from None
    if data is None:
        raise _refuse(path, f"is larger than {MAX_WORKFLOW_BYTES // 2**20} MiB")
    digest = hashlib.sha256(data).hexdigest()
    if data.startswith(png.PNG_SIGNATURE):
        return _from_png(path, data, digest, info)
    try:
        parsed = json.loads(data.decode("utf-8-sig"))  # an editor on Windows may have added a byte-order mark
    except (UnicodeDecodeError, ValueError) as exc:
        raise _refuse(path, f"is neither a PNG nor JSON ({exc})") from None
    if ui_graph.is_ui(parsed):
        converted = _converted(path, parsed, info)
        return Workflow(checked(path, converted.graph, info), path, digest, "ui", parsed, converted.slots)
    if isinstance(parsed, dict) and isinstance(parsed.get("prompt"), dict) and "class_type" not in parsed["prompt"]:
        parsed = parsed["prompt"]  # a saved /prompt request body
    return Workflow(checked(path, parsed, info), path, digest, "api")


def _from_png(path: Path, data: bytes, digest: str, info: dict | None) -> Workflow:
    try:
        chunks = png.read_text_chunks(data)
        record = json.loads(chunks["imagegen"]) if "imagegen" in chunks else None
        ui = json.loads(chunks["workflow"]) if "workflow" in chunks else None
        graph = json.loads(chunks["prompt"]) if "prompt" in chunks else None
    except (png.BadPNG, ValueError) as exc:
        raise _refuse(path, f"its metadata cannot be read ({exc})") from None
    if not ui_graph.is_ui(ui) or (isinstance(ui, dict) and ui.get("extra", {}).get("imagegen")):
        ui = None  # a layout imagegen made for its own graph: the prompt chunk is the exact graph
    if graph is None and ui is not None:
        converted = _converted(path, ui, info)
        return Workflow(checked(path, converted.graph, info), path, digest, "png", ui, converted.slots, record)
    if graph is None:
        raise _refuse(path, "carries no workflow (no prompt or workflow chunk)")
    try:
        slots = ui_graph.to_api(ui, info).slots if ui is not None else {}
    except ImagegenError:  # a UI graph the converter refuses: the prompt chunk still is the exact graph
        ui, slots = None, {}
    return Workflow(checked(path, graph, info), path, digest, "png", ui, slots,
                    record if isinstance(record, dict) else None)


def _converted(path: Path, ui: dict, info: dict | None) -> ui_graph.Converted:
    """The API graph of a UI workflow; a refusal names the file."""
    try:
        return ui_graph.to_api(ui, info)
    except ImagegenError as error:
        if error.code == "invalid_workflow":
            error.message = f"{path}: {error.message}"
        raise


def checked(path: Path, graph: Any, info: dict | None = None) -> dict:
    """An API graph whose nodes are well formed, whose classes the pinned ComfyUI has, and which has an
    output node; links must name nodes of the graph."""
    info = info if info is not None else node_info.pinned()
    if not isinstance(graph, dict) or not graph or not any(isinstance(node, dict) and "class_type" in node
                                                            for node in graph.values()):
        raise _refuse(path, "is not a ComfyUI workflow: neither the API format (nodes by id, each with class_type "
                      "and inputs) nor the editor's (nodes and links)")
    unknown = {}
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) or \
                not isinstance(node.get("inputs", {}), dict):
            raise _refuse(path, f"node {node_id!r} is not a node (an object with class_type and inputs)")
        node.setdefault("inputs", {})
        if node["class_type"] not in info:
            unknown[str(node_id)] = node["class_type"]
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and \
                    not isinstance(value[1], bool):
                if str(value[0]) not in graph:
                    raise _refuse(path, f"node {node_id} ({node['class_type']}): input {name!r} links to node "
                                  f"{value[0]!r}, which is not in the workflow")
                node["inputs"][name] = [str(value[0]), value[1]]  # ComfyUI finds nodes by string id only
    if unknown:
        raise ui_graph.unknown_classes(unknown)
    outputs = {str(node_id): node["class_type"] for node_id, node in graph.items()
               if info[node["class_type"]].get("output_node")}
    if not outputs:
        raise _refuse(path, "has no output node (SaveImage, PreviewImage, ...): it would compute nothing",
                      hint="Add a SaveImage node in the editor, save, and run that file.")
    if set(outputs.values()) <= NOT_IMAGES:
        listed = ", ".join(f"{kind} (node {node_id})" for node_id, kind in outputs.items())
        raise _refuse(path, f"saves no image: its output nodes write other files ({listed}), and imagegen writes "
                      "the PNG images a workflow saves", hint="Add a SaveImage node fed by the images you want, "
                                                               "save, and run that file.")
    return {str(node_id): node for node_id, node in graph.items()}


# --- jobs -----------------------------------------------------------------------------------------------------
def _value(graph: dict, refs: list, default: Any) -> Any:
    for node_id, name in refs:
        return graph[node_id]["inputs"].get(name, default)
    return default


def params_of(graph: dict, info: dict | None = None) -> workflows.Params:
    """The well-known values of a graph as Params: what routing, budgets, timings and records read."""
    names = graph_params.well_known(graph, info)
    size = names.get("size", [])
    prompt = _value(graph, names.get("prompt", []), "")
    sampler = next((n["inputs"].get("sampler_name") for n in graph.values()
                    if isinstance(n["inputs"].get("sampler_name"), str)), "euler")
    scheduler = next((n["inputs"].get("scheduler") for n in graph.values()
                      if isinstance(n["inputs"].get("scheduler"), str)), "normal")
    batch = next((n["inputs"].get("batch_size") for n in graph.values()
                  if isinstance(n["inputs"].get("batch_size"), int)), 1)
    return workflows.Params(prompt=prompt if isinstance(prompt, str) else "", negative=str(_value(
        graph, names.get("negative", []), "")), width=int(_value(graph, size[:1], 512)),
        height=int(_value(graph, size[1:2], 512)), steps=int(_value(graph, names.get("steps", []), 20)),
        cfg=float(_value(graph, names.get("cfg", []), 1.0)), sampler=sampler, scheduler=scheduler,
        seed=int(_value(graph, names.get("seed", []), 0)), denoise=float(_value(graph, names.get("denoise", []), 1.0)),
        batch_size=max(1, batch))


def unset_images(workflow: Workflow, applied: graph_params.Applied, info: dict | None = None,
                 here: Path | None = None) -> None:
    """LoadImage inputs the user did not --set: a file beside the workflow (or in `here`) is uploaded; a name
    only the editor's own input folder holds is an error naming the node."""
    for ref, leaf in graph_params.leaves(applied.graph, info).items():
        if not leaf.is_upload or ref in applied.uploads or leaf.value in (leaf.options.get("choices") or []):
            continue  # set, or already in the worker's input folder (a remote worker's own list says so)
        if workflow.record and ref in _recorded_inputs(workflow):
            applied.uploads[ref] = _recorded_inputs(workflow)[ref]
            continue
        for base in (workflow.source.parent, *([here] if here else [])):
            candidate = (base / str(leaf.value)).absolute()
            if str(leaf.value) and candidate.is_file():
                applied.uploads[ref] = candidate
                break
        else:
            raise ImagegenError("invalid_argument", f"node {ref[0]} ({leaf.class_type}) loads {leaf.value!r}, which "
                                "is not a file beside the workflow or here",
                                hint=f"Pass the image to load: --set {ref[0]}.{ref[1]}=PATH (or --set image=PATH).")


def _check_image(graph: dict, ref: tuple[str, str], path: Path) -> str:
    """The sha256 of an input image, which is size-limited and decodes before any worker starts, exit 2 if not
    (the user's own bytes are uploaded: LoadImage reads alpha and EXIF); a refusal names the node loading it."""
    try:
        return image_inputs.load(path, "workflow").sha256
    except ImagegenError as error:
        why = error.message.partition(f"{path}: ")[2] or error.message
        raise ImagegenError(error.code, f"node {ref[0]} ({graph[ref[0]]['class_type']}) loads {path}, which {why}",
                            hint=f"Pass a PNG, JPEG or WebP file: --set {ref[0]}.{ref[1]}=PATH.") from None


def _recorded_inputs(workflow: Workflow) -> dict:
    """The input files an imagegen PNG's record names (`run --from`), where they still hold the same bytes."""
    found = {}
    for key, entry in (((workflow.record or {}).get("workflow") or {}).get("inputs") or {}).items():
        node_id, _, name = key.rpartition(".")
        path = Path(str(entry.get("path", "")))
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("sha256"):
            raise ImagegenError("invalid_source_image", f"{workflow.source} was made from {path} (sha256 "
                                f"{str(entry.get('sha256'))[:12]}...), which is missing or changed",
                                hint=f"Restore that file, or pass another: --set {key}=PATH.")
        found[(node_id, name)] = path
    return found


@dataclass
class RunPlan:
    jobs: list[Job]
    bundle: Bundle
    workflow: Workflow


def plan_jobs(workflow: Workflow, settings: dict[str, Any], count: int, targets: list[Path | None],
              registry: Registry | None = None, local_models: bool = True, key_prefix: str = "",
              info: dict | None = None, base: Path | None = None, anchored: bool = False) -> list[Job]:
    """One Job per image set (count varies every sampler's seed), validated and with its models resolved.
    Relative paths in settings are relative to `base` (the current folder when None), or refused when
    `anchored` (MCP: the server's folder is not the agent's)."""
    registry = registry or Registry.load()
    here = None if anchored else (base or Path.cwd())
    applied = graph_params.apply(workflow.graph, settings, info, base=here, anchored=anchored)
    unset_images(workflow, applied, info, here)
    problems = graph_params.check_values(applied.graph, info)
    if problems:
        raise _refuse(workflow.source, "holds values ComfyUI would refuse: " + "; ".join(problems),
                      hint="Fix them with --set (see --list-params), or in the editor.")
    digests = {f"{n}.{i}": _check_image(applied.graph, (n, i), path) for (n, i), path in applied.uploads.items()}
    bundle = resolve_models(workflow.source, applied.graph, registry, local_models, here)
    seeds = graph_params.well_known(applied.graph, info).get("seed", [])
    if count > 1 and not seeds:
        raise ImagegenError("invalid_argument", f"--count {count}: the workflow has no seed to vary",
                            hint="Run it once, or add a KSampler/RandomNoise seed.")
    first_seed = int(applied.graph[seeds[0][0]]["inputs"][seeds[0][1]]) if seeds else 0
    inputs = {f"{n}.{i}": path for (n, i), path in applied.uploads.items()}
    record = {"name": workflow.source.name, "sha256": workflow.sha256, "format": workflow.format,
              "set": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
              "inputs": {key: {"path": str(path), "sha256": digests[key]} for key, path in inputs.items()}}
    jobs = []
    for index, target in enumerate(targets):
        graph = json.loads(json.dumps(applied.graph))
        changes = dict(applied.changes)
        for node_id, name in seeds:
            graph[node_id]["inputs"][name] = changes[(node_id, name)] = first_seed + index
        identity = hashlib.sha256(json.dumps(graph, sort_keys=True).encode()).hexdigest()[:12]
        for node in graph.values():  # a fresh prefix: the worker's files never collide, and SaveImage always runs
            if node["class_type"] in ("SaveImage", "PreviewImage") and "filename_prefix" in node["inputs"]:
                node["inputs"]["filename_prefix"] = f"imagegen/{secrets.token_hex(4)}"
        ui = ui_graph.patched(workflow.ui, workflow.slots, changes) if workflow.ui is not None else None
        uploads = dict(zip(inputs, applied.uploads, strict=True))
        work = WorkflowJob(graph, {"workflow": record}, ui, uploads)
        jobs.append(Job(key=f"{key_prefix}{index}:{identity}" if key_prefix else str(index), bundle=bundle,
                        params=params_of(graph, info), targets=[target],  # type: ignore[list-item]  # None: stdout
                        meta={"workflow": str(workflow.source)}, inputs=dict(inputs), workflow=work))
    return jobs


def node_info_of(runtime, reporter) -> dict | None:
    """The node definitions a workflow is checked against: None (the pinned ComfyUI's, known before any worker
    starts) for workers imagegen runs; a remote worker's own /object_info (its ComfyUI version, its files)."""
    if getattr(runtime, "uses_host_cache", True):
        return None
    worker = runtime.ensure(on_status=reporter.status)
    return node_info.trim(worker.client().object_info())


def plan(workflow: Workflow, settings: dict[str, Any], count: int, output_path: str | None, overwrite: bool,
         runtime, info: dict | None = None, anchored: bool = False) -> list[Job]:
    """`imagegen run` (and MCP run_workflow, `anchored`: paths must be absolute): the jobs of `count` runs, each
    with its planned output path."""
    from imagegen.engine import output
    from imagegen.util import paths

    jobs = plan_jobs(workflow, settings, count, [None] * count, local_models=getattr(runtime, "uses_host_cache", True),
                     info=info, anchored=anchored)
    names = [output.default_name(job.params.prompt or workflow.source.stem, job.params.seed) for job in jobs]
    targets = output.plan_outputs(output_path, count, names, overwrite, paths.default_output_dir())
    for job, target in zip(jobs, targets, strict=True):
        job.targets = [target]  # type: ignore[list-item]  # None: stdout
        workflow_jobs.check_targets(job.targets, workflow_jobs.expected_images(job.workflow.graph), overwrite)
    return jobs


def execute(jobs: list[Job], runtime, reporter, *, overwrite: bool, timeouts, explicit: set[str], fetch=None):
    """Fetch the workflow's models, find a worker, and yield one result record per saved image, in job order."""
    from imagegen.engine import generate, render
    from imagegen.engine.scheduler import Scheduler
    from imagegen.models.fetch import make_fetcher

    bundle = jobs[0].bundle
    generate.make_loadable(bundle, runtime, fetch or make_fetcher(reporter))
    hashes = {role: file.sha256 for role, file in bundle.files.items()}
    mounts = generate.local_dirs(bundle)
    worker = runtime.ensure(on_status=reporter.status, mounts=mounts)
    if worker.device == "cpu":
        reporter.once("cpu", "no GPU in use: running on CPU (slow; fine for small models and tests)")
    resident = render.is_resident(bundle, worker.client().worker_info())
    budgets = render.job_budgets(bundle, jobs[0].params, worker.device, resident, timeouts, explicit)
    reporter.job(f"{jobs[0].meta.get('workflow', 'workflow')} with {bundle.name}")
    scheduler = Scheduler(runtime, [worker.slot], jobs, lambda outcome: None, lambda job, state: budgets,
                          {bundle.name: hashes}, mounts, overwrite=overwrite, depth=len(jobs), max_attempts=1,
                          max_restarts=0, reporter=reporter, force=True, session_timeouts=budgets,
                          handles={worker.slot: worker})
    yield from generate.in_order(scheduler.stream())
