"""Random fp16 weights for full-size test models, at copying speed.

Every tensor is a run of one pool of N(0, std) values, drawn once, starting at an offset of its own (wrapping
around): the values are normal, every tensor differs from every other (a weight put in the wrong place shows), and
filling SDXL's 3.5 billion weights is a copy (about 5 s on one core) instead of 3.5 billion draws (46 s).
"""

import torch

POOL_SIZE = (1 << 24) + 43  # odd, so that no row length lines the runs up with each other


class RandomWeights:
    def __init__(self, seed: int, std: float = 0.02):
        self.generator = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(POOL_SIZE, generator=self.generator) * std).to(torch.float16)

    def tensor(self, shape) -> torch.Tensor:
        n = 1
        for size in shape:
            n *= size
        out = torch.empty(n, dtype=torch.float16)
        start = int(torch.randint(0, POOL_SIZE, (1,), generator=self.generator))
        done = 0
        while done < n:
            take = min(POOL_SIZE - start, n - done)
            out[done : done + take] = self.pool[start : start + take]
            done, start = done + take, 0
        return out.view(shape)

    def state_dict_like(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A tensor for every entry of `module`'s state dict (a meta-device module: shapes only)."""
        return {name: self.tensor(value.shape) for name, value in module.state_dict().items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, but for two fp16/bf16 tensors it compares their bits as int16 (4x as fast on a CPU, and NaN
    equals itself)."""
    if a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16) and a.shape == b.shape:
        return torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))
    return torch.equal(a, b)
