"""Device, precision and optimizer set-up for a training run."""

from __future__ import annotations

import datetime

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from ..errors import DreamLoomError
from ..inference.gpu_memory import free_cuda_bytes
from .half_convs import keep_frozen_convs_half
from .memory import GIB, checkpointing_for

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def has_accelerator() -> bool:
    """A CUDA (or Apple MPS) device is present."""
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def best_device() -> torch.device:
    """Where inference runs when the user names no device: CUDA if present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(device) -> torch.dtype | None:
    """The dtype pipelines run in on `device`: fp16/bf16 on a GPU (half the memory; `auto` training's choice),
    None (the models' fp32) on a CPU. Load the model in it too: its weights come out as loading in fp32 and casting
    would make them, without the fp32 copy in host memory (SD1.5 from a 2.1 GB fp16 file peaks at 6.7 GB RSS
    loaded in fp32, 0.4 GB in fp16; SDXL's 6.9 GB file would need about 21 GB)."""
    return WEIGHT_DTYPES.get(resolve_mixed_precision("auto", torch.device(device).type)[0])


def inference_placement() -> tuple[torch.device, torch.dtype | None]:
    """(device, dtype) for inference when the user names neither: the best device and its inference_dtype."""
    device = best_device()
    return device, inference_dtype(device)


def to_inference_device(pipe) -> torch.device:
    """Move a pipeline to the best device, in fp16/bf16 on a GPU (half the memory); returns the device."""
    device, dtype = inference_placement()
    pipe.to(device, dtype) if dtype is not None else pipe.to(device)
    return device


def resolve_mixed_precision(requested: str, device_type: str) -> tuple[str, str]:
    """(precision, why): `auto` is bf16 on a GPU that has it, fp16 on other CUDA GPUs, and no on a CPU."""
    if requested != "auto":
        return requested, "set"
    if device_type != "cuda":
        return "no", "auto: fp32 on the CPU"
    if gpu_has_bf16():
        return "bf16", "auto: the GPU supports bf16"
    return "fp16", "auto: the GPU has no bf16 (compute capability under 8.0)"


def gpu_has_bf16(device=None) -> bool:
    """The CUDA GPU computes in bf16 natively: Ampere (compute capability 8.0) and newer. torch's is_bf16_supported()
    also says yes on older cards, where bf16 is emulated: much slower than fp16, and cuDNN has no bf16 convolutions
    there ("unable to find an engine")."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_gradient_checkpointing(
    requested: bool | None, device, run: dict | None = None, free_gib: float | None = None
) -> tuple[bool, str]:
    """(on, why): None (auto) is off on a CPU; on a CUDA GPU, on when the run's training steps would not fit its free
    memory (`free_gib`, else asked of the device) without it, as memory.checkpointing_for predicts from `run`
    (predict_memory's arguments). Checkpointing costs about a third more time per step, so runs that fit skip it."""
    if requested is not None:
        return requested, "set"
    if torch.device(device).type != "cuda":
        return False, "auto: off on the CPU, where memory is rarely the limit"
    if free_gib is None:
        free_gib = free_cuda_bytes(device) / GIB
    return checkpointing_for(free_gib, run)


def enable_tf32(device) -> bool:
    """TF32 matrix maths on Ampere and newer GPUs (fp32 parts of the step run on tensor cores); True if on."""
    if torch.device(device).type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


class CudnnBenchmark:
    """cuDNN's algorithm search (`cudnn_benchmark`): the first convolution of each input shape times the candidate
    algorithms and keeps the fastest. Off unless asked for: on an H100 it took a step from 0.199 to 0.155 s (SD1.5,
    512 px, fp16) but its search allocated up to 68 GB for a moment (cuDNN tries workspaces as large as the free
    memory). What the search left in PyTorch's cache is handed back after the first step at each new latent shape,
    so the run holds only what its chosen algorithms use; the flag is put back as it was at the end of the run."""

    def __init__(self, requested: bool, device):
        self.on = bool(requested) and torch.device(device).type == "cuda"
        self.why = "set" if self.on else ("asked for, but cuDNN runs only on CUDA" if requested else "default")
        self.shapes_seen: set[tuple] = set()
        self.previous = torch.backends.cudnn.benchmark
        if self.on:
            torch.backends.cudnn.benchmark = True

    def after_step(self, shape: tuple) -> None:
        """Call after a training step on latents of `shape`: a shape seen for the first time was searched just now."""
        if self.on and shape not in self.shapes_seen:
            self.shapes_seen.add(shape)
            torch.cuda.empty_cache()

    def restore(self) -> None:
        torch.backends.cudnn.benchmark = self.previous


def make_accelerator(mixed_precision: str, gradient_accumulation_steps: int, project_dir) -> Accelerator:
    # accelerate keeps a process-wide singleton; a second run in the same process (tests, API callers) may
    # use another precision. The distributed part (PartialState) is kept.
    AcceleratorState._reset_state()
    # Class images are made by the main process while the others wait at a barrier; NCCL's default 10-minute
    # timeout would end a multi-GPU run that makes 100 class images on a slow card.
    process_group = InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2))
    return Accelerator(
        kwargs_handlers=[process_group],
        cpu=not has_accelerator(),  # without cpu=True accelerate never forms a CPU (gloo) group under torchrun
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(project_dir)),
    )


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of frozen weights: the mixed-precision dtype, else fp32."""
    return WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)


def place_modules(comps, device, dtype: torch.dtype, unet: bool = True) -> None:
    """Frozen weights in `dtype` on `device`; trainable parameters moved as they are, in fp32 (master weights).
    `unet=False` leaves the UNet where it is (the trainer places it after the latent cache is built, so the VAE's
    activations at SDXL's 1024 px never share the GPU with the UNet's weights).

    diffusers' cast_training_params would upcast trainables after a whole-module cast, but cannot undo the
    rounding that cast did to their initial values (tests/test_training.py checks they stay exact). The VAE
    encodes in fp32 under fp16, where its activations overflow.
    """
    for module in ((comps.unet,) if unet else ()) + tuple(comps.text_encoders().values()):
        place_trainable_module(module, device, dtype)
    comps.vae.to(device, torch.float32 if dtype == torch.float16 else dtype)


def place_trainable_module(module, device, dtype: torch.dtype, half_frozen_convs: bool = False) -> int:
    """A UNet or text encoder as place_modules places it. On a GPU in fp16/bf16, its peft LoRA layers also stop
    casting their input to the fp32 of the LoRA weights: the step runs under autocast, which casts it straight
    back to fp16/bf16 for the matrix product, so the values are the same, less two copies forward and two back
    per layer (on a step bound by kernel launches, each costs). `half_frozen_convs` (fp32 only): frozen conv
    weights stored in fp16/bf16 stay so and are widened at each call (half_convs.py). Returns how many weights
    were kept 16-bit."""
    kept = keep_frozen_convs_half(module, device) if half_frozen_convs and dtype == torch.float32 else []
    kept_ids = {id(param) for param in kept}
    for param in module.parameters():
        if id(param) in kept_ids:
            continue
        param.data = param.data.to(device, torch.float32 if param.requires_grad else dtype)
    for buffer in module.buffers():
        buffer.data = buffer.data.to(device)
    if torch.device(device).type == "cuda" and dtype != torch.float32:
        skip_lora_input_casts(module)
    return sum(param.numel() for param in kept)


def skip_lora_input_casts(module: torch.nn.Module) -> int:
    """Turn off peft's cast of a LoRA layer's input to the LoRA weights' dtype in every layer of `module`
    (only right under autocast, which casts the input to the matrix product's dtype itself); how many layers."""
    layers = [m for m in module.modules() if hasattr(m, "cast_input_dtype_enabled")]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def enable_checkpointing(comps, text_encoder_too: bool) -> None:
    """Gradient checkpointing on the UNet, and on every text encoder when they train (SDXL: both; transformers 5
    renamed the switch activation_checkpointing_enable; older versions only have gradient_checkpointing_enable)."""
    comps.unet.enable_gradient_checkpointing()
    for te in comps.text_encoders().values() if text_encoder_too else ():
        enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
        enable()


def make_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kw)
        except Exception as err:  # not installed, or a build that does not match the CUDA or the OS it finds
            raise DreamLoomError(
                f"use_8bit_adam is on but bitsandbytes does not work here ({type(err).__name__}: {err}).",
                "pip install -U bitsandbytes (CUDA only; on Windows version 0.43 or newer), or turn use_8bit_adam off "
                "(for a LoRA it saves almost nothing).",
            ) from None
    # The fused kernel (CPU and CUDA) does the whole update in one pass: measured 3x faster than the
    # per-tensor loop on the tiny model's 64 LoRA tensors.
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):  # older torch or a device without the fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kw)
