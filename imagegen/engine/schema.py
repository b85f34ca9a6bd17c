"""JSON Schemas of the records imagegen prints with --json: results, errors, models and workers.

Each record carries its schema name in a `schema` field ("imagegen.result/1"), which is the `$id`
here. Adding a field keeps the version; removing or retyping one bumps it. So records may carry
properties beyond those listed, and the `required` lists are what a consumer can rely on.
`imagegen schema --json` prints these; tests hold real output to them.
"""

from __future__ import annotations

from imagegen.engine.output import RESULT_SCHEMA
from imagegen.models.cache import MODEL_SCHEMA
from imagegen.models.registry import FAMILIES as _FAMILIES
from imagegen.util.errors import ERROR_SCHEMA, ERRORS

DIALECT = "https://json-schema.org/draft/2020-12/schema"
WORKER_SCHEMA = "imagegen.worker/1"
FAMILIES = list(_FAMILIES)

_string_or_null = {"type": ["string", "null"]}
_int_or_null = {"type": ["integer", "null"]}
_seconds = {"type": "number", "minimum": 0}


def _tag(name: str) -> dict:
    return {"const": name, "description": "The schema name and version of this record."}


RESULT = {
    "$schema": DIALECT,
    "$id": RESULT_SCHEMA,
    "title": "One generated image",
    "description": "One line on stdout per image with --json (generate, batch, funnel).",
    "type": "object",
    "required": ["schema", "path", "prompt", "negative", "model", "family", "seed", "width", "height", "steps", "cfg",
                 "sampler", "scheduler", "denoise", "imagegen_version", "comfyui_version", "files", "worker",
                 "device", "timings"],
    "properties": {
        "schema": _tag(RESULT_SCHEMA),
        "path": {"type": "string", "description": "Absolute path of the PNG, or \"-\" when it went to stdout."},
        "prompt": {"type": "string"},
        "negative": {"type": "string"},
        "model": {"type": "string", "description": "Registered model name, or the checkpoint's file stem."},
        "family": {"enum": [*FAMILIES, "workflow"], "description": "workflow: imagegen run of a graph whose main "
                   "model is not a known SD1.5/SDXL checkpoint."},
        "seed": {"type": "integer", "minimum": 0},
        "width": {"type": "integer", "minimum": 16},
        "height": {"type": "integer", "minimum": 16},
        "steps": {"type": "integer", "minimum": 1},
        "cfg": {"type": "number", "minimum": 0},
        "guidance": {"type": "number", "minimum": 0, "description": "Flux only."},
        "sampler": {"type": "string"},
        "scheduler": {"type": "string"},
        "denoise": {"type": "number", "minimum": 0, "maximum": 1},
        "fast": {"const": True,
                 "description": "Present when rendered in fast mode (--fast: torch.compile, fp8 matmul)."},
        "model_hash": {"type": "string", "description": "sha256 of the checkpoint or diffusion model, when known."},
        "inputs": {
            "type": "object",
            "description": "The user's own images it was made from (--image, --mask): img2img and inpainting.",
            "properties": {role: {"type": "object", "required": ["name", "path", "sha256"],
                                  "properties": {"name": {"type": "string"},
                                                 "path": {"type": "string", "description": "Absolute, as given."},
                                                 "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                                            "description": "Of the file's bytes."}}}
                           for role in ("image", "mask")},
        },
        "mask_grow": {"type": "integer", "minimum": 0, "description": "Inpainting: pixels the mask was grown by."},
        "extend": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 4, "maxItems": 4,
                   "description": "Outpainting (--extend): pixels added left, top, right, bottom."},
        "loras": {
            "type": "array",
            "description": "The LoRA stack, in order (--lora, then <lora:...> prompt tags).",
            "items": {"type": "object", "required": ["name", "sha256", "strength"],
                      "properties": {"name": {"type": "string", "description": "Registry name, or the file's name."},
                                     "file": {"type": "string", "description": "The name in the loras folder."},
                                     "sha256": _string_or_null, "strength": {"type": "number"}}},
        },
        "controls": {
            "type": "array",
            "description": "The ControlNets, in order (--control).",
            "items": {"type": "object",
                      "required": ["model", "sha256", "image_sha256", "strength", "start", "end", "preprocess"],
                      "properties": {"model": {"type": "string"}, "file": {"type": "string"}, "sha256": _string_or_null,
                                     "image": _string_or_null, "image_path": _string_or_null,
                                     "image_sha256": _string_or_null,
                                     "strength": {"type": "number", "minimum": 0},
                                     "start": {"type": "number", "minimum": 0, "maximum": 1},
                                     "end": {"type": "number", "minimum": 0, "maximum": 1},
                                     "preprocess": {"enum": ["canny", None]}}},
        },
        "hires": {
            "type": "object",
            "description": "generate --hires: the second pass. width/height above are the final image's.",
            "required": ["scale", "denoise", "steps", "upscaler", "first_width", "first_height"],
            "properties": {"scale": {"type": "number", "exclusiveMinimum": 1, "maximum": 4},
                           "denoise": {"type": "number", "minimum": 0, "maximum": 1},
                           "steps": {"type": "integer", "minimum": 1},
                           "upscaler": {"type": "string", "description": "lanczos, latent, or the upscale model."},
                           "first_width": {"type": "integer", "minimum": 16},
                           "first_height": {"type": "integer", "minimum": 16}},
        },
        "upscale": {
            "type": "object",
            "description": "imagegen upscale: the image it enlarged (family is upscale, model the upscale model).",
            "required": ["source", "model", "scale"],
            "properties": {"source": {"type": "object", "required": ["path", "sha256", "width", "height"],
                                      "properties": {"path": {"type": "string"},
                                                     "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                                     "width": {"type": "integer"}, "height": {"type": "integer"}}},
                           "model": {"type": "string"}, "scale": {"type": "number", "minimum": 1}},
        },
        "warnings": {"type": "array", "items": {"type": "string"},
                     "description": "What went partly wrong, e.g. LoRA keys the worker could not apply."},
        "workflow": {
            "type": "object",
            "description": "imagegen run: the user's own graph. files are keyed NODE.input of each loader.",
            "required": ["name", "sha256", "format", "set", "inputs"],
            "properties": {"name": {"type": "string"}, "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                           "format": {"enum": ["api", "ui", "png"]},
                           "set": {"type": "object", "description": "Every --set KEY=VALUE applied, as given."},
                           "inputs": {"type": "object", "description": "Uploaded files by NODE.input.",
                                      "additionalProperties": {"type": "object", "required": ["path", "sha256"]}},
                           "output_node": _string_or_null},
        },
        "imagegen_version": {"type": "string"},
        "comfyui_version": {"type": "string"},
        "files": {
            "type": "object",
            "description": "The bundle's files by role (checkpoint, diffusion_model, t5, clip_l, vae).",
            "additionalProperties": {
                "type": "object",
                "required": ["name", "sha256"],
                "properties": {"name": {"type": "string"}, "sha256": _string_or_null},
            },
        },
        "worker": {"type": "string"},
        "device": {"type": "string", "description": "\"cpu\" or the GPU the worker runs on."},
        "timings": {
            "type": "object",
            "description": "Seconds: ComfyUI phases (queued, loading, sampling, finishing) and our fetch, write, "
            "since_submit.",
            "required": ["fetch", "write", "since_submit"],
            "additionalProperties": _seconds,
        },
    },
}

ERROR = {
    "$schema": DIALECT,
    "$id": ERROR_SCHEMA,
    "title": "An error",
    "description": "With --json, the last line on stderr of a failed command; the exit code matches exit_code.",
    "type": "object",
    "required": ["schema", "code", "message", "hint", "exit_code"],
    "properties": {
        "schema": _tag(ERROR_SCHEMA),
        "code": {"description": "A stable snake_case code; each is listed with its meaning and exit code.",
                 "oneOf": [{"const": code, "description": f"{kind.meaning} (exit {kind.exit_code})"}
                           for code, kind in ERRORS.items()]},
        "message": {"type": "string"},
        "hint": {"type": "string", "description": "What to do next, often a command to run."},
        "exit_code": {"enum": sorted({kind.exit_code for kind in ERRORS.values()})},
        "details": {"type": "object", "description": "Code-specific extras (e.g. the timed-out phase)."},
    },
}

MODEL = {
    "$schema": DIALECT,
    "$id": MODEL_SCHEMA,
    "title": "A registered model",
    "description": "One line per model from `imagegen models list --json`.",
    "type": "object",
    "required": ["schema", "name", "family", "installed", "size_bytes", "missing_bytes", "gated", "description",
                 "source", "defaults", "files"],
    "properties": {
        "schema": _tag(MODEL_SCHEMA),
        "name": {"type": "string"},
        "family": {"enum": FAMILIES},
        "base": {"enum": ["sd15", "sdxl", "flux", None],
                 "description": "A lora or controlnet entry's model family; null for other models."},
        "installed": {"type": "boolean", "description": "Every file is on disk (cache, local file or shared tree)."},
        "size_bytes": {"type": "integer", "minimum": 0},
        "missing_bytes": {"type": "integer", "minimum": 0},
        "gated": {"type": "boolean"},
        "description": {"type": "string"},
        "source": {"type": "string", "description": "\"builtin\", or the models.yaml or file it came from."},
        "defaults": {
            "type": "object",
            "required": ["width", "height", "steps", "cfg", "sampler", "scheduler"],
            "properties": {"width": _int_or_null, "height": _int_or_null, "steps": _int_or_null,
                           "cfg": {"type": ["number", "null"]}, "sampler": _string_or_null,
                           "scheduler": _string_or_null},
        },
        "files": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["folder", "name", "repo", "revision", "size", "sha256", "local"],
                "properties": {"folder": {"type": "string"}, "name": {"type": "string"}, "repo": _string_or_null,
                               "revision": _string_or_null, "size": _int_or_null, "sha256": _string_or_null,
                               "local": _string_or_null},
            },
        },
    },
}

WORKER = {
    "$schema": DIALECT,
    "$id": WORKER_SCHEMA,
    "title": "A running worker",
    "description": "One line per worker from `imagegen workers --json`. The worker-reported fields are null when it "
    "did not answer.",
    "type": "object",
    "required": ["schema", "name", "runtime", "slot", "device", "url", "last_model", "idle_seconds", "jobs_done",
                 "keep_warm", "imagegen_version"],
    "properties": {
        "schema": _tag(WORKER_SCHEMA),
        "name": {"type": "string"},
        "runtime": {"enum": ["local", "docker"]},
        "slot": {"type": "string", "description": "\"cpu\", or a GPU index or UUID."},
        "device": _string_or_null,
        "url": _string_or_null,
        "pid": {"type": ["integer", "null"], "description": "Local runtime only."},
        "container": {"type": "string", "description": "Docker runtime only: the short container id."},
        "host": {"type": "string", "description": "With --hosts: the host the worker runs on, as named there."},
        "last_model": _string_or_null,
        "idle_seconds": {"type": ["number", "null"]},
        "jobs_done": _int_or_null,
        "keep_warm": {"type": ["number", "null"]},
        "imagegen_version": _string_or_null,
    },
}

FUNNEL_STATUS_SCHEMA = "imagegen.funnel_status/1"  # funnel/pipeline.py STATUS_SCHEMA

FUNNEL_STATUS = {
    "$schema": DIALECT,
    "$id": FUNNEL_STATUS_SCHEMA,
    "title": "Where a funnel stands",
    "description": "The last line of `imagegen funnel run|resume --json`, and what the MCP funnel tools answer.",
    "type": "object",
    "required": ["schema", "dir", "status", "next", "command"],
    "properties": {
        "schema": _tag(FUNNEL_STATUS_SCHEMA),
        "dir": {"type": "string"},
        "status": {"enum": ["awaiting_pick", "incomplete", "done"]},
        "next": {"type": "object", "required": ["action"],
                 "properties": {"action": {"enum": ["pick", "render", "done"]}, "stage": {"type": "integer"},
                                "name": {"type": "string"}, "keep": {"type": "integer"}}},
        "command": {**_string_or_null, "description": "The command that continues it (null when done)."},
        "stage": {"type": "integer", "minimum": 1},
        "sheet": {**_string_or_null, "description": "The contact sheet to pick from, or the last stage's."},
        "keep": {"type": "integer", "minimum": 1},
        "choices": {"type": "array", "items": {"type": "integer"}, "description": "The numbers one may pick."},
        "final": {"type": "array", "items": {"type": "string"}, "description": "When done: the final images."},
    },
}

SCHEMAS: dict[str, dict] = {str(schema["$id"]): schema for schema in (RESULT, ERROR, MODEL, WORKER, FUNNEL_STATUS)}
