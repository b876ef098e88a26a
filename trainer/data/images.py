"""Instance and class image sets: scanning, decoding, conversion, crop/resize/flip."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DreamLoomError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# Picture types people keep next to their images that DreamLoom does not read: named in a warning, never
# skipped without a word.
OTHER_IMAGE_SUFFIXES = {
    ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".svg", ".jxl", ".jp2", ".j2k", ".jfif", ".psd", ".ico",
    ".tga", ".exr", ".hdr", ".dng", ".raw", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2",
}  # fmt: skip
MIN_SIDE = 16  # smaller than this cannot be trained on at all
MIN_INSTANCE_IMAGES = 3  # fewer than this and DreamBooth copies the pictures instead of learning the subject
CLIP_MAX_TOKENS = 77  # what the SD1.5 text encoder reads, start and end tokens included; the rest is cut
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "clip_tokenizer"  # the shipped CLIP tokenizer


@dataclass
class ImageSet:
    """Decoded RGB images with their captions and source paths."""

    images: list  # PIL.Image.Image, RGB
    captions: list[str | None]
    paths: list[str]
    warnings: list[str] = field(default_factory=list)
    masks: list | None = None  # per image a PIL "L" mask (white = learn) or None; None: masks not read

    def __len__(self) -> int:
        return len(self.images)

    def fingerprint(self) -> str:
        """A hash of the pixels and captions (not the paths: a moved folder is the same data)."""
        h = hashlib.sha256()
        for im, cap in zip(self.images, self.captions):
            h.update(str(im.size).encode())
            h.update(im.tobytes())
            h.update((cap or "").encode())
        return h.hexdigest()[:16]


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder`, any letter case of the suffix, sorted, each listed once."""
    folder = Path(folder)
    if not folder.exists():
        raise DreamLoomError(
            f"Image folder not found: {folder}", "Check the path; it must be a folder of .jpg/.png/.webp images."
        )
    if not folder.is_dir():
        raise DreamLoomError(f"{folder} is a file, not a folder.", "Give the folder that holds the training images.")
    try:
        entries = list(folder.iterdir())
    except OSError as err:
        raise DreamLoomError(
            f"The image folder {folder} cannot be read ({err.strerror or err}).",
            "Check that the folder exists and that you may read it.",
        ) from None
    files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.name.lower())


def unsupported_image_files(folder: str | os.PathLike) -> list[Path]:
    """Picture files directly in `folder` of a type DreamLoom does not read (GIF, TIFF, HEIC, AVIF, SVG, RAW...)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = [
        p
        for p in folder.iterdir()
        if p.suffix.lower() in OTHER_IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(files, key=lambda p: p.name.lower())


def _supported_types() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))


def _name_list(paths: list[Path], limit: int = 10) -> str:
    names = ", ".join(p.name for p in paths[:limit])
    return names + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def skipped_files_warning(skipped: list[Path]) -> str:
    return (
        f"skipped {len(skipped)} file(s) of picture types DreamLoom does not read: {_name_list(skipped)}. "
        f"Only {_supported_types()} are read; convert those files to PNG or JPEG to train on them"
    )


def load_rgb(path: str | os.PathLike):
    """Decode one image to 8-bit RGB: EXIF orientation, alpha over white, 16-bit/CMYK/palette/greyscale."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    return to_rgb(im)


def to_rgb(im):
    import numpy as np
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "RGB" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def load_image_folder(folder: str | os.PathLike, resolution: int, use_captions: bool = True) -> ImageSet:
    """Load every image of a folder; refuse the set if any file is bad, naming each with its reason."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    files = list_image_files(folder)
    skipped = unsupported_image_files(folder)
    if not files and skipped:
        raise DreamLoomError(
            f"No images DreamLoom can read in {folder}: {_name_list(skipped)} "
            f"{'is a picture type' if len(skipped) == 1 else 'are picture types'} it does not read.",
            f"Convert them to PNG or JPEG (DreamLoom reads {_supported_types()}).",
        )
    if not files:
        others = [p.name for p in folder.iterdir() if p.is_file()][:5]
        found = f" (found only: {', '.join(others)})" if others else " (it is empty)"
        raise DreamLoomError(
            f"No images in {folder}{found}.",
            "Put 5-20 .jpg, .png or .webp images of your subject in the folder.",
        )
    images, captions, paths, problems = [], [], [], []
    notes = [skipped_files_warning(skipped)] if skipped else []
    root = folder.resolve()
    for path in files:
        if path.is_symlink() and not _inside(path, root):
            problems.append(f"{path.name}: a link that leads outside the folder ({os.path.realpath(path)})")
            continue
        try:
            im = load_rgb(path)
        except Image.DecompressionBombError as err:
            problems.append(f"{path.name}: too many pixels ({err}); a possible decompression bomb")
            continue
        except Image.DecompressionBombWarning as err:
            problems.append(f"{path.name}: too many pixels ({err}); a possible decompression bomb")
            continue
        except UnidentifiedImageError:
            problems.append(f"{path.name}: not an image Pillow can read (corrupt, or a different format renamed)")
            continue
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            problems.append(f"{path.name}: unreadable or truncated ({err})")
            continue
        w, h = im.size
        if min(w, h) < MIN_SIDE:
            problems.append(f"{path.name}: only {w}x{h} pixels; at least {MIN_SIDE} px on the short side is needed")
            continue
        if min(w, h) < resolution:
            notes.append(
                f"{path.name} is {w}x{h}, smaller than the training resolution {resolution}; it will be upscaled "
                f"and look soft"
            )
        caption = None
        if use_captions:
            txt = path.with_suffix(".txt")
            if txt.exists():
                caption = read_caption(txt, notes)
        images.append(im)
        captions.append(caption)
        paths.append(str(path))
    if problems:
        raise DreamLoomError(
            f"{len(problems)} of {len(files)} images in {folder} cannot be used:\n  - " + "\n  - ".join(problems),
            "Remove or replace the files listed (re-export them as PNG or JPEG).",
        )
    if len(images) < MIN_INSTANCE_IMAGES:
        notes.append(
            f"only {len(images)} image(s) in {folder}; DreamBooth needs at least {MIN_INSTANCE_IMAGES} (5-20 is "
            "typical), or the model copies the pictures instead of learning the subject. Add more images"
        )
    return ImageSet(images, captions, paths, notes)


def read_caption(txt: Path, notes: list[str]) -> str | None:
    """A caption file's text; bytes that are not UTF-8 and text past CLIP's 77 tokens are noted in `notes`."""
    try:
        raw = txt.read_bytes()
    except OSError as err:
        notes.append(f"caption {txt.name} cannot be read ({err.strerror or err}); the instance prompt is used instead")
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        text = raw.decode("utf-8", errors="replace").lstrip("\ufeff")
        notes.append(
            f"caption {txt.name} is not valid UTF-8 (first bad byte at offset {err.start}); the bytes that could not "
            "be read were replaced with U+FFFD. Save the file as UTF-8 to keep every character"
        )
    text = text.strip()
    if not text:
        return None
    tokens, exact = caption_token_count(text)
    if tokens > CLIP_MAX_TOKENS:
        count = f"{tokens}" if exact else f"at least {tokens}"
        notes.append(
            f"caption {txt.name} is {count} CLIP tokens long (start and end included), more than the "
            f"{CLIP_MAX_TOKENS} the text encoder reads: the trainer cuts off the end, so its last words are not "
            "learned. Shorten it (about 60 words or fewer)"
        )
    return text


# Pieces CLIP's pre-tokenizer splits text into (letters, single digits, runs of other symbols): each is at least
# one token and at most one token per UTF-8 byte.
_CLIP_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


def caption_token_count(text: str) -> tuple[int, bool]:
    """(CLIP tokens of `text` with start and end, exact?). The shipped tokenizer is loaded lazily, only for a
    caption whose length the cheap bounds cannot decide: at most one token per byte of each piece (fits) or at
    least one per piece (too long)."""
    pieces = _CLIP_PIECES.findall(text.lower())
    at_least = len(pieces) + 2
    at_most = sum(len(p.encode("utf-8")) for p in pieces) + 2
    if at_most <= CLIP_MAX_TOKENS or at_least > CLIP_MAX_TOKENS:
        return at_least, at_least == at_most
    tokenizer = _clip_tokenizer()
    if tokenizer is None:
        return at_least, False
    return len(tokenizer.tokenize(text)) + 2, True


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    """The shipped CLIP tokenizer (transformers; no torch), or None where it cannot be loaded."""
    try:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
        tokenizer.model_max_length = 1 << 30  # we count long captions on purpose: no "too long" warning
        return tokenizer
    except Exception:  # noqa: BLE001 - it only refines a warning; the bounds still apply
        return None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError):
        return False


def image_set_from_arrays(arrays, captions: list[str | None] | None = None) -> ImageSet:
    """An ImageSet from HxWxC float arrays in [0, 1] (e.g. a ComfyUI IMAGE batch)."""
    import numpy as np
    from PIL import Image

    images = []
    for arr in arrays:
        a = np.asarray(arr, dtype=np.float32)
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
            raise DreamLoomError(f"An image has shape {a.shape}; expected height x width x 3.", "Pass an IMAGE batch.")
        a = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[a.shape[2]]
        images.append(to_rgb(Image.fromarray(a[..., 0] if mode == "L" else a, mode)))
    if not images:
        raise DreamLoomError("The IMAGE batch is empty.", "Connect a batch of 5-20 images.")
    caps = list(captions) if captions else [None] * len(images)
    return ImageSet(images, caps, [f"<batch:{i}>" for i in range(len(images))])


def square_crop(width: int, height: int, center: bool = True, rng=None) -> tuple[int, int, int]:
    """(left, top, side) of the square crop of a width x height image: centred, or random from `rng`."""
    side = min(width, height)
    if center or rng is None:
        return (width - side) // 2, (height - side) // 2, side
    return rng.randint(0, width - side), rng.randint(0, height - side), side


def crop_resize(im, resolution: int, center: bool = True, rng=None):
    """Square crop (centred, or random from `rng`, a random.Random) and LANCZOS resize."""
    from PIL import Image

    left, top, side = square_crop(*im.size, center=center, rng=rng)
    im = im.crop((left, top, left + side, top + side))
    if side != resolution:
        im = im.resize((resolution, resolution), Image.LANCZOS)
    return im


def pil_to_tensor(im):
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1]."""
    import numpy as np
    import torch

    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
