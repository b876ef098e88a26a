"""The low-rank maths of the LoRA tools: the best rank-r approximation of a weight difference (truncated SVD) and
of a LoRA's own product, with the share of the difference each keeps.

The share is measured as energy: the squared Frobenius norm kept, ||dW_r||^2 / ||dW||^2, which is the sum of the
kept singular values squared over the sum of all of them squared. With the truncated SVD it splits the difference
exactly: kept share + ||dW - dW_r||^2 / ||dW||^2 = 1. (kohya's `sv_fro` reports the square root of the same ratio.)

A LoRA module's factors follow kohya's convention: Linear down [r, in], up [out, r]; Conv down [r, in, k, k], up
[out, r, 1, 1]. The singular values are split evenly between the two (sqrt(S) each), so neither factor holds
all the magnitude when the file is stored in fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    up: torch.Tensor  # [out, r] (2-D; `lora_factors` gives them the layer's shape)
    down: torch.Tensor  # [r, in * k * k]
    rank: int
    kept: float  # share of the difference's energy kept, 0-1
    energy: float  # ||dW||_F^2 of the whole difference
    max_rank: int  # the most this module allows: min(out, in * k * k)


def rank_for(singular_values: torch.Tensor, rank: int, keep_share: float | None = None) -> int:
    """How many singular values to keep: `rank` (at most as many as there are), or fewer where `keep_share` of the
    energy is reached sooner (a dynamic rank); at least 1."""
    rank = min(rank, singular_values.numel())
    if keep_share is not None:
        energy = singular_values.double().square()
        total = float(energy.sum())
        if total > 0:
            cumulative = energy.cumsum(0) / total
            reached = int((cumulative < keep_share - 1e-12).sum()) + 1  # the first index reaching the share, + 1
            rank = min(rank, reached)
    return max(rank, 1)


def _truncate(u, s, vh, rank: int, keep_share: float | None, max_rank: int) -> LowRank:
    r = rank_for(s, rank, keep_share)
    energy = s.double().square()
    total = float(energy.sum())
    kept = float(energy[:r].sum()) / total if total > 0 else 1.0
    root = s[:r].sqrt()
    return LowRank(u[:, :r] * root, root[:, None] * vh[:r], r, kept, total, max_rank)


def low_rank(delta: torch.Tensor, rank: int, keep_share: float | None = None) -> LowRank:
    """The truncated SVD of a weight difference (Linear [out, in] or Conv [out, in, k, k]), in float32."""
    matrix = delta.reshape(delta.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return _truncate(u, s, vh, rank, keep_share, min(matrix.shape))


def low_rank_of_product(up: torch.Tensor, down: torch.Tensor, rank: int, keep_share: float | None = None) -> LowRank:
    """The truncated SVD of up @ down without forming it: QR of both factors, then the SVD of an r x r core
    (exact, and cheap for the large layers). `up`, `down` in any LoRA shape; `up` already scaled as wanted."""
    up2, down2 = up.reshape(up.shape[0], -1).float(), down.reshape(down.shape[0], -1).float()
    q_up, r_up = torch.linalg.qr(up2)
    q_down, r_down = torch.linalg.qr(down2.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return _truncate(q_up @ u, s, vh @ q_down.T, rank, keep_share, min(up2.shape[0], down2.shape[1]))


def lora_factors(result: LowRank, weight_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) in kohya's shapes for a layer of `weight_shape`: a Conv's down [r, in, k, k], up [out, r, 1, 1]."""
    down, up = result.down.contiguous(), result.up.contiguous()
    if len(weight_shape) == 4:
        out_ch, in_ch, kh, kw = weight_shape
        return down.reshape(result.rank, in_ch, kh, kw), up.reshape(out_ch, result.rank, 1, 1)
    return down, up


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float, weight_shape) -> torch.Tensor:
    """scale * up @ down in float32, shaped as the layer's weight (a Linear LoRA on a 1x1 conv, and back, fits)."""
    product = up.reshape(up.shape[0], -1).float() @ down.reshape(down.shape[0], -1).float()
    return (product * scale).reshape(weight_shape)
