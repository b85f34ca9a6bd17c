"""The user's own images (an img2img source, an inpainting mask): read, size-limited, decoded and normalized
here, before any worker starts, so a corrupt or huge file is an exit-2 error and never a worker crash.

Each input is decoded with Pillow, turned upright (EXIF orientation) and written once per process as a plain
PNG (RGB for an image, L for a mask) into a private temporary folder removed at exit: that PNG is what the
scheduler uploads. The provenance keeps the user's file: its absolute path, name and sha256 (of its bytes).
"""

from __future__ import annotations

import atexit
import hashlib
import io
import re
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from imagegen.comfy import workflows
from imagegen.util import files
from imagegen.util.env import env_int
from imagegen.util.errors import ImagegenError

DEFAULT_DENOISE = 0.6        # img2img: keeps the composition, redraws the detail
INPAINT_DENOISE = 1.0        # inpainting: the masked part is drawn anew
MAX_MASK_GROW = 256
MAX_BYTES_ENV, MAX_PIXELS_ENV = "IMAGEGEN_MAX_INPUT_BYTES", "IMAGEGEN_MAX_INPUT_PIXELS"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
FORMATS = {"PNG", "JPEG", "MPO", "WEBP"}  # MPO: the JPEG many cameras write
ROLES = {"image": "init_image", "mask": "mask"}  # provenance name -> Job.inputs key (workflows.INPUT_KEYS)


@dataclass(frozen=True)
class InputImage:
    """One checked input: the user's file and the normalized PNG the worker gets."""

    role: str                 # "image" or "mask"
    path: Path                # the user's file, absolute
    sha256: str               # of the user's file's bytes
    width: int                # upright (after EXIF orientation)
    height: int
    normalized: Path          # the PNG to upload

    def record(self) -> dict:
        return {"name": self.path.name, "path": str(self.path), "sha256": self.sha256}


@dataclass(frozen=True)
class Prepared:
    """What a request's inputs add to its jobs."""

    image: InputImage | None = None
    mask: InputImage | None = None
    denoise: float = 1.0
    mask_grow: int = 0
    extend: list[int] | None = None  # outpainting: left, top, right, bottom

    def size(self) -> tuple[int, int] | None:
        """The output size when --size is not given: the input's (with the --extend border), rounded down
        to a multiple of 8."""
        if self.image is None:
            return None
        left, top, right, bottom = self.extend or (0, 0, 0, 0)
        return output_size(self.image, left + right, top + bottom)

    def sources(self) -> dict:
        return {item.role: item.record() for item in (self.image, self.mask) if item is not None}


def prepare(image: Path | str | None, mask: Path | str | None = None, denoise: float | None = None,
            mask_grow: int | None = 0, extend=None, where: str = "") -> Prepared:
    """Check a request's --image/--mask/--denoise/--mask-grow/--extend and make its inputs ready to upload."""
    prefix = f"{where}: " if where else ""
    grow = mask_grow or 0
    border = parse_extend(extend, prefix)
    if image is None:
        for name, value in (("--mask", mask), ("--denoise", denoise), ("--mask-grow", grow or None),
                            ("--extend", border)):
            if value is not None:
                raise ImagegenError("invalid_argument", f"{prefix}{name} needs an input image (--image)",
                                    hint="Pass --image IN: img2img, or inpainting with --mask.")
        return Prepared()
    if denoise is not None and (not isinstance(denoise, (int, float)) or isinstance(denoise, bool)
                                or not 0.0 <= float(denoise) <= 1.0):
        raise ImagegenError("invalid_argument", f"{prefix}--denoise {denoise!r} is outside 0..1",
                            hint="0 keeps the image, 1 draws it anew; img2img is usually 0.3 to 0.7.")
    if not isinstance(grow, int) or isinstance(grow, bool) or not 0 <= grow <= MAX_MASK_GROW:
        raise ImagegenError("invalid_argument", f"{prefix}--mask-grow {grow!r} is outside 0..{MAX_MASK_GROW} pixels")
    if grow and mask is None and border is None:
        raise ImagegenError("invalid_argument", f"{prefix}--mask-grow needs a --mask (or --extend)",
                            hint="Pass --mask M (white repaints, black keeps).")
    if border is not None and mask is not None:
        raise ImagegenError("invalid_argument", f"{prefix}--extend and --mask cannot be combined",
                            hint="Outpaint first (--extend), then inpaint the result with --mask.")
    source = load(Path(image), "image")
    masked = load(Path(mask), "mask") if mask is not None else None
    if masked is not None and (masked.width, masked.height) != (source.width, source.height):
        raise ImagegenError(
            "invalid_mask",
            f"{prefix}the mask {masked.path.name} is {masked.width}x{masked.height} but the image "
            f"{source.path.name} is {source.width}x{source.height}",
            hint="Make the mask exactly the image's size (white repaints, black keeps); it is never resized.")
    if masked is not None and _all_black(masked.normalized):
        raise ImagegenError("invalid_mask", f"{prefix}the mask {masked.path.name} is all black: nothing would be "
                            "repainted", hint="Paint white where the image is to be redrawn (black keeps); an "
                                              "inverted mask needs inverting.")
    default = INPAINT_DENOISE if masked is not None or border is not None else DEFAULT_DENOISE
    if border is not None:
        width, height = source.width + border[0] + border[2], source.height + border[1] + border[3]
        _, max_pixels = _limits()
        if width * height > max_pixels or max(width, height) > workflows.MAX_RESOLUTION:
            raise ImagegenError("invalid_argument", f"{prefix}--extend makes the image {width}x{height}, more than "
                                f"{max_pixels} pixels or {workflows.MAX_RESOLUTION} a side",
                                hint="Extend by less, or outpaint in several steps.")
    return Prepared(source, masked, float(denoise) if denoise is not None else default, grow, border)


def _all_black(mask: Path) -> bool:
    from PIL import Image

    with Image.open(mask) as opened:
        return opened.getextrema()[1] == 0


def parse_extend(value, prefix: str = "") -> list[int] | None:
    """--extend: one number (every side) or LEFT,TOP,RIGHT,BOTTOM, in pixels, multiples of 8 (as
    ImagePadForOutpaint takes them); None or all zeros: no outpainting."""
    if value is None:
        return None
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        sides = [int(str(part).strip()) for part in parts]
    except ValueError:
        sides = []
    if len(sides) == 1:
        sides *= 4
    if len(sides) != 4 or isinstance(value, bool) or any(side < 0 or side % 8 for side in sides):
        raise ImagegenError("invalid_argument", f"{prefix}--extend {value!r} is not PIXELS or LEFT,TOP,RIGHT,BOTTOM "
                            "in multiples of 8", hint="e.g. --extend 64 (every side) or --extend 0,0,128,0.")
    return sides if any(sides) else None


def output_size(image: InputImage, extra_width: int = 0, extra_height: int = 0) -> tuple[int, int]:
    multiple = workflows.SIZE_MULTIPLE
    full_width, full_height = image.width + extra_width, image.height + extra_height
    width, height = full_width // multiple * multiple, full_height // multiple * multiple
    if min(width, height) < 16 or max(width, height) > workflows.MAX_RESOLUTION:
        raise ImagegenError(
            "invalid_size",
            f"{image.path.name} is {full_width}x{full_height} (with any --extend border); an output size must be "
            f"16..{workflows.MAX_RESOLUTION}",
            hint="Pass --size WIDTHxHEIGHT (multiples of 8): the image is scaled and center-cropped to it.")
    return width, height


def job_files(sources: dict) -> dict[str, Path]:
    """A job's inputs (Job.inputs) from its Params.sources: the normalized PNG of each input."""
    files = {}
    for role, record in sources.items():
        if role in ROLES:
            files[ROLES[role]] = normalized_for(role, record)
    return files


def normalized_for(role: str, record: dict) -> Path:
    """The normalized PNG of a recorded input, made again from its file when this process has none."""
    done = _NORMALIZED.get((role, record["sha256"]))
    if done is not None and done.is_file():
        return done
    loaded = load(Path(record["path"]), role)
    if loaded.sha256 != record["sha256"]:
        raise ImagegenError("input_missing", f"{loaded.path} changed since it was checked "
                            f"(sha256 {loaded.sha256[:12]}..., expected {record['sha256'][:12]}...)",
                            hint="Leave input images alone while imagegen runs, then rerun.")
    return loaded.normalized


def find_recorded(role: str, record: dict, made: Path) -> Path:
    """For `--from IMAGE`: the input an image was made from, where its provenance says it was or next to the
    image, and only when its sha256 still matches; else `input_missing`, naming the file and its hash."""
    made = Path(made).expanduser().absolute()
    candidates = [Path(record["path"])] if record.get("path") else []
    candidates.append(made.parent / Path(record["name"]).name)
    for candidate in candidates:
        try:
            if candidate.is_file() and hashlib.sha256(read_bytes(candidate, role)).hexdigest() == record["sha256"]:
                return candidate
        except (ImagegenError, OSError):
            continue
    where = " or ".join(str(c) for c in dict.fromkeys(candidates))
    what, option = ("control image", "--control MODEL:PATH") if role == "control" else (role, f"--{role} PATH")
    raise ImagegenError(
        "input_missing",
        f"{made.name} was made from the {what} {record['name']} (sha256 {record['sha256']}), which is not at {where}",
        hint=f"Pass that file with {option} (or another file to use instead), then rerun.",
        role=role, name=record["name"], sha256=record["sha256"])


def _limits() -> tuple[int, int]:
    return (env_int(MAX_BYTES_ENV, DEFAULT_MAX_BYTES, minimum=1),
            env_int(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS, minimum=1))


# How messages name each role's file: the option it came from ("upscale": `imagegen upscale IMAGE...`)
LABELS = {"image": "--image", "mask": "--mask", "control": "--control", "upscale": "the image",
          "workflow": "the workflow's input image"}


def _refuse(path: Path, role: str, why: str, hint: str | None = None) -> ImagegenError:
    label = LABELS.get(role, f"--{role}")
    return ImagegenError("invalid_source_image", f"{label} {path}: {why}",
                         hint=hint or f"Pass a PNG, JPEG or WebP file as {label}.")


def read_bytes(path: Path, role: str) -> bytes:
    """The bytes of a regular file within the size limit (never a device, a pipe or a folder)."""
    max_bytes, _ = _limits()
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise _refuse(path, role, "is a directory, not an image",
                          hint=f"Pass the images in it, e.g. {path}/*.png." if role == "upscale" else None)
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(path, role, "is not a regular file (a device or a pipe)")
        if info.st_size > max_bytes:
            raise _refuse(path, role, f"is {info.st_size} bytes, more than the limit of {max_bytes} "
                          f"({MAX_BYTES_ENV})", hint=f"Pass a smaller file, or raise {MAX_BYTES_ENV}.")
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise _refuse(path, role, "no such file", hint=f"Check the path given as {LABELS.get(role, role)}.") from None
    except OSError as exc:
        raise _refuse(path, role, f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise _refuse(path, role, f"grew past {max_bytes} bytes while being read")
    return data


def load(path: Path, role: str) -> InputImage:
    """Read, check and decode one input; write its normalized PNG (once per process and content)."""
    from PIL import Image, ImageOps

    path = path.expanduser().absolute()
    data = read_bytes(path, role)
    sha = hashlib.sha256(data).hexdigest()
    _, max_pixels = _limits()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                if opened.format not in FORMATS:
                    raise _refuse(path, role, f"is a {opened.format or 'an unknown'} image; PNG, JPEG and WebP are "
                                  "accepted", hint=f"Convert it to PNG first, then pass it as --{role}.")
                if opened.width * opened.height > max_pixels:
                    raise _refuse(path, role, f"is {opened.width}x{opened.height} pixels, more than the limit of "
                                  f"{max_pixels} ({MAX_PIXELS_ENV})",
                                  hint=f"Pass a smaller image, or raise {MAX_PIXELS_ENV}.")
                opened.load()
                upright = ImageOps.exif_transpose(opened)
                picture = _as_mask(upright) if role == "mask" else _as_rgb(upright)
    except ImagegenError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{declared.group(1)} pixels" if declared else "too many pixels"
        raise _refuse(path, role, f"declares {size}, more than the limit of {max_pixels} ({MAX_PIXELS_ENV}); "
                      "it may be a decompression bomb",
                      hint=f"Pass a smaller image, or raise {MAX_PIXELS_ENV}.") from None
    except Image.UnidentifiedImageError:
        raise _refuse(path, role, "is not an image (its bytes are no PNG, JPEG or WebP)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds on a corrupt file
        raise _refuse(path, role, f"cannot be decoded as an image ({exc.__class__.__name__}: {exc})") from None
    normalized = _normalized_path(role, sha, path)
    if not normalized.is_file():
        buffer = io.BytesIO()
        picture.save(buffer, "PNG", compress_level=1)
        files.write_atomic(normalized, buffer.getvalue())
    _NORMALIZED[(role, sha)] = normalized
    return InputImage(role, path, sha, picture.width, picture.height, normalized)


def _eight_bit(image):
    """A 16- or 32-bit greyscale image (mode I;16, I) as L: 0..65535 onto 0..255. Pillow's own convert
    clips instead, so a 16-bit PNG would come out nearly white."""
    if image.mode.startswith("I"):
        return image.convert("I").point(lambda value: value * (1 / 257)).convert("L")
    return image


def _as_rgb(image):
    """Transparency is flattened onto white (ComfyUI's LoadImage would drop it, keeping whatever colour
    the transparent pixels happen to hold)."""
    return _flattened(image, (255, 255, 255, 255), "RGB")


def _as_mask(image):
    """The mask's luminance: white repaints, black keeps. Transparent pixels count as black (kept)."""
    return _flattened(image, (0, 0, 0, 255), "L")


def _flattened(image, background: tuple[int, int, int, int], mode: str):
    """The image in 8-bit `mode`, any transparency composited onto `background`."""
    from PIL import Image

    image = _eight_bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba).convert(mode)
    return image.convert(mode)


_NORMALIZED: dict[tuple[str, str], Path] = {}
_FOLDER: list[Path] = []


def _normalized_path(role: str, sha: str, source: Path) -> Path:
    if not _FOLDER:
        folder = Path(tempfile.mkdtemp(prefix="imagegen-inputs-"))  # 0700: only this user reads the inputs
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _FOLDER.append(folder)
    place = _FOLDER[0] / f"{sha[:16]}-{role}"
    place.mkdir(exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", source.stem)[:64].lstrip(".") or role
    return place / f"{stem}.png"
