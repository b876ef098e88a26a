"""GPU memory: what is free as an allocation sees it (the decode policy, `auto` checkpointing, `doctor`), and copying
host tensors to it without waiting (the training step, the latent cache). Torch only, so `doctor` and set-up can ask
without loading diffusers."""

from __future__ import annotations

import torch


def free_cuda_bytes(device) -> int:
    """What a new allocation on the CUDA `device` can have: the driver's free memory and what torch holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` on `device`. A CPU tensor bound for a CUDA device is copied from pinned memory without waiting:
    a plain .to() from pageable memory makes the host wait for all queued GPU work, which on a step that is
    bound by kernel launches keeps the next step's Python from running while the GPU finishes this one.
    Elsewhere the same as tensor.to(device)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
