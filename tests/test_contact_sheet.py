"""Contact sheets: grid size for N images, and a label with index and seed under every thumbnail."""

from pathlib import Path

import pytest
from PIL import Image, ImageChops

from imagegen.funnel import contact_sheet
from imagegen.funnel.contact_sheet import LABEL, PAD, THUMB, TITLE, Tile


def _image(path: Path, color, size=(64, 64)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


@pytest.mark.parametrize("count, columns, rows", [(1, 1, 1), (3, 3, 1), (5, 5, 1), (6, 3, 2), (8, 3, 3), (9, 3, 3),
                                                  (10, 4, 3), (20, 5, 4), (100, 10, 10)])
def test_grid_dimensions_for_n_images(tmp_path, count, columns, rows):
    assert contact_sheet.columns_for(count) == columns
    expected = (PAD + columns * (THUMB + PAD), TITLE + PAD + rows * (THUMB + LABEL + PAD))
    assert contact_sheet.sheet_size(count) == expected
    tiles = [Tile(i, 1000 + i, None) for i in range(1, count + 1)]
    target = contact_sheet.write(tiles, tmp_path / "sheet.png", title="stage 1 drafts")
    with Image.open(target) as sheet:
        assert sheet.size == expected and sheet.format == "PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def _cell(index: int, count: int, title: bool = True) -> tuple[int, int]:
    columns = contact_sheet.columns_for(count)
    x = PAD + ((index - 1) % columns) * (THUMB + PAD)
    y = (TITLE if title else 0) + PAD + ((index - 1) // columns) * (THUMB + LABEL + PAD)
    return x, y


def test_each_thumbnail_sits_in_its_cell_with_its_aspect_ratio(tmp_path):
    red = _image(tmp_path / "red.png", (255, 0, 0))
    wide = _image(tmp_path / "wide.png", (0, 0, 255), size=(128, 64))
    sheet = contact_sheet.render([Tile(1, 1, red), Tile(2, 2, wide)], title="t")
    x, y = _cell(1, 2)
    assert sheet.getpixel((x + THUMB // 2, y + THUMB // 2)) == (255, 0, 0)
    x, y = _cell(2, 2)
    assert sheet.getpixel((x + THUMB // 2, y + THUMB // 2)) == (0, 0, 255)
    assert sheet.getpixel((x + THUMB // 2, y + 10)) == contact_sheet.BACKGROUND, \
        "a 2:1 image fills half the cell's height"


def _label_band(sheet, index, count):
    x, y = _cell(index, count)
    return sheet.crop((x, y + THUMB, x + THUMB, y + THUMB + LABEL))


def test_labels_carry_index_and_seed(tmp_path):
    images = [_image(tmp_path / f"{i}.png", (0, 128, 0)) for i in range(3)]
    tiles = [Tile(i + 1, seed, path) for i, (seed, path) in enumerate(zip((11, 22, 33), images, strict=True))]
    sheet = contact_sheet.render(tiles, title="stage")
    blank = Image.new("RGB", (THUMB, LABEL), contact_sheet.LABEL_BACKGROUND)
    bands = [_label_band(sheet, i, 3) for i in (1, 2, 3)]
    for band in bands:
        assert ImageChops.difference(band, blank).getbbox() is not None, "each label band has text on it"
        assert (255, 255, 255) in {color for _, color in band.getcolors(THUMB * LABEL)}
    # the text is the index and seed, as the default font draws it
    from PIL import ImageDraw

    expected = blank.copy()
    ImageDraw.Draw(expected).text((6, 4), "#2  seed 22", fill=contact_sheet.TEXT, font=contact_sheet._font(16))
    assert ImageChops.difference(bands[1], expected).getbbox() is None
    assert ImageChops.difference(bands[0], bands[1]).getbbox() is not None, "different labels draw differently"
    assert contact_sheet.label_text(Tile(7, 123, None, "failed")) == "#7  seed 123  failed"


def test_missing_or_failed_images_keep_their_place(tmp_path):
    good = _image(tmp_path / "good.png", (0, 0, 255))
    tiles = [Tile(1, 1, tmp_path / "gone.png", "failed"), Tile(2, 2, good)]
    sheet = contact_sheet.render(tiles, title=None)
    x, y = _cell(1, 2, title=False)
    assert sheet.getpixel((x + 2, y + 2)) == contact_sheet.MISSING
    x, y = _cell(2, 2, title=False)
    assert sheet.getpixel((x + THUMB // 2, y + THUMB // 2)) == (0, 0, 255)
    assert sheet.size == contact_sheet.sheet_size(2, title=False)
