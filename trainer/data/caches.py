"""What the training step reads instead of images and prompts: VAE latents and text embeddings."""

from __future__ import annotations

import random

import torch

from .images import crop_resize, pil_to_tensor


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

    def _pixels(self, index: int, flip: bool, position: int):
        rng = None if self.center_crop else random.Random(f"crop:{self.seed}:{position}")
        t = pil_to_tensor(crop_resize(self.images[index], self.resolution, center=self.center_crop, rng=rng))
        return torch.flip(t, dims=[2]) if flip else t

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
    """Text-encoder outputs per prompt: cached once when the text encoder is frozen, else computed per batch."""

    def __init__(self, comps, device, dtype, cached_prompts: list[str] | None):
        self.comps, self.device, self.dtype = comps, device, dtype
        self.cached = cached_prompts is not None
        self.cache: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for prompt in cached_prompts or []:
                self.cache[prompt] = comps.family.encode_prompts(comps, [prompt], device)[0].to(dtype)

    def __call__(self, prompts: list[str], text_encoder=None):
        """Embeddings of `prompts`; `text_encoder` is the (possibly DDP-wrapped) module to run when not cached."""
        if self.cached:
            return torch.stack([self.cache[p] for p in prompts])
        return self.comps.family.encode_prompts(self.comps, prompts, self.device, text_encoder).to(self.dtype)
