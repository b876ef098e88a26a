import numpy as np
import pytest
from PIL import Image

from trainer.pictures.grid import PAD, labelled_grid, save_png, wrap_label


def _solid(color, size=32):
    return Image.new("RGB", (size, size), color)


def test_grid_places_each_tile_with_its_caption_and_fills_the_last_row():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    grid = labelled_grid([_solid(c) for c in colors], ["a", "b", "c", "d", "e"], cols=3, tile=40, title="t")
    label_h = 14 + 6
    cell_w, cell_h = 40 + PAD, 40 + label_h + PAD
    assert grid.size == (3 * cell_w + PAD, 22 + 2 * cell_h + PAD)
    arr = np.asarray(grid)
    for i, color in enumerate(colors):
        row, col = divmod(i, 3)
        x, y = col * cell_w + PAD + 20, 22 + row * cell_h + PAD + 20  # the middle of tile i
        assert tuple(arr[y, x]) == color
    x, y = 2 * cell_w + PAD + 20, 22 + cell_h + PAD + 20  # the empty sixth cell is white
    assert tuple(arr[y, x]) == (255, 255, 255)
    assert (arr[22 + 40 + PAD : 22 + cell_h, PAD : PAD + 40] < 128).any()  # caption text under the first tile


def test_grid_without_labels_or_images():
    grid = labelled_grid([_solid((9, 9, 9))], cols=1, tile=16)
    assert grid.size == (16 + 2 * PAD, 16 + 2 * PAD)
    with pytest.raises(ValueError):
        labelled_grid([])


def test_wrap_label_keeps_words_and_at_most_four_lines():
    lines = wrap_label("a sks african fabric pattern on a dress " * 5, 70)
    assert len(lines) == 4 and all(len(line) <= 10 or " " not in line for line in lines)
    assert wrap_label("", 100) == [""]


def test_save_png_is_atomic_and_readable(tmp_path):
    path = save_png(_solid((1, 2, 3)), tmp_path / "sub" / "g.png")
    assert Image.open(path).getpixel((0, 0)) == (1, 2, 3)
    assert [p.name for p in path.parent.iterdir()] == ["g.png"]


def test_a_long_title_wraps_on_small_tiles_instead_of_being_cut_off():
    title = "sks african fabric pattern in nine contexts (LoRA)"
    grid = labelled_grid([_solid((200, 0, 0), 16)] * 2, cols=2, tile=48, title=title)
    arr = np.asarray(grid)
    title_h = grid.height - (48 + 2 * PAD)
    assert title_h > 22  # more than one line
    band = arr[:title_h]
    assert (band < 128).any()  # the title is drawn
    assert (band[:, -3:] == 255).all()  # and nothing of it runs into the right edge
