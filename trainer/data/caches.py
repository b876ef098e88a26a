"""What the training step reads instead of images and prompts: VAE latents and text embeddings."""

from __future__ import annotations

import random

import numpy as np
import torch

from ..inference.gpu_memory import to_device
from .buckets import fit_to_bucket, size_ids_for
from .images import pil_to_tensor


class LatentSource:
    """Latents for a set of images at their aspect-ratio buckets: the cached posterior (mean, std) per (image,
    bucket, flip), or encoded on the fly (random crop); with masks, the loss weights at latent size beside them.

    `bucket_of` gives each image its one bucket (instance images); without it every image is made at each of
    `buckets` (class images, fitted to the bucket of the batch they join); without either, the square
    resolution, as before buckets.

    The cache lives in host memory, whatever the device: class images are cached at every bucket in use, and 100
    SDXL class images at 1024 px with flips take about 100 MB per bucket, which an 8-12 GB card needs for
    training. Each step copies its few rows over (`to_device`: from pinned memory, without waiting).
    """

    def __init__(
        self,
        vae,
        images: list,
        resolution: int,
        center_crop: bool,
        use_flip: bool,
        cache: bool,
        device,
        seed: int,
        bucket_of: list | None = None,
        buckets: list | None = None,
        masks: list | None = None,
        unmasked_weight: float = 0.0,
    ):
        self.vae, self.images, self.resolution = vae, images, resolution
        self.center_crop, self.use_flip, self.cache = center_crop, use_flip, cache
        self.device, self.seed = device, seed
        square = (resolution, resolution)
        self.bucket_of = bucket_of
        self.buckets = sorted(set(bucket_of)) if bucket_of else list(buckets or [square])
        # masks: per image a PIL "L" picture (white = learn) or None (learn everywhere); None: no masked loss
        self.masks = masks if masks is not None and any(m is not None for m in masks) else None
        self.unmasked_weight = unmasked_weight
        self.scaling = vae.config.scaling_factor
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent cell
        self.channels = vae.config.latent_channels
        self.cached: dict[tuple, tuple] = {}
        if cache:
            self._fill_cache()

    def latent_shape(self, bucket) -> tuple[int, int, int]:
        """(channels, height, width) of a latent at `bucket` (width, height in pixels)."""
        return (self.channels, bucket[1] // self.factor, bucket[0] // self.factor)

    def _buckets_of(self, index: int) -> list:
        return [self.bucket_of[index]] if self.bucket_of else self.buckets

    def _crop_rng(self, position: int):
        return None if self.center_crop else random.Random(f"crop:{self.seed}:{position}")

    def _pixels(self, index: int, bucket, flip: bool, position: int):
        im = fit_to_bucket(self.images[index], bucket, center=self.center_crop, rng=self._crop_rng(position))
        t = pil_to_tensor(im)
        return torch.flip(t, dims=[2]) if flip else t

    def _weights(self, index: int, bucket, flip: bool, position: int):
        """The loss weights of one picture at latent size [1, h, w]: its mask, cropped like the picture and
        area-averaged to latent cells, floored at unmasked_weight; ones where the image has no mask."""
        shape = self.latent_shape(bucket)
        mask = self.masks[index]
        if mask is None:
            return torch.ones((1, *shape[1:]))
        from PIL import Image

        small = fit_to_bucket(
            mask, (shape[2], shape[1]), center=self.center_crop, rng=self._crop_rng(position), resample=Image.BOX
        )
        weights = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None]
        if flip:
            weights = torch.flip(weights, dims=[2])
        return self.unmasked_weight + (1.0 - self.unmasked_weight) * weights

    def size_ids(self, picks: list[tuple[int, bool]], positions: list[int], bucket=None) -> torch.Tensor:
        """Per pick: (original height, original width, crop top, crop left, target height, target width) at
        `bucket` (default: the square resolution), the crop measured in the image resized to cover the bucket,
        as SDXL's time ids take them. A flipped image's crop is mirrored."""
        bucket = bucket or (self.resolution, self.resolution)
        rows = [
            size_ids_for(
                *self.images[index].size, bucket, flip and self.use_flip, self.center_crop, self._crop_rng(position)
            )
            for (index, flip), position in zip(picks, positions)
        ]
        return torch.tensor(rows, dtype=torch.float32)

    @torch.no_grad()
    def _encode(self, pixels):
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _fill_cache(self) -> None:
        # One image at a time on a GPU: the VAE encoder's activations for 8 images at 512 px in fp32 peak at
        # about 8 GB, more than the training step itself. On a CPU, batches of 8 are faster and memory is ample.
        batch = 1 if torch.device(self.device).type == "cuda" else 8
        flips = (False, True) if self.use_flip else (False,)
        for bucket in self.buckets:  # one shape per encoder batch
            keys = [(i, bucket, f) for i in range(len(self.images)) if bucket in self._buckets_of(i) for f in flips]
            for start in range(0, len(keys), batch):
                chunk = keys[start : start + batch]
                mean, std = self._encode(torch.stack([self._pixels(i, b, f, 0) for i, b, f in chunk]))
                mean, std = mean.cpu(), std.cpu()
                for j, (i, b, f) in enumerate(chunk):
                    weights = self._weights(i, b, f, 0) if self.masks is not None else None
                    self.cached[(i, b, f)] = (mean[j], std[j], weights)

    def _bucket(self, bucket):
        return bucket or (self.resolution, self.resolution)

    def latents(self, picks: list[tuple[int, bool]], eps, positions: list[int], bucket=None):
        """Sample latents for (index, flip) picks at `bucket`: (mean + std * eps) * scaling_factor."""
        bucket = self._bucket(bucket)
        picks = [(i, f and self.use_flip) for i, f in picks]
        if self.cache:
            rows = [self.cached[(i, bucket, f)] for i, f in picks]
            moments = torch.stack([torch.stack([row[0] for row in rows]), torch.stack([row[1] for row in rows])])
            mean, std = to_device(moments, self.device)  # one copy a step, queued without waiting
        else:
            pixels = torch.stack([self._pixels(i, bucket, f, pos) for (i, f), pos in zip(picks, positions)])
            mean, std = self._encode(pixels)
        return (mean + std * eps.to(mean.device)) * self.scaling

    def weights(self, picks: list[tuple[int, bool]], positions: list[int], bucket=None):
        """The masked loss's weights [rows, 1, h, w] of the picks at `bucket`, or None without masks."""
        if self.masks is None:
            return None
        bucket = self._bucket(bucket)
        picks = [(i, f and self.use_flip) for i, f in picks]
        if self.cache:
            return torch.stack([self.cached[(i, bucket, f)][2] for i, f in picks])
        return torch.stack([self._weights(i, bucket, f, pos) for (i, f), pos in zip(picks, positions)])


class PromptEmbeddings:
    """Text-encoder outputs per prompt (the family's dict: "hidden", and "pooled" for SDXL): cached once when the
    text encoders are frozen, else computed per batch."""

    def __init__(self, comps, device, dtype, cached_prompts: list[str] | None):
        self.comps, self.device, self.dtype = comps, device, dtype
        self.cached = cached_prompts is not None
        self.cache: dict[str, dict] = {}
        with torch.no_grad():
            for prompt in cached_prompts or []:
                encoded = comps.family.encode_prompts(comps, [prompt], device)
                self.cache[prompt] = {k: v[0].to(dtype) for k, v in encoded.items() if v is not None}

    def __call__(self, prompts: list[str], text_encoders: dict | None = None) -> dict:
        """Embeddings of `prompts`; `text_encoders` are the (possibly DDP-wrapped) modules to run when not cached."""
        if self.cached:
            return {k: torch.stack([self.cache[p][k] for p in prompts]) for k in self.cache[prompts[0]]}
        encoded = self.comps.family.encode_prompts(self.comps, prompts, self.device, text_encoders)
        return {k: v.to(self.dtype) for k, v in encoded.items() if v is not None}
