"""Template-browser thumbnails (workflows/<name>.jpg) from what the shipped workflows rendered in ComfyUI.

ComfyUI serves a pack's workflows/ folder as templates and the editor shows <name>.jpg beside each one. Run
the workflows unchanged (on tiny-fabric and tiny-sdxl) in ComfyUI, then point this at its output folder(s):

    python tools/build_thumbnails.py ComfyUI/output [more output folders ...] [--only sdxl_dreambooth_lora ...]

A fabric workflow with no output there gets `make demo`'s committed picture of the same step (docs/images/); an
SDXL one has none (tiny-sdxl's random weights draw noise, which is what its thumbnail honestly shows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# workflow -> the Save node's file prefix (under output/dreamloom/), then `make demo`'s picture of the same thing
# (docs/images/, also tiny-fabric renders) for a workflow whose ComfyUI output is not at hand
SOURCES = {
    "fabric_dreambooth_lora": ("fabric_contexts_", "demo_grid_lora"),
    "fabric_textual_inversion": ("fabric_ti_contexts_", "demo_ti_vs_lora"),
    "fabric_explore": ("fabric_styles_", "quality_grid"),
    "fabric_morph": ("fabric_morph_", "demo_morph"),
    "sdxl_dreambooth_lora": ("sdxl_contexts_", None),
    "sdxl_textual_inversion": ("sdxl_ti_contexts_", None),
    "dreambooth_full_finetune": ("full_finetune_", None),
}
SIZE = 512


def newest(folders: list[Path], prefix: str) -> Path | None:
    found = [p for folder in folders for p in folder.rglob(f"{prefix}*") if p.suffix in (".png", ".gif", ".webp")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def thumbnail(path: Path) -> Image.Image:
    """A square picture: the grid itself, or four frames of an animation side by side in two rows."""
    with Image.open(path) as im:
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            tiles = []
            for k in range(4):
                im.seek(k * frames // 4)
                tiles.append(im.convert("RGB"))
            w, h = tiles[0].size
            picture = Image.new("RGB", (2 * w, 2 * h))
            for k, tile in enumerate(tiles):
                picture.paste(tile, ((k % 2) * w, (k // 2) * h))
        else:
            picture = im.convert("RGB")
    side = max(picture.size)
    square = Image.new("RGB", (side, side), "white")
    square.paste(picture, ((side - picture.width) // 2, (side - picture.height) // 2))
    return square.resize((SIZE, SIZE), Image.LANCZOS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", type=Path, help="ComfyUI output folders to search")
    parser.add_argument("--only", nargs="+", choices=sorted(SOURCES), help="these workflows' thumbnails only")
    args = parser.parse_args(argv)
    missing = []
    for name, prefixes in SOURCES.items():
        if args.only and name not in args.only:
            continue
        source = next(filter(None, (newest(args.outputs, p) for p in prefixes[:1])), None)
        if source is None and prefixes[1]:
            source = newest([ROOT / "docs" / "images"], prefixes[1])
        if source is None:
            missing.append(name)
            continue
        target = ROOT / "workflows" / f"{name}.jpg"
        tmp = target.with_suffix(".jpg.tmp")
        thumbnail(source).save(tmp, format="JPEG", quality=85)
        tmp.replace(target)
        print(f"{target.relative_to(ROOT)} <- {source}")
    if missing:
        print(f"no rendered output found for: {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
