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
    concept_of: list[int] = field(default_factory=list)  # each image's concept (data/concepts.py); empty: all 0
    masks: list | None = None  # per image a PIL "L" mask (white = learn) or None; None: masks not read

    def __len__(self) -> int:
        return len(self.images)

    def concept(self, index: int) -> int:
        return self.concept_of[index] if self.concept_of else 0

    def subset(self, indices: list[int], warnings: list[str] | None = None) -> ImageSet:
        """The images at `indices`, in that order, with their captions, paths, concepts and masks."""
        return ImageSet(
            [self.images[i] for i in indices],
            [self.captions[i] for i in indices],
            [self.paths[i] for i in indices],
            list(warnings or []),
            [self.concept(i) for i in indices] if self.concept_of else [],
            [self.masks[i] for i in indices] if self.masks is not None else None,
        )

    def fingerprint(self) -> str:
        """A hash of the pixels, captions and concepts (not the paths: a moved folder is the same data)."""
        h = hashlib.sha256()
        for i, (im, cap) in enumerate(zip(self.images, self.captions)):
            h.update(str(im.size).encode())
            h.update(im.tobytes())
            h.update((cap or "").encode())
            if self.concept(i):
                h.update(f"concept {self.concept(i)}".encode())
            mask = self.masks[i] if self.masks else None
            if mask is not None:  # a set without masks keeps the fingerprint it had before masks existed
                h.update(b"mask" + mask.tobytes())
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
    masks = set(mask_files(files).values())
    return sorted((p for p in files if p not in masks), key=lambda p: p.name.lower())


MASK_SUFFIXES = ("_mask", "-masklabel")  # <stem>_mask.png, and OneTrainer's <stem>-masklabel.png


def mask_files(files: list[Path]) -> dict[Path, Path]:
    """Image -> its mask file among `files`: <stem>_mask.png or <stem>-masklabel.png beside an image <stem>.*"""
    by_name = {p.name.lower(): p for p in files}
    found = {}
    for image in files:
        for suffix in MASK_SUFFIXES:
            mask = by_name.get(f"{image.stem}{suffix}.png".lower())
            if mask is not None and mask != image:
                found[image] = mask
                break
    return found


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
    return to_rgb(open_image(path))


def open_image(path: str | os.PathLike):
    """Decode one image as stored (its own mode), turned upright by its EXIF orientation."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        # Pillow warns above 89 megapixels and refuses above twice that; phones take 108 and 200 MP photos, so
        # only its refusal (DecompressionBombError, named by load_image_folder) stops a picture.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            # an animated WebP or APNG: its first frame is decoded (a JPEG's MPF preview or gain map is no animation)
            frames = getattr(im, "n_frames", 1) if im.format in ("GIF", "WEBP", "PNG") else 1
            im.load()
            upright = ImageOps.exif_transpose(im)
    upright.info["frames"] = frames
    return upright


def alpha_of(im):
    """The alpha channel of a decoded image as an "L" picture, or None where it has no transparency."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode in ("RGB", "L") and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A")
    return None


def read_mask(path: Path, image_size: tuple[int, int], image_name: str) -> tuple:
    """(the mask as an "L" picture, problem or None): white = learn, black = ignore, grey = a weight."""
    mask = open_image(path)
    if mask.mode in ("RGBA", "LA", "PA", "P"):
        mask = to_rgb(mask)
    mask = mask.convert("L")
    if mask.size != image_size:
        return None, (
            f"{path.name} is {mask.size[0]}x{mask.size[1]} but its image {image_name} is "
            f"{image_size[0]}x{image_size[1]}; a mask must be the same size as its image (export it from the same "
            f"picture, or resize it to {image_size[0]}x{image_size[1]})"
        )
    return mask, None


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


def load_image_folder(
    folder: str | os.PathLike,
    resolution: int,
    use_captions: bool = True,
    masks: bool = False,
    mask_from_alpha: bool = False,
) -> ImageSet:
    """Load every image of a folder; refuse the set if any file is bad, naming each with its reason.

    masks: read each image's mask (<stem>_mask.png or <stem>-masklabel.png beside it; else, with
    mask_from_alpha, its alpha channel, read before alpha is flattened over white). An image without one
    trains unmasked (named in a note); a set with no mask at all, a mask of another size than its image, and
    an all-black mask (nothing to learn) are refused."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    files = list_image_files(folder)
    mask_of = mask_files(files + [p for p in _all_entries(folder) if p.name.lower().endswith(".png")])
    skipped = unsupported_image_files(folder)
    if not files and skipped:
        raise DreamLoomError(
            f"No images DreamLoom can read in {folder}: {_name_list(skipped)} "
            f"{'is a picture type' if len(skipped) == 1 else 'are picture types'} it does not read.",
            f"Convert them to PNG or JPEG (DreamLoom reads {_supported_types()}).",
        )
    if not files:
        others = [p.name for p in folder.iterdir() if p.is_file()][:5]
        subfolders = [p.name for p in folder.iterdir() if p.is_dir() and list_image_files(p)][:3]
        found = f" (found only: {', '.join(others)})" if others else "" if subfolders else " (it is empty)"
        inside = (
            f" Images in subfolders ({', '.join(subfolders)}, e.g. kohya's '10_sks dog') are not read: give that "
            "folder itself, or one concept per subfolder (concepts)."
            if subfolders
            else ""
        )
        raise DreamLoomError(
            f"No images in {folder}{found}.{inside}",
            "Put 5-20 .jpg, .png or .webp images of your subject in the folder.",
        )
    images, captions, paths, problems, mask_list, unmasked, animated = [], [], [], [], [], [], []
    notes = [skipped_files_warning(skipped)] if skipped else []
    if mask_of and not masks:
        notes.append(
            f"{len(mask_of)} mask file(s) ({_name_list(list(mask_of.values()))}) are not trained on; turn on "
            "masked_loss to weight the loss by them"
        )
    root = folder.resolve()
    for path in files:
        if path.is_symlink() and not _inside(path, root):
            problems.append(f"{path.name}: a link that leads outside the folder ({os.path.realpath(path)})")
            continue
        try:
            raw = open_image(path)
            im = to_rgb(raw)
        except Image.DecompressionBombError as err:
            problems.append(f"{path.name}: too many pixels ({err}); a possible decompression bomb")
            continue
        except UnidentifiedImageError:
            problems.append(f"{path.name}: not an image Pillow can read (corrupt, or a different format renamed)")
            continue
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            problems.append(f"{path.name}: unreadable or truncated ({err})")
            continue
        if raw.info.get("frames", 1) > 1:
            animated.append(path)
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
        if masks:
            mask, problem = _mask_for(path, raw, mask_of.get(path), mask_from_alpha)
            if problem:
                problems.append(problem)
                continue
            if mask is None:
                unmasked.append(path)
            mask_list.append(mask)
        images.append(im)
        captions.append(caption)
        paths.append(str(path))
    if problems:
        raise DreamLoomError(
            f"{len(problems)} of {len(files)} images in {folder} cannot be used:\n  - " + "\n  - ".join(problems),
            "Remove or replace the files listed (re-export them as PNG or JPEG; downscale a photo of more than "
            "179 megapixels; copy a linked picture into the folder).",
        )
    if animated:
        notes.append(
            f"{len(animated)} animated picture(s) ({_name_list(animated)}): only the first frame of each is trained "
            "on; save the frames you want as separate images"
        )
    if not use_captions:
        unused = [p.with_suffix(".txt") for p in files if p.with_suffix(".txt").is_file()]
        if unused:
            notes.append(
                f"{len(unused)} caption file(s) ({_name_list(unused)}) are not used, as use_captions is off; turn "
                "it on to train each image with its caption"
            )
    if len(images) < MIN_INSTANCE_IMAGES:
        notes.append(
            f"only {len(images)} image(s) in {folder}; DreamBooth needs at least {MIN_INSTANCE_IMAGES} (5-20 is "
            "typical), or the model copies the pictures instead of learning the subject. Add more images"
        )
    if masks and len(unmasked) == len(images):
        where = " or an alpha channel" if mask_from_alpha else ""
        raise DreamLoomError(
            f"masked_loss is on, but no image in {folder} has a mask file{where}.",
            "Put <name>_mask.png (white = learn, black = ignore, the image's size) beside each image <name>.png, "
            "turn on mask_from_alpha for cut-outs with transparency, or turn masked_loss off.",
        )
    if unmasked:
        notes.append(
            f"{len(unmasked)} image(s) have no mask and train unmasked (the whole picture counts): "
            f"{_name_list(unmasked)}"
        )
    return ImageSet(images, captions, paths, notes, masks=mask_list if masks else None)


def _all_entries(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError:
        return []


def _mask_for(path: Path, raw, mask_path: Path | None, from_alpha: bool) -> tuple:
    """(mask or None, problem or None) of one image: its mask file, else its alpha channel when asked."""
    import numpy as np

    if mask_path is not None:
        try:
            mask, problem = read_mask(mask_path, raw.size, path.name)
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            return None, f"{mask_path.name}: the mask of {path.name} cannot be read ({err})"
        source = mask_path.name
    elif from_alpha:
        mask, problem, source = alpha_of(raw), None, f"the alpha channel of {path.name}"
    else:
        return None, None
    if problem or mask is None:
        return None, problem
    if np.asarray(mask).max() == 0:
        return None, (
            f"{source} is all black, so nothing of {path.name} would be learned (white = learn, black = ignore; "
            "is the mask inverted?)"
        )
    return mask, None


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
