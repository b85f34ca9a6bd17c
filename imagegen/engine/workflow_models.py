"""The model files of a user's own workflow (`imagegen run`): every loader input that names one, found as a
local .safetensors path, a registered model, a file in the cache or a shared tree, or a registry file
(fetched like any model); the ones found nowhere are one error listing each with its node."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import replace
from pathlib import Path

from imagegen.models import cache, modelfile
from imagegen.models.registry import LOCAL_SUBFOLDER, Bundle, ModelFile, Registry
from imagegen.util.errors import ImagegenError

# Loader node inputs that name model files, and the ComfyUI folder each reads from.
LOADERS = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"}, "CheckpointLoader": {"ckpt_name": "checkpoints"},
    "unCLIPCheckpointLoader": {"ckpt_name": "checkpoints"}, "ImageOnlyCheckpointLoader": {"ckpt_name": "checkpoints"},
    "UNETLoader": {"unet_name": "diffusion_models"}, "CLIPLoader": {"clip_name": "text_encoders"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "TripleCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders", "clip_name3": "text_encoders"},
    "QuadrupleCLIPLoader": {f"clip_name{i}": "text_encoders" for i in range(1, 5)},
    "VAELoader": {"vae_name": "vae"}, "LoraLoader": {"lora_name": "loras"},
    "LoraLoaderModelOnly": {"lora_name": "loras"}, "ControlNetLoader": {"control_net_name": "controlnet"},
    "DiffControlNetLoader": {"control_net_name": "controlnet"}, "UpscaleModelLoader": {"model_name": "upscale_models"},
    "CLIPVisionLoader": {"clip_name": "clip_vision"}, "StyleModelLoader": {"style_model_name": "style_models"},
    "GLIGENLoader": {"gligen_name": "gligen"}, "HypernetworkLoader": {"hypernetwork_name": "hypernetworks"},
}
MAIN_INPUTS = ("ckpt_name", "unet_name")  # the file a workflow is "made with", for routing and the record


def model_inputs(graph: dict, models: AbstractSet[str] = frozenset()) -> list[tuple[str, str, str]]:
    """(node id, input, folder) of every input that names a model file (or one of the registered `models`)."""
    return [(node_id, name, folder) for node_id, node in graph.items()
            for name, folder in LOADERS.get(node["class_type"], {}).items()
            if isinstance(node["inputs"].get(name), str)
            and ("." in node["inputs"][name] or node["inputs"][name] in models)]


def _registry_files(registry: Registry) -> list[ModelFile]:
    files = list(registry.shared.values()) + [f for b in registry.bundles.values() for f in b.files.values()]
    return [f for f in files if f.downloadable or f.local_path]


def resolve_file(value: str, folder: str, registry: Registry, local: bool = True,
                 base: Path | None = None) -> tuple[ModelFile | None, str]:
    """The ModelFile a loader input names, and the name ComfyUI is to load it by: a local .safetensors path,
    a registered bundle's main file, a file in the cache or a shared tree, a registry file of that name.
    (None, value) when it is nowhere."""
    path = Path(value).expanduser()
    if base is not None and value.startswith("."):
        path = base / path  # ./model.safetensors: beside the prompts file of a batch, or here
    if local and path.is_absolute() and path.suffix == ".safetensors" and path.is_file():
        name = f"{LOCAL_SUBFOLDER}/{path.name}"
        return ModelFile(key=f"workflow.{path.name}", folder=folder, filename=name, local_path=str(path.absolute()),
                         size=path.stat().st_size), name
    bundle = registry.bundles.get(value)
    if bundle is not None:
        for role in ("checkpoint", "diffusion_model", "upscale_model"):
            if role in bundle.files and bundle.files[role].folder == folder:
                return bundle.files[role], bundle.files[role].filename
    plain = ModelFile(key=f"workflow.{value}", folder=folder, filename=value)
    if not local or cache.present_path(plain) is not None:
        return plain, value
    legacy = {"diffusion_models": "unet", "text_encoders": "clip"}.get(folder)
    if legacy and cache.present_path(replace(plain, folder=legacy)) is not None:
        return replace(plain, folder=legacy), value
    for file in _registry_files(registry):
        if file.folder == folder and (file.filename == value or Path(file.filename).name == Path(value).name):
            return file, file.filename
    return None, value


def resolve_models(path: Path, graph: dict, registry: Registry, local: bool = True,
                   base: Path | None = None) -> Bundle:
    """A Bundle for routing, budgets and fetching: every model file the graph names, its main model first.
    Loader inputs are rewritten to the names ComfyUI will find. Missing files are one error listing each."""
    files: dict[str, ModelFile] = {}
    missing = []
    refs = sorted(model_inputs(graph, set(registry.bundles)), key=lambda ref: ref[1] not in MAIN_INPUTS)
    for node_id, name, folder in refs:
        value = graph[node_id]["inputs"][name]
        file, comfy_name = resolve_file(value, folder, registry, local, base)
        if file is None:
            missing.append(f"{folder}/{value} (node {node_id}, {graph[node_id]['class_type']}.{name})")
            continue
        graph[node_id]["inputs"][name] = comfy_name
        files[f"{node_id}.{name}"] = _with_hash(file) if local else file
    if missing:
        raise ImagegenError("model_missing", f"{path.name} needs model file(s) that are neither in the cache, nor "
                            f"in IMAGEGEN_SHARED_MODELS, nor in the registry: {'; '.join(missing)}",
                            hint="Put each file in the cache folder named (see `imagegen models list`), point "
                                 "IMAGEGEN_SHARED_MODELS at your ComfyUI models folder, or --set the loader to a "
                                 "local .safetensors path.", missing=missing)
    main = next(iter(files.values()), None)
    family = "workflow"
    if main is not None and local:
        present = cache.present_path(main)
        if present is not None:
            try:
                family = modelfile.detect(modelfile.read_header(present)).family or "workflow"
            except ImagegenError:
                pass
    if family not in ("sd15", "sdxl", "flux"):
        family = "workflow"
    return Bundle(name=Path(main.filename).name if main else path.name, family=family, files=files,
                  source=str(path))


def _with_hash(file: ModelFile) -> ModelFile:
    """A present file with its size, and its sha256 for provenance: the registry's, the ledger's, or computed once
    and kept."""
    from imagegen.models.ledger import Ledger, sha256_file
    from imagegen.util import paths

    path = cache.present_path(file)
    if path is None:
        return file
    file = replace(file, size=file.size or path.stat().st_size)  # what routing sizes a GPU's memory by
    if file.sha256:
        return file
    ledger = Ledger(paths.models_dir())
    digest = ledger.lookup(path)
    if digest is None:
        digest = sha256_file(path)
        ledger.record(path, digest, "workflow")
    return replace(file, sha256=digest)
