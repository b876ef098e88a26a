"""A procedural corpus of captioned fabric patterns, for pretraining the tiny base model (issue 9).

Every image is a pure function of (family, index, size). Families: stripes, checks, polka dots, zigzags,
mudcloth-like symbols, simple florals, and kente-like woven strips. Kente is held out of the pretraining
corpus: it is the "subject" style that personalisation has to learn (fabric.py draws its instance images).
"""

from __future__ import annotations

from dataclasses import dataclass

COLORS = {
    "red": (190, 30, 40),
    "gold": (230, 175, 30),
    "green": (25, 120, 70),
    "blue": (30, 70, 150),
    "black": (25, 22, 20),
    "white": (240, 236, 225),
    "orange": (225, 115, 35),
    "purple": (110, 50, 130),
    "teal": (20, 130, 130),
    "brown": (115, 70, 40),
}
FAMILIES = ("stripes", "checks", "polka dots", "zigzags", "mudcloth", "florals", "kente")
HELD_OUT = "kente"


@dataclass(frozen=True)
class Sample:
    family: str
    index: int
    colors: tuple[str, str]
    caption: str


def describe(family: str, index: int) -> Sample:
    import numpy as np

    rng = np.random.default_rng(_seed(family, index))
    names = list(COLORS)
    a, b = rng.choice(len(names), size=2, replace=False)
    colors = (names[int(a)], names[int(b)])
    noun = {
        "stripes": "striped",
        "checks": "checked",
        "polka dots": "polka dot",
        "zigzags": "zigzag",
        "mudcloth": "mudcloth",
        "florals": "floral",
        "kente": "kente woven",
    }[family]
    return Sample(family, index, colors, f"a {colors[0]} and {colors[1]} {noun} fabric pattern")


def _seed(family: str, index: int) -> int:
    return (FAMILIES.index(family) * 1_000_003 + index * 7919 + 17) % (2**32)


def render(family: str, index: int, size: int = 128):
    """(PIL image, Sample) for one corpus entry."""
    import numpy as np
    from PIL import Image

    from ..data.sample_set import fabric_image

    sample = describe(family, index)
    if family == "kente":
        return fabric_image(index, size), sample
    rng = np.random.default_rng(_seed(family, index) + 1)
    fg, bg = (np.array(COLORS[c], np.float32) for c in sample.colors)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    scale = rng.uniform(size / 16, size / 5)
    if family == "stripes":
        mask = (u / scale) % 1.0 < rng.uniform(0.3, 0.6)
    elif family == "checks":
        mask = ((np.floor(u / scale) + np.floor(v / scale)) % 2) == 0
    elif family == "polka dots":
        cu, cv = (u / scale) % 1.0 - 0.5, (v / scale) % 1.0 - 0.5
        mask = cu**2 + cv**2 < rng.uniform(0.04, 0.12)
    elif family == "zigzags":
        tri = np.abs((u / scale) % 2.0 - 1.0)
        mask = ((v / scale + tri) % 1.0) < 0.45
    elif family == "mudcloth":
        cell_u, cell_v = (u / scale) % 1.0, (v / scale) % 1.0
        cross = (np.abs(cell_u - 0.5) < 0.08) | (np.abs(cell_v - 0.5) < 0.08)
        ring = np.abs(np.hypot(cell_u - 0.5, cell_v - 0.5) - 0.3) < 0.06
        mask = np.where((np.floor(u / scale) + np.floor(v / scale)) % 2 == 0, cross, ring)
    else:  # florals: five-petal rosettes on a lattice
        cu, cv = (u / scale) % 1.0 - 0.5, (v / scale) % 1.0 - 0.5
        r, th = np.hypot(cu, cv), np.arctan2(cv, cu)
        mask = r < 0.18 + 0.12 * np.cos(5 * th)
    img = np.where(mask[..., None], fg, bg)
    img = img * (1 + rng.normal(0, 0.03, img.shape[:2])[..., None])  # cloth grain
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"), sample


def corpus(per_family: int, include_held_out: bool = False) -> list[tuple[str, int]]:
    """(family, index) entries of the pretraining corpus, held-out family excluded unless asked."""
    families = [f for f in FAMILIES if include_held_out or f != HELD_OUT]
    return [(f, i) for i in range(per_family) for f in families]
