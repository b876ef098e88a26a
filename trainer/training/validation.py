"""Validation loss: held-out images measured at fixed noise and timesteps, so overfitting shows as a rising curve.

The training loss is noisy (each step draws new noise and timesteps) and only says how well the model fits the
images it sees. A held-out image measured every N steps with the same noise and the same timesteps each time
gives a smooth curve: it falls while the model learns the subject and rises once it starts copying its
training pictures. Nothing here touches the training RNG, so a run with validation trains exactly as one
without, and the measured values are the same after a resume.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.images import ImageSet
from ..errors import DreamLoomError
from .loss import noisy_latents_and_target

TIMESTEPS_PER_IMAGE = 4  # the quantile midpoints of the schedule: 125, 375, 625, 875 of 1000
NOISE_SEED_OFFSET = 104729  # the validation noise is independent of the training noise


def hold_out(images: ImageSet, count: int, seed: int, names: list[str] | None = None) -> tuple[ImageSet, ImageSet]:
    """(training images, held-out images): `count` of each concept's images, a seeded pick so every run agrees.
    `names` label the concepts in messages."""
    if count <= 0:
        return images, ImageSet([], [], [])
    held: set[int] = set()
    for concept in sorted({images.concept(i) for i in range(len(images))}):
        members = [i for i in range(len(images)) if images.concept(i) == concept]
        if count >= len(members):
            whose = f" of concept {names[concept]!r}" if names and len(names) > 1 else ""
            raise DreamLoomError(
                f"validation_images = {count} would hold out every one of the {len(members)} instance images{whose}, "
                "leaving none to train on.",
                f"Hold out at most {max(len(members) - 1, 0)} (1 or 2 is typical), or give validation_dir instead.",
            )
        held |= set(random.Random(f"validation:{seed}:{concept}").sample(members, count))
    keep = [i for i in range(len(images)) if i not in held]
    return images.subset(keep, images.warnings), images.subset(sorted(held))


@dataclass
class ValidationSample:
    """One held-out image: its clean latent (posterior mean), prompt and SDXL size ids."""

    latent: torch.Tensor  # [C, h, w], scaled
    prompt: str
    size_ids: torch.Tensor  # [6]


def samples_from(source, prompts: list[str]) -> list[ValidationSample]:
    """A held-out sample per image of a cached LatentSource (data/caches.py): its clean latent, unflipped, at the
    image's own bucket."""
    samples = []
    for index, prompt in enumerate(prompts):
        pick, bucket = [(index, False)], source.bucket_of[index] if source.bucket_of else None
        latent = source.latents(pick, torch.zeros(()), [0], bucket)[0]  # eps 0: the posterior mean, scaled
        samples.append(ValidationSample(latent.cpu(), prompt, source.size_ids(pick, [0], bucket)[0]))
    return samples


class ValidationLoss:
    """The mean diffusion loss of the held-out images over fixed (noise, timestep) pairs."""

    def __init__(self, samples: list[ValidationSample], num_train_timesteps: int, seed: int):
        self.samples = samples
        k = TIMESTEPS_PER_IMAGE
        self.timesteps = torch.tensor([int((j + 0.5) * num_train_timesteps / k) for j in range(k)])
        generator = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET)
        # one noise tensor per (image, timestep), drawn once: the same numbers at every measurement
        self.noise = [torch.randn((k, *s.latent.shape), generator=generator) for s in samples]

    @property
    def prompts(self) -> list[str]:
        return [s.prompt for s in self.samples]

    @torch.no_grad()
    def measure(self, unet, noise_scheduler, embed, family, device, dtype) -> float:
        """The loss over every held-out image and timestep; `embed(prompts)` gives the family's embeddings."""
        k, total = TIMESTEPS_PER_IMAGE, 0.0
        for sample, noise in zip(self.samples, self.noise):
            latents = sample.latent.to(device, dtype).unsqueeze(0).expand(k, -1, -1, -1)
            timesteps = self.timesteps.to(device)
            embeddings = embed([sample.prompt] * k)
            hidden, kwargs = family.unet_conditioning(embeddings, sample.size_ids.expand(k, -1).to(device), dtype)
            noisy, target = noisy_latents_and_target(noise_scheduler, latents, noise.to(device), timesteps)
            pred = unet(noisy, timesteps, hidden, **kwargs).sample
            total += F.mse_loss(pred.float(), target).item()
        return total / max(len(self.samples), 1)
