"""The settable leaves of an API-format graph, and `--set KEY=VALUE` on them.

A KEY names a leaf three ways: `ID.input` (the node id), `Title.input` (the node's title, `_meta.title`),
or a well-known name that is resolved by walking the graph: prompt, negative, seed, steps, cfg, size,
denoise, image, checkpoint (e.g. `prompt` is the text of the encoder feeding the sampler's positive
input). Values are checked against the node definitions: type, range, and the choices of a list.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagegen.comfy import choices, node_info
from imagegen.util.errors import ImagegenError

WELL_KNOWN = ("prompt", "negative", "seed", "steps", "cfg", "size", "denoise", "image", "checkpoint")
SAMPLERS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"}
SEED_INPUTS = ("seed", "noise_seed")
TEXT_INPUTS = ("text", "text_g", "text_l", "clip_l", "clip_g", "t5xxl")  # an encoder's prompt boxes (SDXL: g and l)
HINT = "Run `imagegen run WORKFLOW --list-params` to see every key and its type."
Ref = tuple[str, str]  # (node id, input name)
OWNED = {("SaveImage", "filename_prefix"), ("PreviewImage", "filename_prefix")}  # imagegen names its own outputs


@dataclass
class Leaf:
    node: str
    input: str
    class_type: str
    title: str
    kind: str              # INT, FLOAT, STRING, BOOLEAN, COMBO
    options: dict
    value: Any

    @property
    def key(self) -> str:
        return f"{self.node}.{self.input}"

    @property
    def is_upload(self) -> bool:
        return bool(self.options.get("image_upload"))


@dataclass
class Applied:
    graph: dict
    changes: dict[Ref, Any] = field(default_factory=dict)
    uploads: dict[Ref, Path] = field(default_factory=dict)   # local files to upload, by the input they feed
    settings: dict[str, Any] = field(default_factory=dict)   # every KEY=VALUE applied, as given (for provenance)


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def leaves(graph: dict, info: dict | None = None) -> dict[Ref, Leaf]:
    """Every input of the graph that holds a value (not a link) and is a widget of its node class."""
    info = info if info is not None else node_info.pinned()
    found = {}
    for node_id, node in graph.items():
        schema = info.get(node.get("class_type"))
        if schema is None:
            continue
        title = str((node.get("_meta") or {}).get("title") or "")
        for name, value in (node.get("inputs") or {}).items():
            spec = node_info.spec_of(schema, name)
            if spec is None or _is_link(value) or not node_info.is_widget(spec) or (node["class_type"], name) in OWNED:
                continue
            kind, options = node_info.kind_of(spec)
            found[(str(node_id), name)] = Leaf(str(node_id), name, node["class_type"], title, kind, options, value)
    return found


# --- well-known names ---------------------------------------------------------------------------------------
def _source(graph: dict, node_id: str, name: str) -> str | None:
    value = (graph.get(node_id) or {}).get("inputs", {}).get(name)
    return str(value[0]) if _is_link(value) and str(value[0]) in graph else None


PRIMITIVES = {"PrimitiveInt", "PrimitiveFloat", "PrimitiveString", "PrimitiveStringMultiline", "PrimitiveBoolean"}


def _held(graph: dict, ref: Ref) -> Ref | None:
    """The leaf holding an input's value: the input itself, or the core Primitive node (Int, String, ...) that
    feeds it, the editor's way to share one value; None when another kind of node computes it."""
    value = (graph[ref[0]].get("inputs") or {}).get(ref[1])
    if not _is_link(value):
        return ref if value is not None else None
    source = _source(graph, *ref)
    return (source, "value") if source is not None and graph[source].get("class_type") in PRIMITIVES else None


def _text_encoder(graph: dict, node_id: str | None, role: str, hops: int = 0) -> list[Ref]:
    """Walk a conditioning chain back to the node holding its text (CLIPTextEncode and its kin): each of its
    prompt boxes (CLIPTextEncodeSDXL's text_g and text_l, CLIPTextEncodeFlux's clip_l and t5xxl)."""
    if node_id is None or hops > 32:
        return []
    inputs = graph[node_id].get("inputs") or {}
    texts = [_held(graph, (node_id, name)) for name in TEXT_INPUTS if name in inputs]
    if any(texts):
        return [ref for ref in texts if ref is not None]
    for name in (role, "conditioning", "conditioning_to", "cond1"):
        if _is_link(inputs.get(name)):
            return _text_encoder(graph, _source(graph, node_id, name), role, hops + 1)
    return []


def _sampler_refs(graph: dict, name: str) -> list[Ref]:
    refs: list[Ref | None] = []
    for node_id, node in graph.items():
        kind = node.get("class_type")
        if kind not in SAMPLERS:
            continue
        guider = _source(graph, node_id, "guider") if kind == "SamplerCustomAdvanced" else None
        sigmas = _source(graph, node_id, "sigmas") if kind.startswith("SamplerCustom") else None
        if name in ("prompt", "negative"):
            role = "positive" if name == "prompt" else "negative"
            origin = _source(graph, guider, "conditioning" if role == "positive" else "negative") if guider else None
            if guider and origin is None:
                origin = _source(graph, guider, role)
            refs += _text_encoder(graph, origin or _source(graph, node_id, role), role)
        elif name == "seed":
            noise = _source(graph, node_id, "noise") if kind == "SamplerCustomAdvanced" else None
            target = noise or node_id
            refs += [(target, s) for s in SEED_INPUTS if s in (graph[target].get("inputs") or {})]
        elif name in ("steps", "denoise"):
            target = sigmas or node_id
            refs.append((target, name) if name in (graph[target].get("inputs") or {}) else None)
        elif name == "cfg":
            target = guider if guider and "cfg" in (graph[guider].get("inputs") or {}) else node_id
            refs.append((target, "cfg") if "cfg" in (graph[target].get("inputs") or {}) else None)
    return list(dict.fromkeys(held for ref in refs if ref is not None and (held := _held(graph, ref)) is not None))


def well_known(graph: dict, info: dict | None = None) -> dict[str, list[Ref]]:
    """Each well-known name this graph has, with the leaves it sets."""
    settable = leaves(graph, info)
    found: dict[str, list[Ref]] = {}
    for name in ("prompt", "negative", "seed", "steps", "cfg", "denoise"):
        found[name] = [ref for ref in _sampler_refs(graph, name) if ref in settable]
    # a negative that is the prompt's own encoder (Flux: ConditioningZeroOut of the positive) is no negative
    found["negative"] = [ref for ref in found["negative"] if ref not in found["prompt"]]
    found["size"] = [ref for node_id, node in graph.items() if str(node.get("class_type", "")).startswith("Empty")
                     and str(node.get("class_type", "")).endswith("LatentImage")
                     for ref in ((node_id, "width"), (node_id, "height")) if ref in settable]
    found["image"] = [(n, "image") for n, node in graph.items() if node.get("class_type") == "LoadImage"
                      and (n, "image") in settable]
    found["checkpoint"] = [(n, "ckpt_name") for n, node in graph.items()
                           if node.get("class_type") == "CheckpointLoaderSimple" and (n, "ckpt_name") in settable]
    return {name: refs for name, refs in found.items() if refs}


MANY_OK = {"prompt", "negative", "seed", "size"}  # names that set every place they resolve to


def resolve(key: str, graph: dict, info: dict | None = None) -> list[Ref]:
    """The leaves a KEY sets; invalid_argument listing the keys that exist when it names none."""
    settable = leaves(graph, info)
    if "." not in key:
        names = well_known(graph, info)
        if key in names:
            refs = names[key]
            if len(refs) > (2 if key == "size" else 1) and key not in MANY_OK:
                listed = ", ".join(f"{n}.{i}" for n, i in refs)
                raise ImagegenError("invalid_argument", f"--set {key}: the workflow has several ({listed})",
                                    hint="Name the one you mean by its node id, e.g. --set "
                                         f"{refs[0][0]}.{refs[0][1]}=VALUE.")
            return refs
        raise _unknown(key, settable, names)
    ref, name = key.rsplit(".", 1)
    if (ref, name) in settable:
        return [(ref, name)]
    titled = sorted({n for (n, i), leaf in settable.items() if i == name and leaf.title == ref}) or \
        sorted({n for (n, i), leaf in settable.items() if i == name and leaf.title.lower() == ref.lower()})
    if len(titled) > 1:
        raise ImagegenError("invalid_argument", f"--set {key}: {len(titled)} nodes are titled {ref!r} "
                            f"({', '.join(titled)})", hint=f"Name one by its id, e.g. --set {titled[0]}.{name}=VALUE.")
    if titled:
        return [(titled[0], name)]
    linked = _linked_input(key, graph, ref, name, settable)
    if linked is not None:
        raise linked
    if any((node.get("class_type"), name) in OWNED for n, node in graph.items()
           if ref in (n, (node.get("_meta") or {}).get("title"))):
        raise ImagegenError("invalid_argument", f"--set {key}: imagegen names the images it writes itself",
                            hint="Choose where they go with -o FILE.png or -o DIR/.")
    if ref in graph or any(leaf.title == ref for leaf in settable.values()):
        inputs = sorted(i for (n, i), leaf in settable.items() if ref in (n, leaf.title))
        raise ImagegenError("invalid_argument", f"--set {key}: node {ref!r} has no settable input {name!r} "
                            f"(it has: {', '.join(inputs) or 'none'})", hint=HINT)
    raise _unknown(key, settable, well_known(graph, info))


def _linked_input(key: str, graph: dict, ref: str, name: str, settable: dict) -> ImagegenError | None:
    """The refusal of --set on an input that another node feeds (a link is not a value), naming that node."""
    ids = [ref] if ref in graph else [n for n, node in graph.items() if (node.get("_meta") or {}).get("title") == ref]
    for node_id in ids:
        value = (graph[node_id].get("inputs") or {}).get(name)
        if isinstance(value, list) and _is_link(value):
            source = str(value[0])
            inputs = sorted(leaf.key for (n, _), leaf in settable.items() if n == source)
            example = f"e.g. --set {inputs[0]}=VALUE" if inputs else "in the editor"
            return ImagegenError("invalid_argument", f"--set {key}: that input is fed by node {source} "
                                 f"({(graph.get(source) or {}).get('class_type', '?')}), not a value",
                                 hint=f"Set that node's inputs instead, {example}; see --list-params.")
    return None


def _unknown(key: str, settable: dict, names: dict) -> ImagegenError:
    keys = list(names) + [leaf.key for leaf in settable.values()]
    return ImagegenError("invalid_argument", f"--set {key}: no such parameter in this workflow; it has: "
                         f"{', '.join(keys)}", hint=HINT, keys=keys)


# --- values -------------------------------------------------------------------------------------------------
def parse_value(leaf: Leaf, raw: Any, key: str) -> Any:
    """A value for a leaf, from a string (the command line) or a JSON value (a batch item), checked."""
    where = f"--set {key}"
    if leaf.kind in ("INT", "FLOAT"):
        value = _number(raw, leaf.kind == "INT", where)
        low, high = leaf.options.get("min"), leaf.options.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ImagegenError("invalid_argument", f"{where}: {value} is outside {low}..{high} ({leaf.class_type} "
                                f"{leaf.input})", hint=HINT)
        return value
    if leaf.kind == "BOOLEAN":
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return str(raw).lower() in ("true", "1", "yes", "on")
        raise ImagegenError("invalid_argument", f"{where}: {raw!r} is not true or false", hint=HINT)
    if not isinstance(raw, str):
        raise ImagegenError("invalid_argument", f"{where}: {raw!r} is not text", hint=HINT)
    if _refused_choice(leaf, raw):
        raise ImagegenError("invalid_argument", f"{where}: {raw!r} is not one of {leaf.class_type}'s {leaf.input} "
                            f"choices", hint="Choices: " + ", ".join(leaf.options["choices"][:60]))
    return raw


def _number(raw: Any, integer: bool, where: str):
    if isinstance(raw, bool):
        raise ImagegenError("invalid_argument", f"{where}: {raw!r} is not a number", hint=HINT)
    try:
        value = (int(raw) if not isinstance(raw, float) else raw) if integer else float(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or (integer and (not isinstance(value, int) or isinstance(raw, float))) or \
            (not integer and not math.isfinite(value)):
        raise ImagegenError("invalid_argument", f"{where}: {raw!r} is not {'a whole' if integer else 'a finite'} "
                            "number", hint=HINT)
    return value


def _refused_choice(leaf: Leaf, value: str) -> bool:
    """A value outside a list's choices. Sampler and scheduler names of a newer ComfyUI pass here when they look
    like one: the worker's own lists decide at submission (comfy/choices.py)."""
    if leaf.kind != "COMBO" or not leaf.options.get("choices") or value in leaf.options["choices"]:
        return False
    return not (leaf.input in ("sampler_name", "scheduler") and choices.looks_like_a_name(value))


SIZE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")


def apply(graph: dict, settings: dict[str, Any], info: dict | None = None, base: Path | None = None,
          anchored: bool = False) -> Applied:
    """The graph with every KEY=VALUE set (in order). Inputs that upload a file (LoadImage) take a local
    path, relative to `base` (the current folder when None; only absolute ones when `anchored`, for callers
    whose current folder is not the user's); the file is uploaded when the job runs."""
    result = Applied(copy.deepcopy(graph), settings=dict(settings))
    settable = leaves(graph, info)
    for key, raw in settings.items():
        refs = resolve(key, graph, info)
        if key == "size":
            match = SIZE.fullmatch(str(raw))
            if not match:
                raise ImagegenError("invalid_argument", f"--set size={raw}: not WIDTHxHEIGHT", hint="e.g. size=512x768")
            values = [match.group(1), match.group(2)] * (len(refs) // 2)
            pairs = list(zip(refs, values, strict=True))
        else:
            pairs = [(ref, raw) for ref in refs]
        for ref, value in pairs:
            leaf = settable[ref]
            if leaf.is_upload:
                path = upload_path(value, base, f"--set {key}", anchored)
                result.uploads[ref] = path
                value = path.name
            else:
                value = parse_value(leaf, value, key)
            result.graph[ref[0]]["inputs"][ref[1]] = value
            result.changes[ref] = value
    return result


def check_values(graph: dict, info: dict | None = None) -> list[str]:
    """The graph's own values that its node definitions refuse (a required input missing, a number that is
    none or out of range, a choice that is not one), as ComfyUI would refuse them at submission: one line
    per problem, naming the node."""
    info = info if info is not None else node_info.pinned()
    problems = []
    for node_id, node in graph.items():
        schema = info.get(node.get("class_type")) or {}
        missing = [name for name in (schema.get("input") or {}).get("required") or {}
                   if name not in (node.get("inputs") or {})]
        if missing:
            problems.append(f"node {node_id} ({node['class_type']}) has no {', '.join(missing)} (required)")
    for leaf in leaves(graph, info).values():
        where = f"node {leaf.node} ({leaf.class_type}) {leaf.input}"
        value = leaf.value
        if leaf.kind in ("INT", "FLOAT"):
            try:  # ComfyUI converts as int() and float() do: "5" is 5
                value = (int if leaf.kind == "INT" else float)(value)
            except (TypeError, ValueError, OverflowError):
                problems.append(f"{where} = {value!r} is not a number")
                continue
            low, high = leaf.options.get("min"), leaf.options.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                problems.append(f"{where} = {value} is outside {low}..{high}")
        elif isinstance(value, str) and _refused_choice(leaf, value):
            problems.append(f"{where} = {value!r} is not one of its choices")
    return problems


def upload_path(raw: Any, base: Path | None, where: str, anchored: bool = False) -> Path:
    """A local image file named by a value (a path, relative to `base`; absolute only, when `anchored`)."""
    path = Path(str(raw)).expanduser()
    if anchored and not path.is_absolute():
        raise ImagegenError("invalid_argument", f"{where}: {raw} must be an absolute path",
                            hint="Pass the image's absolute path (the server's working folder is not yours).")
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    if not path.is_file():
        raise ImagegenError("invalid_argument", f"{where}: {raw} is not a file here", hint="Give the path of a local "
                            "image (PNG, JPEG or WebP) to upload.")
    return path.absolute()


def describe(graph: dict, info: dict | None = None) -> list[dict]:
    """Every settable key: the well-known names first, then each leaf by id, with type, value, default, range."""
    settable = leaves(graph, info)
    records = []
    for name, refs in well_known(graph, info).items():
        first = settable[refs[0]]
        value: Any = first.value
        if name == "size":
            value = f"{settable[refs[0]].value}x{settable[refs[1]].value}"
        records.append({"key": name, "type": "SIZE" if name == "size" else _type(first), "value": value,
                        "sets": [f"{n}.{i}" for n, i in refs]})
    for leaf in settable.values():
        record = {"key": leaf.key, "type": _type(leaf), "value": leaf.value, "node": leaf.node,
                  "class_type": leaf.class_type, "title": leaf.title or None, "input": leaf.input}
        for option in ("default", "min", "max", "step"):
            if option in leaf.options:
                record[option] = leaf.options[option]
        if leaf.options.get("choices"):
            record["choices"] = leaf.options["choices"]
        records.append(record)
    return records


def _type(leaf: Leaf) -> str:
    return "IMAGE_FILE" if leaf.is_upload else leaf.kind
