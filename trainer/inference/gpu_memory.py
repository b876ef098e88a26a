"""Free CUDA memory as an allocation sees it (the decode policy, `auto` checkpointing, `doctor`); torch only, so
`doctor` and set-up can ask without loading diffusers."""

from __future__ import annotations

import torch


def free_cuda_bytes(device) -> int:
    """What a new allocation on the CUDA `device` can have: the driver's free memory and what torch holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
