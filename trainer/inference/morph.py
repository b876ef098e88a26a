"""Morph rendering with diffusers: SLERPed initial noise through the learned style, in batches."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import DreamLoomError
from .slerp import keyframe_schedule, morph_noise_from_seeds

TUTORIAL_SEEDS = [1, 42, 100, 256, 512]


@dataclass
class MorphSpec:
    prompt: str = "a sks african fabric pattern"
    negative_prompt: str = ""
    seeds: Sequence[int] = tuple(TUTORIAL_SEEDS)
    seconds: float = 15.0
    fps: float = 30.0
    easing: str = "linear"
    hold_frames: int = 0
    loop: bool = True
    steps: int = 25
    guidance: float = 7.5
    resolution: int = 512
    sampler: str = "dpmpp_2m"

    @property
    def transitions(self) -> int:
        return len(self.seeds) if self.loop else len(self.seeds) - 1

    def frames_per_transition(self) -> int:
        return max(1, round(self.seconds * self.fps) // self.transitions - self.hold_frames)

    def check(self) -> None:
        """Refuse lengths that leave no frame for the morph between keyframes (the animation would be longer than
        asked and all holds); the CLI calls it before loading anything."""
        if self.transitions < 1:
            raise DreamLoomError(
                "An open morph (--open) with one keyframe has nothing to morph to.",
                "Give two or more seeds (--seeds) or --keyframes 2 or more, or leave out --open.",
            )
        total = round(self.seconds * self.fps)
        per_keyframe = total // self.transitions
        if per_keyframe - self.hold_frames >= 1:
            return
        what = f"{self.seconds:g} s at {self.fps:g} fps is {total} frames, {per_keyframe} per keyframe"
        if self.hold_frames and per_keyframe >= 1:
            raise DreamLoomError(
                f"{what}: --hold-frames {self.hold_frames} leaves none for the morph between keyframes.",
                f"Use --hold-frames {per_keyframe - 1} or less, or more --seconds."
                if per_keyframe > 1
                else "Leave out --hold-frames, or give more --seconds or fewer keyframes.",
            )
        raise DreamLoomError(
            f"{what} for {len(self.seeds)} keyframes: not one frame for the morph between them.",
            "Give more --seconds or a higher --fps, or fewer keyframes.",
        )


def morph_noise(pipe, spec: MorphSpec):
    schedule = keyframe_schedule(
        len(spec.seeds), spec.frames_per_transition(), spec.easing, spec.hold_frames, spec.loop
    )
    channels = pipe.unet.config.in_channels
    side = spec.resolution // pipe.vae_scale_factor
    return morph_noise_from_seeds(spec.seeds, (channels, side, side), schedule)


def render_morph(pipe, spec: MorphSpec, batch_size: int = 8, on_progress=None, noise=None) -> list:
    """All frames of the morph, `batch_size` frames per pipeline call."""
    from .pipelines import generate

    noise = morph_noise(pipe, spec) if noise is None else noise
    frames = []
    n = noise.shape[0]

    def collect(_start: int, images: list) -> None:
        frames.extend(images)
        if on_progress:
            on_progress(len(frames), n)

    generate(
        pipe,
        [spec.prompt] * n,
        [0] * n,
        spec.steps,
        spec.guidance,
        spec.resolution,
        negative_prompt=spec.negative_prompt,
        batch_size=batch_size,
        latents=noise,
        on_batch=collect,
    )
    return frames


def bench_morph(pipe, spec: MorphSpec, n_frames: int, batch_size: int, repeats: int = 3) -> dict:
    """Frames per second of batched rendering against one pipeline call per frame (the tutorial's way),
    alternating the two in one process on the same frames."""
    from .pipelines import gpu_batch_for

    noise = morph_noise(pipe, spec)[:n_frames]
    render_morph(pipe, spec, batch_size, noise=noise[:batch_size])  # warm-up
    times = {"batched": [], "per_frame": []}
    for _ in range(repeats):
        for name, bs in (("batched", batch_size), ("per_frame", 1)):
            t0 = time.perf_counter()
            render_morph(pipe, spec, bs, noise=noise)
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {
        "frames": n_frames,
        "batch_size": gpu_batch_for(batch_size, spec.resolution, pipe.unet.device.type),  # what generate() ran
        "batched_fps": n_frames / med["batched"],
        "per_frame_fps": n_frames / med["per_frame"],
        "ratio": med["per_frame"] / med["batched"],
        "seconds": med,
    }
