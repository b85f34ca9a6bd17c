"""Contact sheets: one PNG grid of thumbnails, each labelled with its 1-based index and seed.

A person, a script or a vision agent looks at one image and answers with indices (`--pick 3,7`).
Thumbnails keep their aspect ratio inside a square cell; a missing or failed image gets a grey
cell saying so, so the numbering never shifts. Text uses Pillow's default font (no font files).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

from imagegen.util.files import write_atomic

THUMB = 256          # a cell's image box, in pixels
PAD = 8              # space around cells
LABEL = 24           # the label band under each thumbnail
TITLE = 28           # the title band at the top (when there is a title)
BACKGROUND = (24, 24, 24)
LABEL_BACKGROUND = (0, 0, 0)
TEXT = (255, 255, 255)
MISSING = (70, 70, 70)


@dataclass
class Tile:
    index: int               # 1-based, what --pick takes
    seed: int | None
    path: Path | None        # None, or a file that is not there: a grey "missing" cell
    note: str = ""           # e.g. "failed"


def columns_for(count: int) -> int:
    """Up to 5 in one row; more make a near-square grid (8 -> 3x3, 20 -> 5x4)."""
    return max(1, count if count <= 5 else math.ceil(math.sqrt(count)))


def sheet_size(count: int, thumb: int = THUMB, title: bool = True) -> tuple[int, int]:
    columns = columns_for(count)
    rows = max(1, math.ceil(count / columns))
    width = PAD + columns * (thumb + PAD)
    height = (TITLE if title else 0) + PAD + rows * (thumb + LABEL + PAD)
    return width, height


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: the bundled scalable default font
    except TypeError:
        return ImageFont.load_default()


def label_text(tile: Tile) -> str:
    text = f"#{tile.index}"
    if tile.seed is not None:
        text += f"  seed {tile.seed}"
    return text + (f"  {tile.note}" if tile.note else "")


def render(tiles: list[Tile], title: str | None = None, thumb: int = THUMB):
    """The sheet as a Pillow image."""
    from PIL import Image, ImageDraw

    width, height = sheet_size(len(tiles), thumb, title is not None)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(16)
    top = PAD
    if title is not None:
        draw.text((PAD, 6), title, fill=TEXT, font=font)
        top += TITLE
    columns = columns_for(len(tiles))
    for position, tile in enumerate(tiles):
        x = PAD + (position % columns) * (thumb + PAD)
        y = top + (position // columns) * (thumb + LABEL + PAD)
        image = None
        if tile.path is not None and Path(tile.path).is_file():
            try:
                with Image.open(tile.path) as opened:
                    image = opened.convert("RGB")
            except OSError:
                image = None
        if image is None:
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=MISSING)
            draw.text((x + 8, y + thumb // 2 - 8), tile.note or "missing", fill=TEXT, font=font)
        else:
            scale = thumb / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST)
            sheet.paste(image, (x + (thumb - size[0]) // 2, y + (thumb - size[1]) // 2))
        draw.rectangle((x, y + thumb, x + thumb - 1, y + thumb + LABEL - 1), fill=LABEL_BACKGROUND)
        draw.text((x + 6, y + thumb + 4), label_text(tile), fill=TEXT, font=font)
    return sheet


def write(tiles: list[Tile], target: Path, title: str | None = None, thumb: int = THUMB) -> Path:
    """Render and write the sheet atomically (a temp name, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    render(tiles, title, thumb).save(buffer, format="PNG")
    write_atomic(target, buffer.getvalue())
    return target
