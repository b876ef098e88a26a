"""Labelled picture grids: sample grids, comparison grids, the Image Grid node."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..files.atomic import atomic_save

PAD = 4  # white border around each tile, in pixels
LINE_HEIGHT = 14


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def wrap_label(text: str, width_px: int) -> list[str]:
    """Words wrapped to lines that fit `width_px` (about 7 px a character), at most four lines."""
    per_line = max(8, width_px // 7)
    lines, current = [], ""
    for word in text.split():
        if len(current) + len(word) + 1 > per_line and current:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    if current:
        lines.append(current)
    return lines[:4] or [""]


def labelled_grid(
    images, labels: Sequence[str] | None = None, cols: int = 3, tile: int | None = None, title: str | None = None
):
    """A grid of images with a caption under each tile (and an optional title line).

    Tiles are arranged by diffusers' make_image_grid; what it lacks (padding, caption strips, a title, a last
    row that is not full) is added here: each cell is a tile with its caption, blank cells fill the last row.
    """
    from diffusers.utils import make_image_grid

    if not images:
        raise ValueError("no images for the grid")
    tile = tile or max(images[0].size[0], 128)
    font = _font()
    wrapped = [wrap_label(label, tile) for label in labels] if labels else []
    label_h = LINE_HEIGHT * max(len(lines) for lines in wrapped) + 6 if wrapped else 0
    cells = []
    for i, im in enumerate(images):
        cell = Image.new("RGB", (tile + PAD, tile + label_h + PAD), "white")
        cell.paste(im.convert("RGB").resize((tile, tile)), (PAD, PAD))
        draw = ImageDraw.Draw(cell)
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((PAD + 2, PAD + tile + 3 + LINE_HEIGHT * j), line, fill="black", font=font)
        cells.append(cell)
    rows = (len(cells) + cols - 1) // cols
    cells += [Image.new("RGB", cells[0].size, "white")] * (rows * cols - len(cells))
    tiles = make_image_grid(cells, rows=rows, cols=cols)
    # the title wraps to the grid's width: on small tiles one line would be cut off at the right edge
    title_lines = wrap_label(title, tiles.width - PAD) if title else []
    title_h = LINE_HEIGHT * len(title_lines) + 8 if title else 0
    grid = Image.new("RGB", (tiles.width + PAD, title_h + tiles.height + PAD), "white")
    grid.paste(tiles, (0, title_h))
    draw = ImageDraw.Draw(grid)
    for j, line in enumerate(title_lines):
        draw.text((PAD, 4 + LINE_HEIGHT * j), line, fill="black", font=font)
    return grid


def save_png(picture, path) -> Path:
    """Write a PIL picture as PNG, atomically."""
    return atomic_save(path, lambda tmp: picture.save(tmp, format="PNG"))
