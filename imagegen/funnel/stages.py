"""Funnel stages: what each stage draws, from the defaults, a YAML stage file (`--stages`) and flags.

A stage names a model (registered, or a local .safetensors file) and its settings. Its kind follows
from its place and model: the first stage draws from the prompt (txt2img); a later stage with an
upscale model upscales each picked image; any other later stage redraws each picked image (img2img
at `denoise`). Everything is checked here, before a worker starts. docs/funnel.md has the format.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from imagegen.engine import generate
from imagegen.models import cache, modelfile
from imagegen.models.registry import LOCAL_SUBFOLDER, Bundle, ModelFile, Registry
from imagegen.util.errors import ImagegenError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass
class Stage:
    name: str
    model: str                  # a registered model, or a .safetensors path (checkpoint or upscale model)
    count: int = 1              # the first stage: images; later stages: images per picked image
    keep: int | None = None     # how many of this stage's images go on (what --auto keeps)
    size: str | None = None     # WIDTHxHEIGHT (the model's default when omitted)
    steps: int | None = None
    cfg: float | None = None
    denoise: float | None = None
    sampler: str | None = None
    scheduler: str | None = None
    scale: int | None = None    # upscale: the output is the input times this (the model's own factor when omitted)


STAGE_TYPES = {"name": str, "model": str, "count": int, "keep": int, "size": str, "steps": int, "cfg": float,
               "denoise": float, "sampler": str, "scheduler": str, "scale": int}


def default_stages(registry: Registry) -> list[Stage]:
    flux = registry.bundles.get("flux-dev")
    polish = "flux-dev" if flux is not None and not cache.missing_files(flux) else "sdxl"
    return [Stage("drafts", "sd15", count=20, keep=8, size="512x512", steps=20),
            Stage("refine", "sdxl", keep=3, size="1024x1024", steps=25, denoise=0.55),
            Stage("polish", polish, keep=1, size="1024x1024", steps=28 if polish == "flux-dev" else 40, denoise=0.3),
            Stage("upscale", "realesrgan-x4", scale=2)]


# --- the stage file -----------------------------------------------------------------
def _bad(path: Path, line: int, message: str) -> ImagegenError:
    return ImagegenError("invalid_argument", f"{path}:{line}: {message}",
                         hint=f"Fix {path} at line {line}; docs/funnel.md describes the stage file.",
                         file=str(path), line=line)


def load_stage_file(path: Path) -> list[Stage]:
    """`stages:`, a list of mappings with the Stage fields; errors name the file and line."""
    import yaml

    from imagegen.models.registry import _line, _LineLoader

    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except OSError as exc:
        raise _bad(path, 0, f"cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise _bad(path, mark.line + 1 if mark else 0, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise _bad(path, getattr(data, "line", 1), "the file must be a mapping with a non-empty `stages:` list")
    if set(data) - {"schema", "stages"}:
        raise _bad(path, _line(data, sorted(set(data) - {"schema", "stages"})[0]),
                   "unknown top-level key (expected stages)")
    stages = []
    for raw in data["stages"]:
        if not isinstance(raw, dict):
            raise _bad(path, getattr(data, "key_lines", {}).get("stages", 1),
                       "each stage must be a mapping (name: ..., model: ...)")
        for key, value in raw.items():
            expected = STAGE_TYPES.get(key)
            if expected is None:
                raise _bad(path, _line(raw, key), f"unknown stage field {key!r} (known: {', '.join(STAGE_TYPES)})")
            if expected is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, expected) or isinstance(value, bool):
                raise _bad(path, _line(raw, key), f"{key}: expected {expected.__name__}, got {value!r}")
        for key in ("name", "model"):
            if key not in raw:
                raise _bad(path, _line(raw), f"a stage needs `{key}:`")
        values: dict[str, Any] = {k: float(v) if STAGE_TYPES[k] is float else v for k, v in raw.items()}
        stage = Stage(**values)
        if is_path(stage.model):  # a relative path is relative to the stage file
            stage.model = str((path.parent / Path(stage.model).expanduser()).resolve())
        try:
            check_stage(stage)
        except ImagegenError as error:
            raise _bad(path, _line(raw), error.message) from None
        stages.append(stage)
    return stages


def check_stage(stage: Stage) -> None:
    if not NAME_RE.match(stage.name):
        raise ImagegenError("invalid_argument",
                            f"stage name {stage.name!r}: use lowercase letters, digits, - and _ (it names a folder)")
    for key, low, high in (("count", 1, generate.MAX_COUNT), ("keep", 1, generate.MAX_COUNT), ("scale", 1, 8)):
        value = getattr(stage, key)
        if value is not None and not low <= value <= high:
            raise ImagegenError("invalid_argument", f"stage {stage.name}: {key} {value} is outside {low}..{high}")
    if stage.denoise is not None and not 0.0 < stage.denoise <= 1.0:
        raise ImagegenError("invalid_argument",
                            f"stage {stage.name}: denoise {stage.denoise} is outside 0..1 (0 keeps the image as it is)")


# --- flags on top of the stages ---------------------------------------------------------
def _values(flag: str, text: str | None, count: int, convert) -> list | None:
    """`--flag V` (every stage) or `--flag V1,V2,...` (one value per stage, in order)."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if count == 0 or len(items) not in (1, count):
        raise ImagegenError("invalid_argument", f"{flag} {text!r}: give one value, or {count} separated by commas "
                                                "(one per stage it applies to)")
    try:
        values = [convert(item) for item in items]
    except ValueError:
        raise ImagegenError("invalid_argument", f"{flag} {text!r}: not a list of {convert.__name__} values") from None
    return values * count if len(values) == 1 else values


def configure(stages: list[Stage], registry: Registry, *, models: dict[str, str | None], checkpoint: Path | None = None,
              drafts: int | None = None, keep: str | None = None, size: str | None = None, steps: str | None = None,
              denoise: str | None = None, scale: int | None = None) -> list[Stage]:
    """Apply the command line's flags; check every stage and resolve its model (nothing starts)."""
    checkpoint_path = str(Path(checkpoint).expanduser().resolve()) if checkpoint else None
    unknown = [name for name, value in models.items() if value is not None and name not in {s.name for s in stages}]
    if unknown:
        raise ImagegenError("invalid_argument",
                            f"--{unknown[0].removesuffix('s')}-model: there is no stage named {unknown[0]}",
                            hint="Stage names: " + ", ".join(s.name for s in stages)
                                 + "; set other stages' models in the stage file.")
    chosen = []
    for stage in stages:
        model = models.get(stage.name)
        if model is not None and is_path(model):
            model = str(Path(model).expanduser().resolve())  # the state file must work from any directory
        if model is None and checkpoint_path and not is_upscaler(stage.model, registry):
            model = checkpoint_path
        if model is not None and model.lower() == "none":
            if stage is stages[0]:
                raise ImagegenError("invalid_argument",
                                    f"the first stage ({stage.name}) cannot be skipped: it draws from the prompt")
            continue
        chosen.append(replace(stage, model=model or stage.model))
    if not chosen or is_upscaler(chosen[0].model, registry):
        raise ImagegenError("invalid_argument",
                            "the first stage must make images from the prompt (an SD1.5, SDXL or Flux model)")
    if drafts is not None:
        chosen[0] = replace(chosen[0], count=drafts)
    diffusion = [i for i, s in enumerate(chosen) if not is_upscaler(s.model, registry)]
    img2img = [i for i in diffusion if i > 0]
    for flag, text, where, field, convert in (("--keep", keep, range(len(chosen) - 1), "keep", int),
                                              ("--size", size, diffusion, "size", str),
                                              ("--steps", steps, diffusion, "steps", int),
                                              ("--denoise", denoise, img2img, "denoise", float)):
        values = _values(flag, text, len(where), convert)
        for i, value in zip(where, values or [], strict=False):  # no values: the flag was not given
            chosen[i] = replace(chosen[i], **{field: value})
    if scale is not None:
        chosen = [replace(s, scale=scale) if is_upscaler(s.model, registry) else s for s in chosen]
    if len({s.name for s in chosen}) != len(chosen):
        raise ImagegenError("invalid_argument", "two stages have the same name")
    for stage in chosen:
        check_stage(stage)
        bundle = resolve(stage.model, registry)
        if bundle.family != "upscale":
            # sizes, steps, samplers: refused now, not later
            generate.plan_jobs(stage_request(stage, "check", 0), bundle)
    return chosen


def is_upscaler(model: str, registry: Registry) -> bool:
    return resolve(model, registry).family == "upscale"


def is_path(model: str) -> bool:
    return model.endswith(".safetensors") or "/" in model or os.sep in model


def resolve(model: str, registry: Registry) -> Bundle:
    """A registered model by name, or a local .safetensors file (an SD1.5/SDXL checkpoint or an upscale model)."""
    if not is_path(model):
        return registry.get(model)
    path = Path(model).expanduser().resolve()
    if modelfile.detect(modelfile.read_header(path)).family == "upscale":
        file = ModelFile(key=f"{path.stem}.upscale_model", folder="upscale_models",
                         filename=f"{LOCAL_SUBFOLDER}/{path.name}",
                         local_path=str(path), size=path.stat().st_size)
        return Bundle(name=path.stem, family="upscale", files={"upscale_model": file}, source=str(path))
    return generate.resolve_bundle(generate.Request(prompt="", checkpoint=path), registry)


def stage_request(stage: Stage, prompt: str, seed: int, negative: str | None = None) -> generate.Request:
    return generate.Request(prompt=prompt, negative=negative, seed=seed, steps=stage.steps, cfg=stage.cfg,
                            size=stage.size, sampler=stage.sampler, scheduler=stage.scheduler)
