"""Node definitions (ComfyUI's /object_info): the pinned ComfyUI's, checked in, and how to read one.

Before any worker is known, a workflow is checked against the pinned ComfyUI 0.3.75's node classes:
`node_info_pinned.json` is its /object_info, trimmed to what conversion and validation read (input
order and types, limits, choices, outputs). Lists of files (checkpoints, input images) are empty
there: they are the worker's. tests/test_ui_graph.py holds the file to the real server.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

PINNED_FILE = Path(__file__).with_name("node_info_pinned.json")
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
KEPT_OPTIONS = ("default", "min", "max", "step", "round", "control_after_generate", "image_upload", "forceInput",
                "multiline")


@functools.cache
def pinned() -> dict:
    """The pinned ComfyUI's node definitions (trimmed /object_info)."""
    return json.loads(PINNED_FILE.read_text(encoding="utf-8"))


def dumps(trimmed: dict) -> str:
    """The checked-in file's text (inputs keep their order: it is the editor's widget order)."""
    return json.dumps(trimmed, separators=(",", ":")) + "\n"


def trim(info: dict) -> dict:
    """The parts of an /object_info answer this package reads, file lists emptied (they are a worker's)."""
    trimmed = {}
    for name, schema in sorted(info.items()):
        inputs = {}
        for section in ("required", "optional"):
            specs = (schema.get("input") or {}).get(section) or {}
            if specs:
                inputs[section] = {key: _trim_spec(spec) for key, spec in specs.items()}
        order = {section: list(names) for section, names in (schema.get("input_order") or {}).items()
                 if section in inputs}
        trimmed[name] = {"input": inputs, "input_order": order, "output": list(schema.get("output") or []),
                         "output_node": bool(schema.get("output_node")),
                         "display_name": str(schema.get("display_name") or name)}
    return trimmed


def _trim_spec(spec) -> list:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else "*"
    options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    kept = {key: options[key] for key in KEPT_OPTIONS if key in options}
    if isinstance(kind, list):
        return [list(kind), kept]
    if kind == "COMBO":
        return ["COMBO", {**kept, "options": list(options.get("options") or [])}]
    return [kind, kept]


def kind_of(spec) -> tuple[str, dict]:
    """(kind, options) of an input spec: INT, FLOAT, STRING, BOOLEAN, COMBO (options["choices"]) or a link type."""
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else "*"
    options = dict(spec[1]) if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, list):
        return "COMBO", {**options, "choices": [str(c) for c in kind]}
    if kind == "COMBO":
        return "COMBO", {**options, "choices": [str(c) for c in options.get("options") or []]}
    return str(kind), options


def is_widget(spec) -> bool:
    """Whether the editor shows this input as a widget (a value) rather than a link slot."""
    kind, options = kind_of(spec)
    return kind in WIDGET_KINDS and not options.get("forceInput")


def ordered_inputs(schema: dict) -> list[tuple[str, list]]:
    """A node's inputs in the order the editor lays them out: required, then optional."""
    inputs = schema.get("input") or {}
    order = schema.get("input_order") or {}
    found = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = [n for n in order.get(section, []) if n in specs] or list(specs)
        found += [(name, specs[name]) for name in names]
    return found


def spec_of(schema: dict, name: str):
    inputs = schema.get("input") or {}
    return (inputs.get("required") or {}).get(name) or (inputs.get("optional") or {}).get(name)


def is_required(schema: dict, name: str) -> bool:
    return name in ((schema.get("input") or {}).get("required") or {})


def has_control_widget(spec) -> bool:
    """INT seeds get an extra `control_after_generate` widget in the editor (fixed/randomize/...)."""
    kind, options = kind_of(spec)
    return kind == "INT" and bool(options.get("control_after_generate"))


def has_upload_widget(spec) -> bool:
    """LoadImage-style inputs get an extra `upload` button widget, whose value the editor saves too."""
    return bool(kind_of(spec)[1].get("image_upload"))
