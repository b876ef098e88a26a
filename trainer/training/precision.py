"""Device, precision and optimizer set-up for a training run."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration

from ..errors import DreamLoomError

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def has_accelerator() -> bool:
    """A CUDA (or Apple MPS) device is present."""
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def best_device() -> torch.device:
    """Where inference runs when the user names no device: CUDA if present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_accelerator(mixed_precision: str, gradient_accumulation_steps: int, project_dir) -> Accelerator:
    # accelerate keeps a process-wide singleton; a second run in the same process (tests, API callers) may
    # use another precision. The distributed part (PartialState) is kept.
    AcceleratorState._reset_state()
    return Accelerator(
        cpu=not has_accelerator(),  # without cpu=True accelerate never forms a CPU (gloo) group under torchrun
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(project_dir)),
    )


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of frozen weights: the mixed-precision dtype, else fp32."""
    return WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)


def place_modules(comps, device, dtype: torch.dtype) -> None:
    """Frozen weights in `dtype` on `device`; trainable parameters moved as they are, in fp32 (master weights).

    diffusers' cast_training_params would upcast trainables after a whole-module cast, but cannot undo the
    rounding that cast did to their initial values (tests/test_training.py checks they stay exact). The VAE
    encodes in fp32 under fp16, where its activations overflow.
    """
    for module in (comps.unet, comps.text_encoder):
        for param in module.parameters():
            param.data = param.data.to(device, None if param.requires_grad else dtype)
        for buffer in module.buffers():
            buffer.data = buffer.data.to(device)
    comps.vae.to(device, torch.float32 if dtype == torch.float16 else dtype)


def make_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise DreamLoomError(
                f"use_8bit_adam is on but bitsandbytes cannot be imported ({err}).",
                "pip install bitsandbytes (CUDA only), or turn use_8bit_adam off.",
            ) from None
        return bnb.optim.AdamW8bit(groups, **kw)
    # The fused kernel (CPU and CUDA) does the whole update in one pass: measured 3x faster than the
    # per-tensor loop on the tiny model's 64 LoRA tensors.
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):  # older torch or a device without the fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kw)
