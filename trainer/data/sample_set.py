"""The fabric sample set: 10 images of one woven-strip style, drawn deterministically by our own code.

Kente-like: vertical woven strips of a fixed palette, each strip a column of blocks that carry
geometric motifs (bars, diamonds, zigzags, checks), on a fine weave texture. Each image varies the
strip width, block order and motif mix, so the set is one coherent style, like the tutorial's.
"""

from __future__ import annotations

from pathlib import Path

PALETTE = {
    "gold": (232, 176, 24),
    "green": (18, 112, 66),
    "red": (184, 28, 36),
    "black": (24, 20, 18),
    "blue": (28, 62, 140),
    "orange": (226, 110, 30),
}
SIZE = 512
COUNT = 10


def _motif(kind: str, h: int, w: int, fg, bg, rng):
    import numpy as np

    y, x = np.mgrid[0:h, 0:w]
    if kind == "bars":
        period = rng.integers(6, 14)
        mask = (y // (period // 2)) % 2 == 0
    elif kind == "diamond":
        cy, cx = h / 2, w / 2
        mask = (np.abs(y - cy) / (h / 2) + np.abs(x - cx) / (w / 2)) < 0.75
        inner = (np.abs(y - cy) / (h / 2) + np.abs(x - cx) / (w / 2)) < 0.35
        mask = mask & ~inner
    elif kind == "zigzag":
        period = max(8, w // 2)
        tri = np.abs((x % period) - period / 2)
        mask = ((y + tri) // 6) % 2 == 0
    elif kind == "checks":
        cell = rng.integers(5, 10)
        mask = ((y // cell) + (x // cell)) % 2 == 0
    else:  # "cross"
        mask = (np.abs(y - h / 2) < h / 8) | (np.abs(x - w / 2) < w / 8)
    out = np.empty((h, w, 3), np.float32)
    out[:] = bg
    out[mask] = fg
    return out


def fabric_image(index: int, size: int = SIZE):
    """One sample image (PIL RGB), a pure function of `index` and `size`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1000 + index)
    names = list(PALETTE)
    canvas = np.zeros((size, size, 3), np.float32)
    strip_w = int(rng.integers(size // 8, size // 4))
    x = 0
    while x < size:
        w = min(strip_w, size - x)
        y = 0
        base = PALETTE[names[int(rng.integers(0, 3))]]  # gold, green or red ground
        while y < size:
            h = int(rng.integers(size // 10, size // 4))
            h = min(h, size - y)
            fg = PALETTE[names[int(rng.integers(0, len(names)))]]
            bg = base if rng.random() < 0.6 else PALETTE["black"]
            if fg == bg:
                fg = PALETTE["gold"] if bg != PALETTE["gold"] else PALETTE["black"]
            kind = ["bars", "diamond", "zigzag", "checks", "cross"][int(rng.integers(0, 5))]
            canvas[y : y + h, x : x + w] = _motif(kind, h, w, fg, bg, rng)
            # A thin black weft line between blocks.
            canvas[y : y + 2, x : x + w] = PALETTE["black"]
            y += h
        canvas[:, x : x + 2] = PALETTE["black"]
        x += w
    # Weave texture: alternating warp/weft shading.
    yy, xx = np.mgrid[0:size, 0:size]
    weave = np.where(((yy // 3) + (xx // 3)) % 2 == 0, 1.0, 0.86)
    canvas *= weave[..., None]
    canvas += rng.normal(0, 4, canvas.shape)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


def write_fabric_samples(folder: str | Path, size: int = SIZE, count: int = COUNT) -> list[Path]:
    """Write the sample set as fabric_01.png ... (skipping files already present)."""
    from ..files.atomic import atomic_save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"fabric_{i + 1:02d}.png"
        if not path.exists():
            img = fabric_image(i, size)
            atomic_save(path, lambda tmp, img=img: img.save(tmp, format="PNG"))
        paths.append(path)
    return paths
