"""SLERP between latents (or text embeddings) and keyframe schedules for seamless morph animations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DOT_THRESHOLD = 0.9995
EASINGS = ("linear", "cosine", "smoothstep")


def slerp(a, b, t, dot_threshold: float = DOT_THRESHOLD):
    """Spherical interpolation from `a` to `b`, computed per batch item (dim 0).

    `a` and `b` have shape [B, ...] (or are single tensors); `t` is a number or a tensor broadcastable
    to [B]. Where the two directions are nearly parallel or opposite (|cos| > dot_threshold), it falls
    back to lerp, so there is never a division by sin(0). Computed in float64, returned in `a`'s dtype
    and device.
    """
    import torch

    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    single = a.ndim <= 1
    a2 = (a.reshape(1, -1) if single else a.reshape(a.shape[0], -1)).double()
    b2 = (b.reshape(1, -1) if single else b.reshape(b.shape[0], -1)).to(a2.device).double()
    n = a2.shape[0]
    tt = torch.as_tensor(t, dtype=torch.float64, device=a2.device).reshape(-1)
    if tt.numel() == 1:
        tt = tt.expand(n)
    elif tt.numel() != n:
        raise ValueError(f"t has {tt.numel()} values for a batch of {n}")
    tt = tt[:, None]
    na = a2.norm(dim=1, keepdim=True).clamp_min(1e-30)
    nb = b2.norm(dim=1, keepdim=True).clamp_min(1e-30)
    dot = ((a2 / na) * (b2 / nb)).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    near = dot.abs() > dot_threshold
    safe_sin = torch.where(near, torch.ones_like(sin_theta), sin_theta)
    w_a = torch.where(near, 1.0 - tt, torch.sin((1.0 - tt) * theta) / safe_sin)
    w_b = torch.where(near, tt, torch.sin(tt * theta) / safe_sin)
    out = w_a * a2 + w_b * b2
    return out.reshape(a.shape).to(a.dtype)


def ease(x: float, kind: str) -> float:
    if kind == "linear":
        return x
    if kind == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * x)
    if kind == "smoothstep":
        return x * x * (3.0 - 2.0 * x)
    raise ValueError(f"unknown easing {kind!r}; use one of {EASINGS}")


@dataclass(frozen=True)
class Frame:
    key_a: int
    key_b: int
    t: float


def keyframe_schedule(
    num_keys: int, frames_per_transition: int, easing: str = "linear", hold_frames: int = 0, loop: bool = True
) -> list[Frame]:
    """Frames of a morph through `num_keys` keyframes.

    A closed loop has num_keys transitions (the last one returns to keyframe 0) and exactly
    num_keys * (frames_per_transition + hold_frames) frames: every transition excludes its end point,
    so the seam has no duplicated frame. An open path has num_keys - 1 transitions plus the final
    keyframe. Frame 0 is always keyframe 0. Hold frames repeat a keyframe before it moves on.
    """
    from ..errors import DreamLoomError

    if num_keys < 2:
        raise DreamLoomError(f"A morph needs at least 2 keyframes, got {num_keys}.", "Give two or more seeds.")
    if frames_per_transition < 1:
        raise DreamLoomError(
            f"frames_per_transition must be at least 1, got {frames_per_transition}.", "Use 1 or more."
        )
    if hold_frames < 0:
        raise DreamLoomError(f"hold_frames must not be negative, got {hold_frames}.", "Use 0 or more.")
    if easing not in EASINGS:
        raise DreamLoomError(f"Unknown easing {easing!r}.", f"Use one of {', '.join(EASINGS)}.")
    frames: list[Frame] = []
    transitions = num_keys if loop else num_keys - 1
    for k in range(transitions):
        nxt = (k + 1) % num_keys
        frames += [Frame(k, nxt, 0.0)] * hold_frames
        for f in range(frames_per_transition):
            frames.append(Frame(k, nxt, ease(f / frames_per_transition, easing)))
    if not loop:
        frames += [Frame(num_keys - 1, num_keys - 1, 0.0)] * (hold_frames + 1)
    return frames


def seed_noise(seed: int, shape: Sequence[int]):
    """The noise ComfyUI's RandomNoise / KSampler makes for `seed` at batch size 1: CPU float32 randn."""
    import torch

    return torch.randn(tuple(shape), dtype=torch.float32, generator=torch.manual_seed(int(seed)), device="cpu")


def morph_latents(keyframes, schedule: list[Frame]):
    """Interpolate keyframe tensors [K, ...] along a schedule -> [N, ...] (one batched slerp)."""
    import torch

    a = torch.stack([keyframes[f.key_a] for f in schedule])
    b = torch.stack([keyframes[f.key_b] for f in schedule])
    t = torch.tensor([f.t for f in schedule], dtype=torch.float64)
    return slerp(a, b, t)


def morph_noise_from_seeds(seeds: Sequence[int], latent_shape: Sequence[int], schedule: list[Frame]):
    """Initial noise for every frame: keyframe i is exactly ComfyUI's noise for seeds[i]."""
    import torch

    keys = torch.stack([seed_noise(s, (1, *latent_shape))[0] for s in seeds])
    return morph_latents(keys, schedule)


def parse_seeds(text: str, at_least: int = 2) -> list[int]:
    """Comma-separated whole-number seeds; a morph needs two (the default), a list of training seeds one."""
    from ..errors import DreamLoomError

    seeds = []
    for part in text.replace(";", ",").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise DreamLoomError(
                f"Seed {part!r} is not a whole number.", "Write seeds separated by commas, e.g. 1, 42, 100, 256, 512."
            ) from None
        if not 0 <= value < 2**64:
            raise DreamLoomError(f"Seed {value} is out of range.", "Use seeds from 0 to 2**64-1.")
        seeds.append(value)
    if len(seeds) < at_least:
        if at_least == 2:
            raise DreamLoomError("A morph needs at least two seeds.", "Write two or more seeds separated by commas.")
        raise DreamLoomError(f"No seed given ({text!r}).", "Write seeds separated by commas, e.g. 0, 1, 2.")
    return seeds
