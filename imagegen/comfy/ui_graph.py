"""The editor's UI-format workflow (`nodes`/`links`, what ComfyUI's Save writes and a PNG's `workflow` chunk
holds) to the API format a worker runs, and back (a simple column layout, for imagegen's own PNGs).

Widget values are matched to inputs in the order of the node definitions (comfy/node_info.py): the
widget inputs of `required` then `optional`, each INT seed followed by the editor's extra
`control_after_generate` value and each image-upload input by its `upload` button's value. Editor-only
pieces are resolved as the pinned ComfyUI's editor (frontend 1.32) resolves them when it queues a graph
(Reroute nodes, PrimitiveNode values, notes, muted nodes, bypassed nodes: their input of the matching
type is passed through) and refused, naming the node, where they cannot be (group nodes and subgraphs).
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from imagegen.comfy import node_info
from imagegen.util.errors import ImagegenError

NOTES = {"Note", "MarkdownNote"}          # editor-only text boxes: nothing to run
MUTED, BYPASSED = 2, 4                    # a node's `mode` in the editor
CONTROL, UPLOAD = "\0control", "\0upload"  # the editor's extra widgets, which are not inputs
HINT = "Export the workflow with the editor's Export (API) instead, or simplify the node named."


@dataclass
class Converted:
    graph: dict                                            # API format: {id: {class_type, inputs, _meta}}
    # (node id, input) -> (UI node id, index in its widgets_values): where the editor keeps the value
    slots: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)


def is_ui(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _refuse(message: str, hint: str = HINT) -> ImagegenError:
    return ImagegenError("invalid_workflow", message, hint=hint)


def _links(ui: dict) -> dict[int, tuple[int, int, int, int, str]]:
    """link id -> (from node, from slot, to node, to slot, type); both the list and the object styles."""
    found = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            link = [link.get("id"), link.get("origin_id"), link.get("origin_slot"), link.get("target_id"),
                    link.get("target_slot"), link.get("type")]
        if not isinstance(link, list) or len(link) < 5:
            raise _refuse(f"the workflow's links are malformed (e.g. {link!r})")
        found[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else "*")
    return found


def _name(node: dict) -> str:
    return f"node {node.get('id')} ({node.get('type')})"


def to_api(ui: dict, info: dict | None = None) -> Converted:
    """The API graph of a UI-format workflow; unknown node classes are refused by the caller's check
    (node_info-style) first, so here each type is either known, editor-only, or refused."""
    info = info if info is not None else node_info.pinned()
    nodes = {node.get("id"): node for node in ui["nodes"] if isinstance(node, dict)}
    links = _links(ui)
    groups = set((ui.get("extra") or {}).get("groupNodes") or {})
    subgraphs = {s.get("id") for s in ((ui.get("definitions") or {}).get("subgraphs") or []) if isinstance(s, dict)}
    for node in nodes.values():
        kind = str(node.get("type"))
        if kind in subgraphs or kind.startswith("workflow>") or kind.split(">")[-1] in groups:
            raise _refuse(f"{_name(node)} is a group node or subgraph; imagegen runs only plain nodes",
                          hint="Unpack it in the editor (right-click: Convert to nodes / Unpack Subgraph), save, "
                               "and run that file.")
    unknown = {str(node.get("id")): str(node.get("type")) for node in nodes.values()
               if node.get("type") not in info and node.get("type") not in NOTES | {"Reroute", "PrimitiveNode"}
               and node.get("mode") not in (MUTED, BYPASSED)}  # the editor sends neither: any class will do
    if unknown:
        raise unknown_classes(unknown)
    converted = Converted({})
    for node_id, node in nodes.items():
        if node.get("type") in NOTES | {"Reroute", "PrimitiveNode"} or node.get("mode") in (MUTED, BYPASSED):
            continue
        converted.graph[str(node_id)] = _convert(node, info, nodes, links, converted.slots)
    return converted


def _origin(link_id, want: str, nodes: dict, links: dict, info: dict, seen: frozenset = frozenset()):
    """Where a link's data comes from, for an input of type `want`: ("node", id, slot); ("value", v, id) for a
    PrimitiveNode; ("none", why) when nothing is connected (a bypassed node with no input to pass on: the input
    keeps its widget value, if any); None when the source is muted or missing (the editor drops the input)."""
    if link_id not in links or link_id in seen:
        return None
    seen = seen | {link_id}
    source_id, slot = links[link_id][0], links[link_id][1]
    source = nodes.get(source_id)
    if source is None or source.get("mode") == MUTED:
        return None
    if source.get("type") == "Reroute":
        upstream = [item.get("link") for item in source.get("inputs") or [] if item.get("link") is not None]
        return _origin(upstream[0], want, nodes, links, info, seen) if upstream else ("none", f"{_name(source)} "
                                                                                              "has no input")
    if source.get("type") == "PrimitiveNode":
        values = source.get("widgets_values") or []
        if not values:
            raise _refuse(f"{_name(source)} holds no value")
        return ("value", values[0], str(source_id))
    if source.get("mode") == BYPASSED:
        inputs = _live_inputs(source, info)
        index = _bypass_slot(inputs, int(slot), want, _output_type(source, int(slot), info))
        if index < 0 or inputs[index].get("link") is None:
            return ("none", f"{_name(source)} is bypassed and has no connected input of type {want} to pass on")
        return _origin(inputs[index]["link"], str(inputs[index].get("type") or "*"), nodes, links, info, seen)
    return ("node", str(source_id), int(slot))


def _live_inputs(node: dict, info: dict) -> list[dict]:
    """A node's inputs as the editor holds them (its saved file leaves unconnected widget inputs out): every
    link slot of its definition in order, then every widget input in order, then any the definition lacks."""
    saved = {item.get("name"): item for item in node.get("inputs") or [] if isinstance(item, dict)}
    schema = info.get(node.get("type"))
    if schema is None:
        return sorted(saved.values(), key=lambda item: bool(item.get("widget")))
    specs = node_info.ordered_inputs(schema)
    ordered = [name for name, spec in specs if not node_info.is_widget(spec)] + \
        [name for name, spec in specs if node_info.is_widget(spec)]
    kinds = {name: node_info.kind_of(spec)[0] for name, spec in specs}
    return [saved.get(name) or {"name": name, "type": kinds[name], "link": None} for name in ordered] + \
        [item for name, item in saved.items() if name not in kinds]


def _output_type(node: dict, slot: int, info: dict) -> str:
    outputs = node.get("outputs") or []
    if slot < len(outputs) and isinstance(outputs[slot], dict) and outputs[slot].get("type"):
        return str(outputs[slot]["type"])
    declared = (info.get(node.get("type")) or {}).get("output") or []
    return str(declared[slot]) if slot < len(declared) else "*"


def _bypass_slot(inputs: list[dict], slot: int, want: str, output_type: str) -> int:
    """The input a bypassed node passes to its output `slot`, as the editor picks it: the input of the same
    index if its type fits, else the first of exactly the wanted type, else the first that fits; -1 if none."""
    if want in ("*", ""):
        return slot if len(inputs) > slot else (0 if inputs else -1)
    kinds = [str(item.get("type") or "*") for item in inputs]
    if slot < len(kinds) and _fits(kinds[slot], output_type) and _fits(kinds[slot], want):
        return slot
    if want in kinds:
        return kinds.index(want)
    return next((i for i, kind in enumerate(kinds) if _fits(kind, output_type) and _fits(kind, want)), -1)


def _fits(a: str, b: str) -> bool:
    """LiteGraph's isValidConnection: wildcards, equal types, or comma lists sharing a type (case-insensitive)."""
    if a in ("", "*") or b in ("", "*") or a == b:
        return True
    a, b = a.lower(), b.lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_fits(x, y) for x in a.split(",") for y in b.split(","))


def _widget_names(schema: dict) -> list[str]:
    names = []
    for name, spec in node_info.ordered_inputs(schema):
        if node_info.is_widget(spec):
            names.append(name)
            if node_info.has_control_widget(spec):
                names.append(CONTROL)
            if node_info.has_upload_widget(spec):
                names.append(UPLOAD)
    return names


def _align(node: dict, schema: dict) -> dict[str, tuple[int, object]]:
    """input name -> (index in widgets_values, value). Editors of other versions save the extra control
    and upload widgets or not: the layout whose length matches is taken, and none matching is refused."""
    values = node.get("widgets_values")
    if values is None:
        return {}
    full = _widget_names(schema)
    if isinstance(values, dict):
        return {name: (-1, values[name]) for name in full if name in values}
    if not isinstance(values, list):
        raise _refuse(f"{_name(node)}: widgets_values is neither a list nor an object")
    layouts = [full, [n for n in full if n != UPLOAD], [n for n in full if n != CONTROL],
               [n for n in full if n not in (CONTROL, UPLOAD)]]
    for layout in layouts:
        if len(layout) == len(values):
            return {name: (index, values[index]) for index, name in enumerate(layout) if not name.startswith("\0")}
    plain = [n for n in full if not n.startswith("\0")]
    raise _refuse(f"{_name(node)} has {len(values)} widget values, but {node.get('type')} of ComfyUI's node "
                  f"definitions has {len(plain)} widgets ({', '.join(plain) or 'none'}): it was saved by another "
                  "version of the node", hint="Open and save the workflow in the pinned ComfyUI, or use "
                                              "Export (API).")


def _convert(node: dict, info: dict, nodes: dict, links: dict, slots: dict) -> dict:
    schema = info[node["type"]]
    inputs: dict = {}
    for name, (index, value) in _align(node, schema).items():
        inputs[name] = value
        slots[(str(node["id"]), name)] = (str(node["id"]), index)
    for item in node.get("inputs") or []:
        name, link_id = item.get("name"), item.get("link")
        if link_id is None or node_info.spec_of(schema, name) is None:
            continue
        origin = _origin(link_id, str(item.get("type") or node_info.kind_of(node_info.spec_of(schema, name))[0]),
                         nodes, links, info)
        if origin is None or origin[0] == "none":
            if origin is None:
                inputs.pop(name, None)
            if node_info.is_required(schema, name) and name not in inputs:
                why = "comes from a muted or missing node" if origin is None else f"gets nothing: {origin[1]}"
                raise _refuse(f"{_name(node)}: its input {name!r} {why}",
                              hint="Unmute or un-bypass that node, or reconnect the input in the editor, save, and "
                                   "run that file.")
        elif origin[0] == "value":
            inputs[name] = origin[1]
            slots[(str(node["id"]), name)] = (origin[2], 0)
        else:
            inputs[name] = [origin[1], origin[2]]
            slots.pop((str(node["id"]), name), None)
    meta = {"title": str(node.get("title") or schema.get("display_name") or node["type"])}
    return {"inputs": inputs, "class_type": node["type"], "_meta": meta}


def unknown_classes(unknown: dict[str, str]) -> ImagegenError:
    """The refusal of node classes the pinned ComfyUI lacks (custom nodes), naming each class and node."""
    by_class: dict[str, list[str]] = {}
    for node_id, kind in unknown.items():
        by_class.setdefault(kind, []).append(node_id)
    listed = "; ".join(f"{kind} (node {', '.join(ids)})" for kind, ids in sorted(by_class.items()))
    from imagegen import COMFYUI_VERSION

    return ImagegenError("unknown_node_class", f"the workflow uses node classes ComfyUI {COMFYUI_VERSION} does not "
                         f"have (custom nodes): {listed}",
                         hint="imagegen never installs custom nodes: replace those nodes with core ones in the "
                              "editor, save, and run that file.", classes=sorted(by_class))


# --- API -> UI ----------------------------------------------------------------------------------------------
COLUMN, ROW = 380, 280  # the layout's grid, in editor units


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def from_api(graph: dict, info: dict | None = None) -> dict:
    """A UI-format workflow for an API graph: one column per depth, titles = the API node ids (imagegen's
    are readable: positive, sampler, ...) unless the graph names its own."""
    info = info if info is not None else node_info.pinned()
    ids = {node_id: index for index, node_id in enumerate(graph, start=1)}
    depth: dict[str, int] = {}

    def depth_of(node_id: str, trail: frozenset = frozenset()) -> int:
        if node_id not in depth:
            sources = [v[0] for v in graph[node_id]["inputs"].values() if _is_link(v) and v[0] in graph]
            depth[node_id] = 1 + max((depth_of(s, trail | {node_id}) for s in sources if s not in trail), default=-1)
        return depth[node_id]

    rows: dict[int, int] = {}
    link_ids = itertools.count(1)
    links: list[list] = []
    ui_nodes: list[dict[str, Any]] = []
    for node_id, node in graph.items():
        schema = info[node["class_type"]]
        column = depth_of(node_id)
        row = rows[column] = rows.get(column, -1) + 1
        inputs: list[dict] = []
        values: list = []
        for name, spec in node_info.ordered_inputs(schema):
            kind, options = node_info.kind_of(spec)
            value = node["inputs"].get(name)
            link = None
            if _is_link(value) and value[0] in graph:
                source_type = info[graph[value[0]]["class_type"]]["output"][value[1]]
                link = next(link_ids)
                links.append([link, ids[value[0]], value[1], ids[node_id], len(inputs), source_type])
            if node_info.is_widget(spec):
                if link is not None:
                    inputs.append({"name": name, "type": kind, "widget": {"name": name}, "link": link})
                values.append(_default(kind, options) if link is not None or name not in node["inputs"] else value)
                if node_info.has_control_widget(spec):
                    values.append("fixed")
                if node_info.has_upload_widget(spec):
                    values.append("image")
            elif link is not None or node_info.is_required(schema, name):
                inputs.append({"name": name, "type": kind, "link": link})
        title = (node.get("_meta") or {}).get("title") or node_id
        ui_nodes.append({"id": ids[node_id], "type": node["class_type"], "title": title,
                         "pos": [40 + column * COLUMN, 40 + row * ROW], "size": [320, 40 + 26 * len(values)],
                         "flags": {}, "order": ids[node_id] - 1, "mode": 0, "inputs": inputs,
                         "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
                         "widgets_values": values, "_outputs": schema["output"]})
    for ui_node in ui_nodes:
        kinds = ui_node.pop("_outputs")
        ui_node["outputs"] = [{"name": kind, "type": kind, "slot_index": slot,
                               "links": [edge[0] for edge in links if edge[1] == ui_node["id"] and edge[2] == slot]}
                              for slot, kind in enumerate(kinds)]
    for edge in links:  # a link's target slot is the index in the target's inputs list
        target = ui_nodes[edge[3] - 1]
        edge[4] = next(i for i, item in enumerate(target["inputs"]) if item["link"] == edge[0])
    return {"last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"imagegen": True}, "version": 0.4}


def _default(kind: str, options: dict):
    """What the editor shows in a widget the graph leaves unset: its default, else a combo's first choice."""
    if "default" in options:
        return options["default"]
    choices = options.get("choices") or []
    return choices[0] if kind == "COMBO" and choices else None


def workflow_chunk(data: bytes, ui: dict | None = None) -> dict[str, str]:
    """{"workflow": UI JSON} to add to a PNG that has no `workflow` chunk: `ui`, else a layout of the graph
    in its `prompt` chunk (ComfyUI's SaveImage writes it). {} when neither can be had."""
    from imagegen.comfy import png

    try:
        chunks = png.read_text_chunks(data)
        if "workflow" in chunks:
            return {}
        if ui is None:
            ui = from_api(json.loads(chunks["prompt"])) if "prompt" in chunks else None
    except (ValueError, KeyError, TypeError, IndexError, StopIteration, RecursionError):
        return {}  # a graph this package cannot lay out: the image keeps its prompt chunk only
    return {"workflow": json.dumps(ui)} if ui is not None else {}


def patched(ui: dict, slots: dict[tuple[str, str], tuple[str, int]], changes: dict[tuple[str, str], object]) -> dict:
    """The UI workflow with changed widget values written in (so it reopens as it ran)."""
    result = copy.deepcopy(ui)
    by_id = {str(node.get("id")): node for node in result.get("nodes") or [] if isinstance(node, dict)}
    for (node_id, name), value in changes.items():
        ui_id, index = slots.get((node_id, name), (None, -1))
        node = by_id.get(str(ui_id))
        if node is None:
            continue
        values = node.get("widgets_values")
        if isinstance(values, dict):
            values[name] = value
        elif isinstance(values, list) and 0 <= index < len(values):
            values[index] = value
    return result
