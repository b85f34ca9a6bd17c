"""`funnel resume DIR --vary N`: "more like this". After a stage's picks, a stage of variations goes in
before the next one: each picked image itself, then N img2img redraws of it at a low denoise with
seeds that follow the pick's own (seed+1, seed+2, ...). The next stage takes its images from what is
picked there. docs/controls.md describes it.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict

from imagegen.engine.manifest import write_error
from imagegen.funnel.stages import Stage, is_upscaler
from imagegen.funnel.state import Funnel
from imagegen.models.registry import Registry
from imagegen.util import files
from imagegen.util.errors import ImagegenError

DEFAULT_DENOISE = 0.35
MAX_VARIATIONS = 16


def check(count: int | None, denoise: float | None) -> None:
    if count is not None and not 1 <= count <= MAX_VARIATIONS:
        raise ImagegenError("invalid_argument", f"--vary {count} is outside 1..{MAX_VARIATIONS}",
                            hint="Pass --vary 4 for four variations of each pick.")
    if denoise is not None and not 0.0 < denoise <= 1.0:
        raise ImagegenError("invalid_argument", f"--vary-denoise {denoise} is outside 0..1",
                            hint="Variations are usually 0.25..0.5: low keeps the picture, high changes more.")


def insert(funnel: Funnel, number: int, count: int, denoise: float | None = None) -> int:
    """Put a variations stage after stage `number` (whose picks are made); returns its number."""
    record, stage = funnel.record(number), funnel.stage(number)
    if record["picks"] is None:
        raise ImagegenError("invalid_argument", f"--vary: stage {number} ({stage.name}) has no picks yet",
                            hint=f"Pick first: imagegen funnel resume {shlex.quote(str(funnel.root))} --pick 1 "
                                 f"--vary {count}")
    if is_upscaler(stage.model, Registry.load()):
        raise ImagegenError("invalid_argument", f"--vary: stage {number} ({stage.name}) upscales; variations are "
                                                "redrawn by a drawing stage",
                            hint="Use --vary after picking from a drafts, refine or polish stage.")
    names = {r["name"] for r in funnel.data["stages"]}
    dirs = {r["dir"] for r in funnel.data["stages"]}
    base = f"{stage.name[:24]}-vary"
    name = next(candidate for candidate in [base] + [f"{base}{i}" for i in range(2, 100)]
                if candidate not in names and f"stage-{number + 1}-{candidate}" not in dirs)
    variations = Stage(name, stage.model, count=count, keep=len(record["picks"]), size=stage.size, steps=stage.steps,
                       cfg=stage.cfg, denoise=denoise or DEFAULT_DENOISE, sampler=stage.sampler,
                       scheduler=stage.scheduler)
    funnel.data["stages"].insert(number, {**asdict(variations), "dir": f"stage-{number + 1}-{name}", "sheet": None,
                                          "images": [], "picks": None, "picked_by": None, "vary": True,
                                          **{key: record[key] for key in ("loras", "without_loras") if key in record}})
    funnel.save()
    return number + 1


def plan(funnel: Funnel, number: int) -> list[dict]:
    """A variations stage's images: for each pick of the stage before, the pick itself (copied), then
    `count` redraws seeded pick seed+1, +2, ..."""
    record, stage = funnel.record(number), funnel.stage(number)
    previous = {image["index"]: image for image in funnel.record(number - 1)["images"]}
    images: list[dict] = []
    for source in funnel.record(number - 1)["picks"]:
        for offset in range(stage.count + 1):
            index, seed = len(images) + 1, previous[source]["seed"] + offset
            image = {"index": index, "seed": seed, "source": source, "status": "pending",
                     "path": f"{record['dir']}/{index:02d}-{seed}.png"}
            if offset == 0:
                image["copy"] = True
            images.append(image)
    return images


def copy_pick(funnel: Funnel, image: dict, source: dict) -> None:
    """The pick itself, as the first image of its group (its PNG and metadata as they are)."""
    target = funnel.path(image)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(target, funnel.path(source).read_bytes())
    except OSError as exc:  # a full disk is disk_full, as for any image
        raise write_error(target, exc) from None
    image.update(status="done", width=source["width"], height=source["height"], worker=None, error=None)
