"""Aspect-ratio buckets: the training sizes of equal pixel area, which bucket each image trains at, and the fit
crop that takes an image to its bucket's shape (no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

Bucket = tuple[int, int]  # (width, height) in pixels
# An image whose fit crop takes more than this share of its area is named in a note (it is wider or taller
# than the widest bucket allows, or was merged into a bucket of another shape).
NOTED_CROP = 0.15


def bucket_sizes(resolution: int, step: int, max_aspect: float) -> list[Bucket]:
    """Every (width, height), multiples of `step`, of area at most resolution² and as close to it as the step
    allows (for each width the tallest height that fits, and the same turned on its side), with longest/shortest
    side <= max_aspect; sorted by
    aspect ratio (width / height). The square resolution x resolution is always one of them, so square images
    train exactly as without buckets."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height < step:
            break
        if max(width, height) / min(width, height) <= max_aspect + 1e-9:
            sizes.update({(width, height), (height, width)})  # a portrait twin for every landscape size
    return sorted(sizes, key=lambda b: b[0] / b[1])


def _aspect_distance(width: int, height: int, bucket: Bucket) -> float:
    return abs(math.log(width / height) - math.log(bucket[0] / bucket[1]))


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (on a log scale, so 2:1 and 1:2 are as far from the
    square); a tie goes to the larger area, then the wider."""
    return min(buckets, key=lambda b: (round(_aspect_distance(width, height, b), 12), -b[0] * b[1], -b[0]))


def fit_box(width: int, height: int, bucket: Bucket, center: bool = True, rng=None) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of the largest box of the bucket's aspect ratio inside a width x
    height image: centred, or placed at random from `rng` (a random.Random). Resized to the bucket it gives
    the training picture; for a square bucket it is today's square crop."""
    bw, bh = bucket
    if width * bh >= height * bw:  # the image is wider than the bucket: keep the full height
        crop_w, crop_h = min(width, max(1, round(height * bw / bh))), height
    else:
        crop_w, crop_h = width, min(height, max(1, round(width * bh / bw)))
    if center or rng is None:
        return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h
    return rng.randint(0, width - crop_w), rng.randint(0, height - crop_h), crop_w, crop_h


def fit_to_bucket(im, bucket: Bucket, center: bool = True, rng=None, resample=None):
    """The image cropped to the bucket's aspect ratio (fit_box) and resized to the bucket (LANCZOS unless told)."""
    from PIL import Image

    left, top, crop_w, crop_h = fit_box(*im.size, bucket, center=center, rng=rng)
    im = im.crop((left, top, left + crop_w, top + crop_h))
    if im.size != tuple(bucket):
        im = im.resize(bucket, Image.LANCZOS if resample is None else resample)
    return im


def size_ids_for(width: int, height: int, bucket: Bucket, flip: bool, center: bool = True, rng=None) -> tuple:
    """SDXL's size conditioning of one picture: (original height, original width, crop top, crop left, target
    height, target width), the crop measured in the image resized to cover the bucket; mirrored for a flip."""
    left, top, crop_w, _ = fit_box(width, height, bucket, center=center, rng=rng)
    scale = bucket[0] / crop_w
    left, top = round(left * scale), round(top * scale)
    if flip:
        left = round(width * scale) - left - bucket[0]
    return (height, width, top, left, bucket[1], bucket[0])


@dataclass
class BucketPlan:
    """The bucket each image trains at, the table of buckets in use, and what a user should be told."""

    bucket_of: list[Bucket]
    notes: list[str] = field(default_factory=list)

    @property
    def buckets(self) -> list[Bucket]:
        """The buckets in use, by aspect ratio."""
        return sorted(set(self.bucket_of), key=lambda b: b[0] / b[1])

    def table(self) -> str:
        """'640x384: 5 images, 512x512: 3 images' (the log's bucket table)."""
        counts = {b: self.bucket_of.count(b) for b in self.buckets}
        return ", ".join(f"{w}x{h}: {n} image{'s' if n != 1 else ''}" for (w, h), n in counts.items())


def plan_buckets(
    sizes: list[tuple[int, int]],
    names: list[str],
    resolution: int,
    step: int,
    max_aspect: float,
    global_batch: int,
    enabled: bool = True,
) -> BucketPlan:
    """Assign each image (its (width, height)) a bucket. Off: every image at the square resolution.

    A bucket with fewer images than the global batch size cannot fill a batch of distinct images: it is merged
    into the bucket nearest in aspect ratio (one with enough images where there is one), its images named in a
    note. With batch size 1 every bucket stays."""
    if not enabled:
        return BucketPlan([(resolution, resolution)] * len(sizes))
    candidates = bucket_sizes(resolution, step, max_aspect)
    bucket_of = [nearest_bucket(w, h, candidates) for w, h in sizes]
    notes = []
    while True:
        counts = {b: bucket_of.count(b) for b in set(bucket_of)}
        small = sorted((b for b, n in counts.items() if n < global_batch), key=lambda b: (counts[b], b[0] / b[1]))
        if not small or len(counts) == 1:
            break
        bucket = small[0]
        others = [b for b in counts if b != bucket]
        enough = [b for b in others if counts[b] >= global_batch] or others
        target = min(enough, key=lambda b: (_aspect_distance(*bucket, b), -counts[b], b))
        moved = [i for i, b in enumerate(bucket_of) if b == bucket]
        for i in moved:
            bucket_of[i] = target
        notes.append(
            f"bucket {bucket[0]}x{bucket[1]} has {len(moved)} image(s), fewer than the batch size {global_batch} "
            f"(train_batch_size x processes); merged into {target[0]}x{target[1]}, which crops more of "
            + ", ".join(Path(names[i]).name for i in moved)
        )
    cropped = []
    for i, ((w, h), bucket) in enumerate(zip(sizes, bucket_of)):
        _, _, crop_w, crop_h = fit_box(w, h, bucket)
        lost = 1 - crop_w * crop_h / (w * h)
        if lost > NOTED_CROP:
            cropped.append(f"{Path(names[i]).name} ({w}x{h} -> {bucket[0]}x{bucket[1]}, {lost:.0%} cut)")
    if cropped:
        notes.append(
            f"{len(cropped)} image(s) lose more than {NOTED_CROP:.0%} of their area to fit a bucket (longer sides "
            f"than max_aspect {max_aspect:g} allows, or merged): " + ", ".join(cropped)
        )
    return BucketPlan(bucket_of, notes)
