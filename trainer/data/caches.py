"""What the training step reads instead of images and prompts: VAE latents and text embeddings."""

from __future__ import annotations

import random

import torch

from .images import crop_resize, pil_to_tensor, square_crop


class LatentSource:
    """Latents for a set of images: cached posterior (mean, std) per image and flip, or encoded on the fly."""

    def __init__(
        self, vae, images: list, resolution: int, center_crop: bool, use_flip: bool, cache: bool, device, seed: int
    ):
        self.vae, self.images, self.resolution = vae, images, resolution
        self.center_crop, self.use_flip, self.cache = center_crop, use_flip, cache
        self.device, self.seed = device, seed
        self.scaling = vae.config.scaling_factor
        self.cached: dict[tuple[int, bool], tuple] = {}
        if cache:
            self._fill_cache()

    def _crop_rng(self, position: int):
        return None if self.center_crop else random.Random(f"crop:{self.seed}:{position}")

    def _pixels(self, index: int, flip: bool, position: int):
        im = crop_resize(self.images[index], self.resolution, center=self.center_crop, rng=self._crop_rng(position))
        t = pil_to_tensor(im)
        return torch.flip(t, dims=[2]) if flip else t

    def size_ids(self, picks: list[tuple[int, bool]], positions: list[int]) -> torch.Tensor:
        """Per pick: (original height, original width, crop top, crop left, target height, target width), the
        crop measured in the resized image, as SDXL's time ids take them. A flipped image's crop is mirrored."""
        rows = []
        for (index, flip), position in zip(picks, positions):
            width, height = self.images[index].size
            left, top, side = square_crop(width, height, self.center_crop, self._crop_rng(position))
            scale = self.resolution / side
            left, top = round(left * scale), round(top * scale)
            if flip and self.use_flip:
                left = round(width * scale) - left - self.resolution
            rows.append((height, width, top, left, self.resolution, self.resolution))
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
        keys = [(i, f) for i in range(len(self.images)) for f in flips]
        for start in range(0, len(keys), batch):
            chunk = keys[start : start + batch]
            mean, std = self._encode(torch.stack([self._pixels(i, f, 0) for i, f in chunk]))
            for j, key in enumerate(chunk):
                self.cached[key] = (mean[j], std[j])

    def latents(self, picks: list[tuple[int, bool]], eps, positions: list[int]):
        """Sample latents for (index, flip) picks: (mean + std * eps) * scaling_factor."""
        picks = [(i, f and self.use_flip) for i, f in picks]
        if self.cache:
            mean = torch.stack([self.cached[p][0] for p in picks])
            std = torch.stack([self.cached[p][1] for p in picks])
        else:
            pixels = torch.stack([self._pixels(i, f, pos) for (i, f), pos in zip(picks, positions)])
            mean, std = self._encode(pixels)
        return (mean + std * eps.to(mean.device)) * self.scaling


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
