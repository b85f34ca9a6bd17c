"""FUNNEL_DIR/funnel.json: a funnel's stages, images and picks, checked on every load so that a file
edited by hand (or crafted) can never make imagegen read, upload or overwrite a file outside FUNNEL_DIR."""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from imagegen.engine import batch
from imagegen.engine.manifest import write_error
from imagegen.funnel import loras as lora_plan
from imagegen.funnel.stages import NAME_RE, STAGE_TYPES, Stage, check_stage, is_upscaler
from imagegen.models.registry import Registry
from imagegen.util import files
from imagegen.util.errors import ImagegenError

SCHEMA = "imagegen.funnel/1"                 # funnel.json, and `funnel show --json`
STATE_FILE = "funnel.json"
LOCK = ".funnel.lock"                        # held by the command working on the funnel
SEED_STRIDE = 1000                           # stage N's seeds start at seed + (N-1) * 1000
BUSY_HINT = ("Another imagegen command is working on this funnel: wait for it to finish, "
             "then `imagegen funnel show {dir}`.")


def lock(root: Path):
    """The funnel folder's lock (output_busy when another command holds it); release() it when done."""
    return batch.lock_folder(root, LOCK, BUSY_HINT.format(dir=shlex.quote(str(root))))


class Funnel:
    """FUNNEL_DIR/funnel.json in memory; paths inside it are relative to FUNNEL_DIR."""

    def __init__(self, root: Path, data: dict):
        self.root, self.data = root, data

    @classmethod
    def create(cls, root: Path, prompt: str, negative: str | None, seed: int, stages: list[Stage],
               loras: list[dict] | None = None) -> Funnel:
        """A new funnel folder; `loras` is funnel/loras.py's per-stage plan (one entry a stage)."""
        root = root.absolute()
        batch.check_out_dir(root)
        held = lock(root)  # two `funnel run -o DIR` at once: one creates it, the other finds it there
        try:
            if (root / STATE_FILE).exists():
                raise ImagegenError("output_exists", f"{root} holds a funnel already",
                                    hint=f"Continue it with `imagegen funnel resume {shlex.quote(str(root))}`, "
                                         "or choose another -o directory.")
            data = {"schema": SCHEMA, "prompt": prompt, "negative": negative, "seed": seed,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "stages": [{**asdict(s), "dir": f"stage-{i}-{s.name}", "sheet": None, "images": [], "picks": None,
                                "picked_by": None, **(loras[i - 1] if loras else {})}
                               for i, s in enumerate(stages, start=1)]}
            funnel = cls(root, data)
            funnel.save()
        finally:
            held.release()
        return funnel

    @classmethod
    def load(cls, root: Path) -> Funnel:
        root = root.absolute()
        try:
            data = json.loads((root / STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ImagegenError("invalid_argument", f"{root} is not a funnel directory (no {STATE_FILE})",
                                hint='Start one with `imagegen funnel "PROMPT" -o DIR`.') from None
        except (OSError, ValueError) as exc:
            raise ImagegenError("invalid_argument", f"{root / STATE_FILE} cannot be read: {exc}") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ImagegenError("invalid_argument", f"{root / STATE_FILE} is not a {SCHEMA} state file")
        funnel = cls(root, data)
        funnel.check()
        return funnel

    # --- what a state file may hold ------------------------------------------------------
    def _bad(self, where: str, why: str) -> ImagegenError:
        return ImagegenError("invalid_funnel_state", f"{self.root / STATE_FILE}: {where}: {why}", field=where)

    def inside(self, relative, where: str) -> Path:
        """FUNNEL_DIR/relative, refused unless it names a path inside FUNNEL_DIR once links are resolved."""
        if not isinstance(relative, str) or not relative or "\0" in relative or Path(relative).is_absolute():
            raise self._bad(where, f"{relative!r} must be a path relative to the funnel folder")
        root = self.root.resolve()
        resolved = (self.root / relative).resolve()
        if resolved == root or not resolved.is_relative_to(root):
            raise self._bad(where, f"{relative!r} leads outside the funnel folder {self.root}")
        return self.root / relative

    def check(self) -> None:
        """Every field the commands use, with its type; every path inside FUNNEL_DIR; picks and sources
        that name images of the stage before. invalid_funnel_state (exit 2) names the field."""
        data = self.data
        for key, kinds in (("prompt", str), ("negative", (str, type(None))), ("seed", int)):
            if not isinstance(data.get(key), kinds) or isinstance(data.get(key), bool):
                raise self._bad(key, f"{data.get(key)!r} has the wrong type")
        if not isinstance(data.get("stages"), list) or not data["stages"]:
            raise self._bad("stages", "must be a non-empty list")
        picked: set | None = None
        for number, record in enumerate(data["stages"], start=1):
            where = f"stages[{number - 1}]"
            if not isinstance(record, dict):
                raise self._bad(where, "must be an object")
            self._check_stage(record, where)
            for position, image in enumerate(record["images"]):
                self._check_image(image, f"{where}.images[{position}]", picked)
            indices = [image["index"] for image in record["images"]]
            if indices != list(range(1, len(indices) + 1)):
                raise self._bad(f"{where}.images", "indices must be 1, 2, ... in order")
            picks = record.get("picks")
            if picks is not None and (not isinstance(picks, list)
                                      or not all(p in indices and type(p) is int for p in picks)):
                raise self._bad(f"{where}.picks", f"{picks!r} must be a list of this stage's image indices")
            if not isinstance(record.get("picked_by"), (str, type(None))):
                raise self._bad(f"{where}.picked_by", f"{record['picked_by']!r} is not a string")
            picked = set(picks or ())

    def _check_stage(self, record: dict, where: str) -> None:
        for key, kind in STAGE_TYPES.items():
            value = record.get(key)
            if key in ("name", "model") and value is None:
                raise self._bad(f"{where}.{key}", "is missing")
            types = (int, float) if kind is float else kind
            if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
                raise self._bad(f"{where}.{key}", f"{value!r} is not a {kind.__name__}")
        if not NAME_RE.match(record["name"]):
            raise self._bad(f"{where}.name", f"{record['name']!r} is not a stage name")
        if type(record.get("count")) is not int:
            raise self._bad(f"{where}.count", f"{record.get('count')!r} is not a whole number")
        try:
            values: dict[str, Any] = {key: record.get(key) for key in STAGE_TYPES}
            check_stage(Stage(**values))  # counts and ranges, as a stage file
        except ImagegenError as error:
            raise self._bad(where, error.message) from None
        self.inside(record.get("dir"), f"{where}.dir")
        if record.get("sheet") is not None:
            self.inside(record["sheet"], f"{where}.sheet")
        if not isinstance(record.get("images"), list):
            raise self._bad(f"{where}.images", "must be a list")
        if record.get("vary") not in (None, True, False):  # a variations stage (funnel/vary.py)
            raise self._bad(f"{where}.vary", f"{record['vary']!r} is not true or false")
        why = lora_plan.check_record(record)
        if why:
            raise self._bad(where, why)

    def _check_image(self, image, where: str, picked: set | None) -> None:
        if not isinstance(image, dict):
            raise self._bad(where, "must be an object")
        for key in ("index", "seed") + (("width", "height") if image.get("status") == "done" else ()):
            if not isinstance(image.get(key), int) or isinstance(image.get(key), bool):
                raise self._bad(f"{where}.{key}", f"{image.get(key)!r} is not a whole number")
        if not isinstance(image.get("status"), str):
            raise self._bad(f"{where}.status", "is missing")
        if image.get("copy") not in (None, True, False):
            raise self._bad(f"{where}.copy", f"{image['copy']!r} is not true or false")
        if (picked is None) != (image.get("source") is None) or (picked is not None and image["source"] not in picked):
            raise self._bad(f"{where}.source", f"{image.get('source')!r} is not a picked image of the stage before")
        self.inside(image.get("path"), f"{where}.path")

    # --- reading and writing -----------------------------------------------------------------
    def save(self) -> None:
        self.data["next"] = self.next_step()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            files.write_atomic(self.root / STATE_FILE, json.dumps(self.data, indent=1))
        except OSError as exc:  # a full disk is disk_full, not internal_error; the old state file stays whole
            raise write_error(self.root / STATE_FILE, exc) from None

    def stage(self, number: int) -> Stage:
        return Stage(**{f.name: self.data["stages"][number - 1].get(f.name) for f in fields(Stage)})

    def record(self, number: int) -> dict:
        return self.data["stages"][number - 1]

    def path(self, image: dict) -> Path:
        return self.inside(image["path"], "path")

    def done(self, image: dict) -> bool:
        return image["status"] == "done" and self.path(image).is_file()

    def next_step(self) -> dict:
        """What comes next: render a stage, pick from a stage, or nothing (done)."""
        stages = self.data["stages"]
        for number, record in enumerate(stages, start=1):
            if not record["images"] or not all(self.done(image) for image in record["images"]):
                return {"action": "render", "stage": number, "name": record["name"]}
            if number < len(stages) and record["picks"] is None:
                return {"action": "pick", "stage": number, "name": record["name"], "keep": record["keep"] or 1}
        return {"action": "done"}

    def plan_images(self, number: int) -> None:
        """Decide a stage's images (index, seed, source, file) once; a resumed stage keeps them."""
        record = self.record(number)
        if record["images"]:
            return
        stage, base = self.stage(number), self.data["seed"] + (number - 1) * SEED_STRIDE
        sources = [None] if number == 1 else self.record(number - 1)["picks"]
        previous = {image["index"]: image for image in self.record(number - 1)["images"]} if number > 1 else {}
        upscaling = is_upscaler(stage.model, Registry.load())
        if upscaling and number == 1:  # only a hand-edited funnel.json has an upscaler first
            raise self._bad("stages[0].model",
                            "the first stage upscales, but there is no stage before it to take images from")
        images: list[dict] = []
        for source in sources:
            for _ in range(1 if upscaling else stage.count):
                index = len(images) + 1
                seed = previous[source]["seed"] if upscaling else base + index - 1
                images.append({"index": index, "seed": seed, "source": source, "status": "pending",
                               "path": f"{record['dir']}/{index:02d}-{seed}.png"})
        record["images"] = images
