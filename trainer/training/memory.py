"""How much GPU memory a training run of an SD1.5 or SDXL model takes, predicted from its settings without
loading a model: what `auto` gradient checkpointing decides by, and what `python -m trainer doctor` reports.

The memory prediction is a small model of an SD1.5-family run, calibrated to these runs, measured by
tests/test_cuda.py on an H100 with torch 2.11 (SD1.5 at 512 px, LoRA rank 4, batch 1 instance + 1 prior image
= 2 UNet rows; the peak of `torch.cuda.max_memory_allocated()` over the whole run, sample grids included):

    LoRA fp16                              3.87 GiB    LoRA bf16 + checkpointing            2.95 GiB
    LoRA fp16 + checkpointing              3.11 GiB    LoRA + text-encoder LoRA, fp16 + ckpt 3.11 GiB
    LoRA bf16                              3.87 GiB    TI fp16 + checkpointing (1 row)       3.10 GiB
    class images, 4 at a time, fp16        2.67 GiB

It is approximate: expect +-25% away from those settings (other GPUs, torch versions and attention kernels
differ). A run goes through phases and its peak is the largest of them:

    training      = UNet weights + trainable state + rows x A x p          (+ text encoder, when it is on the GPU)
    samples       = UNet + VAE weights + trainable state + max(text encoder, S x p)
    class images  = UNet + VAE weights + max(text encoder, C x p)           (LoRA with prior preservation)

The max: a frozen text encoder is on the GPU only while it encodes the prompts, and waits on the CPU while the UNet
and the VAE run (inference/pipelines.py). A text encoder that trains stays, so it adds to S x p. The runs below
were measured before that change, with every text encoder on the GPU throughout (text encoder + S x p); the
constants are fitted to them that way (`text_encoders_leave=False`), and what the change saves is predicted.

where p = (resolution / 512)^2 (activations grow with the pixel count), rows = batch size x 2 with prior
preservation (LoRA's default) and x 1 without (TI), weights are counted as parameters x bytes: frozen weights in
the training dtype (fp32 when mixed_precision is no), the VAE in fp32 under fp16 (place_modules), and trainable
parameters as 16 bytes each (fp32 weight, gradient and AdamW's two moments). During training the VAE (latents
cached) and a frozen, cached text encoder wait on the CPU, so they count only in the sampling phases.

Fitted constants (GiB at 512 px, fp16/bf16):
    A = 1.13 per UNet row without checkpointing: (3.87 - 1.60 UNet - 0.01 LoRA state) / 2; bf16 measured the same.
    A = 0.29 per UNet row with checkpointing. The measured checkpointed runs peak while sampling, so they only
        bound it (<= 0.6); 0.29 is A x 0.26, the ratio of saved activations with and without checkpointing in a
        FakeTensor trace of the SD1.5 UNet with rank-4 LoRA under bf16 autocast (torch 2.13, diffusers 0.42).
    T = 0.03 per row for a text encoder that trains (TI, text-encoder LoRA): 77 tokens, so no p; from the same kind
        of trace (about 0.025), too small to show in the measured peaks.
    S = 0.95 for the sample grid (4 prompts with CFG, one batch, decoded one image at a time): the mean of the four
        checkpointed runs after their weights (0.96, 0.95, 0.95, 0.96).
    C = 0.68 for class images (4 at a time with CFG, all modules in fp16): 2.67 - 1.99 weights.
fp32 (mixed_precision no) is extrapolated, not measured: weights x2 and activations x2.

The full fine-tune (method full) uses the same activations (the UNet saves the same inputs of its layers for the
weight gradients as a LoRA's backward needs for the input gradients) and counts every trained weight as fp32 master
weight 4 B + gradient 4 B + AdamW's moments 8 B (bitsandbytes' 8-bit AdamW: 2 B) + EMA 4 B when on + the fp16/bf16
copy autocast keeps of each fp32 weight during a step (2 B, not under fp32); the samples phase has no gradients
(they are freed after each step). Predicted, not measured (no GPU run yet): SD1.5, fp16, gradient checkpointing,
8-bit AdamW, batch 1 + 1 prior comes to about 10.2 GiB, in line with the ~10 GB the DreamBooth Colab reports on a T4
for the same settings.

SDXL uses the same model with its own sizes (p = (resolution / 1024)^2; two text encoders; UNet 2.57 B parameters,
rank-4 LoRA 5.8 M), fitted to tests/test_cuda_sdxl.py on the same H100 (1024 px, batch 1 + 1 prior, checkpointing):
training 6.36 GiB in bf16 and in fp16, so A = (6.36 - 4.78 UNet - 0.09 LoRA state) / 2 = 0.75 per row; a whole run
with 2 class images (batch 2) and 2 sample grids 8.45 GiB bf16 / 8.61 fp16, so S = C = 1.98 after the weights (both
precisions give the same). Without checkpointing SDXL was not measured: A = 0.75 x 3.9, SD1.5's ratio (predicted).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class FamilySize:
    """What the memory model needs of a model family: parameter counts, its native size, fitted activations."""

    name: str
    resolution: int  # p = (resolution / this)^2
    unet: float
    text_encoders: float  # all of them
    vae: float
    lora_unet: int  # DreamLoom's rank-4 LoRA: to_q/k/v/out.0 on the UNet
    lora_text: int  # q/k/v/out_proj on every text encoder
    ti_row: int  # one TI vector in every text encoder
    row_gib: dict  # per UNet row at `resolution`, without / with gradient checkpointing
    text_row_gib: float  # per row, when the text encoders train
    samples_gib: float  # the sample grid
    class_images_gib: float  # class images, 4 at a time (SDXL: 2 measured) with CFG
    measured: bool = True  # False: extrapolated
    conv_weights: float = 0.0  # the UNet's Conv2d weights (half_frozen_convs keeps them 16-bit under fp32)


# Fitted activation constants, GiB at the family's native size in fp16/bf16 (see the module docstring).
SD15_SIZE = FamilySize(
    "SD1.5",
    512,
    859.5e6,
    123.1e6,
    83.7e6,
    797_184,
    294_912,
    768,
    {False: 1.13, True: 0.29},
    0.03,
    0.95,
    0.68,
    conv_weights=589.0e6,
)
SDXL_SIZE = FamilySize(
    "SDXL",
    1024,
    2567.5e6,
    817.7e6,
    83.7e6,
    5_806_080,
    1_581_056,  # CLIP-L without its last layer, which SDXL never uses
    2048,
    {False: 2.9, True: 0.75},
    0.16,
    1.98,
    1.98,
    conv_weights=333.2e6,
)
FAMILY_SIZES = {"SD1.5": SD15_SIZE, "SDXL": SDXL_SIZE}
TRAINABLE_BYTES = 16  # fp32 weight + gradient + AdamW's two moments
# A full fine-tune's bytes per trained weight besides weight and gradient: AdamW's moments (8-bit: 2 B), EMA
FULL_OPTIMIZER_BYTES = {False: 8, True: 2}
EMA_BYTES = 4
AUTOCAST_COPY_BYTES = 2  # autocast's fp16/bf16 copy of each fp32 weight, held while a step (or a sample) runs
FP32_ACTIVATIONS = 2.0  # extrapolated
ERROR = 0.25  # the model's stated accuracy
CONTEXT_GIB = 0.75  # the CUDA context and PyTorch's cache on top of the allocated peak (README: 0.5-1 GB)


@dataclass(frozen=True)
class Prediction:
    """Predicted peak allocated GPU memory (GiB) of each phase of a run; `peak` is the largest."""

    training: float
    samples: float
    class_images: float | None  # None: no class images are generated (TI, or no prior preservation)

    @property
    def peak(self) -> float:
        return max(self.training, self.samples, self.class_images or 0.0)


def predict_memory(
    method: str = "lora",
    resolution: int | None = None,
    batch_size: int = 1,
    train_text_encoder: bool = False,
    precision: str = "fp16",
    checkpointing: bool = False,
    prior: bool | None = None,
    family: str = "SD1.5",
    use_8bit_adam: bool = False,
    use_ema: bool = False,
    text_encoders_leave: bool = True,
) -> Prediction:
    """The predicted peak of a run of an SD1.5 or SDXL model on a CUDA GPU (GiB), phase by phase; see the module
    docstring. `precision` is fp16, bf16 or no (fp32); `prior` defaults to the method's default (LoRA on, TI off);
    `resolution` to the family's native size. `use_8bit_adam` and `use_ema` change the full fine-tune only (a
    LoRA's optimizer state is a few MB). `text_encoders_leave=False` predicts the code the constants were measured
    on, whose frozen text encoders stayed on the GPU while the UNet sampled."""
    size = FAMILY_SIZES[family]
    if prior is None:
        prior = method in ("lora", "full")
    prior = prior and method in ("lora", "full")
    weight_bytes = 4 if precision == "no" else 2
    act = FP32_ACTIVATIONS if precision == "no" else 1.0
    p = ((resolution or size.resolution) / size.resolution) ** 2
    rows = batch_size * (2 if prior else 1)
    unet = size.unet * weight_bytes / GIB
    text = size.text_encoders * weight_bytes / GIB
    vae_train = size.vae * (4 if precision == "fp16" else weight_bytes) / GIB  # fp16's VAE stays fp32
    vae_class = size.vae * weight_bytes / GIB  # class images run every module in the training dtype
    text_trains = method == "ti" or train_text_encoder
    if method == "full":
        return _predict_full(
            size, precision, p, rows, checkpointing, text_trains, use_8bit_adam, use_ema, prior, text_encoders_leave
        )
    if method == "ti":
        trainable = size.ti_row
    else:
        trainable = size.lora_unet + (size.lora_text if train_text_encoder else 0)
    state = trainable * TRAINABLE_BYTES / GIB
    training = unet + state + rows * size.row_gib[checkpointing] * p * act
    if text_trains:  # not cached, so they stay on the GPU and keep activations for their backward pass
        training += text + rows * size.text_row_gib * act
    sampling, making_class_images = size.samples_gib * p * act, size.class_images_gib * p * act
    samples = unet + vae_train + state + _beside(text, sampling, text_encoders_leave and not text_trains)
    class_images = unet + vae_class + _beside(text, making_class_images, text_encoders_leave) if prior else None
    return Prediction(training, samples, class_images)


def _beside(text: float, activations: float, text_leaves: bool) -> float:
    """What the text encoders and a pipeline's activations hold at their peak: the larger of the two when the
    text encoders wait on the CPU while the UNet runs, else both."""
    return max(text, activations) if text_leaves else text + activations


def _predict_full(
    size, precision, p, rows, checkpointing, text_trains, use_8bit_adam, use_ema, prior, text_encoders_leave
) -> Prediction:
    """predict_memory for the full fine-tune: every trained weight in fp32 with its gradient, optimizer state,
    EMA and autocast copy (see the module docstring)."""
    weight_bytes = 4 if precision == "no" else 2
    act = FP32_ACTIVATIONS if precision == "no" else 1.0
    trained = size.unet + (size.text_encoders if text_trains else 0.0)
    kept = 4 + FULL_OPTIMIZER_BYTES[use_8bit_adam] + (EMA_BYTES if use_ema else 0)  # between steps too
    copy = 0 if precision == "no" else AUTOCAST_COPY_BYTES
    frozen_text = 0.0 if text_trains else size.text_encoders * weight_bytes / GIB
    vae = size.vae * (4 if precision == "fp16" else weight_bytes) / GIB
    training = trained * (kept + 4 + copy) / GIB + rows * size.row_gib[checkpointing] * p * act
    if text_trains:
        training += rows * size.text_row_gib * act
    sampling = size.samples_gib * p * act
    samples = trained * (kept + copy) / GIB + vae + _beside(frozen_text, sampling, text_encoders_leave)
    class_images = None
    if prior:  # made before training starts, with every module in the training dtype
        text = size.text_encoders * weight_bytes / GIB
        activations = size.class_images_gib * p * act
        class_images = (size.unet + size.vae) * weight_bytes / GIB + _beside(text, activations, text_encoders_leave)
    return Prediction(training, samples, class_images)


def checkpointing_for(free_gib: float, run: dict | None) -> tuple[bool, str]:
    """(on, why) for `auto` gradient checkpointing on a CUDA GPU with `free_gib` free: on when the training steps
    without it would not fit with the model's error margin and the CUDA context. `run` holds predict_memory's
    arguments (precision, method, resolution, batch size, ...); None for a model the memory model does not cover
    (the built-in tiny ones, which need well under 1 GB)."""
    if run is None or run.get("family") not in FAMILY_SIZES:
        return False, "auto: a built-in model needs well under 1 GB"
    need = predict_memory(**{**run, "checkpointing": False}).training * (1 + ERROR) + CONTEXT_GIB
    on = need > free_gib
    return on, (
        f"auto: the steps need about {need:.1f} GiB without it (predicted, with the {ERROR:.0%} margin and the CUDA "
        f"context); {free_gib:.1f} GiB free"
    )


def phase_warnings(
    free_gib: float, run: dict | None, checkpointing: bool, sample_grids: bool, class_images: bool
) -> list[str]:
    """Warnings, before anything runs, for the phases of a run on a CUDA GPU with `free_gib` free that its
    predicted peak (without the error margin, plus the CUDA context) does not fit, each with what avoids it. The
    training steps fit or not as `auto` checkpointing decided; the sample grids and the class images (`class_images`:
    the run may have to make them) can still run out of memory where the steps fit (SDXL at 1024 px on an 8 GB
    card). None for an unmodelled model."""
    if run is None or run.get("family") not in FAMILY_SIZES:
        return []
    pred = predict_memory(**{**run, "checkpointing": checkpointing})

    def need(phase: str, gib: float) -> str:
        return (
            f"{phase} about {gib + CONTEXT_GIB:.1f} GiB (predicted, +-{ERROR:.0%}, the CUDA context included) and the "
            f"GPU has {free_gib:.1f} GiB free"
        )

    notes = []
    if pred.training + CONTEXT_GIB > free_gib:
        notes.append(
            need("the training steps need", pred.training)
            + (": lower the resolution or the batch size" if checkpointing else ": turn gradient_checkpointing on")
            + ", or close other programs on the GPU"
        )
    if sample_grids and pred.samples + CONTEXT_GIB > free_gib:
        notes.append(
            need("the sample grids need", pred.samples)
            + ": set sample_every 0 to train without them, or close other programs on the GPU"
        )
    if class_images and pred.class_images is not None and pred.class_images + CONTEXT_GIB > free_gib:
        notes.append(
            need("making class images needs", pred.class_images)
            + ": where they are not made yet, give a folder of class images as class_dir (photos of the class, or "
            "pictures of the class prompt that ComfyUI's own sampler made with this model)"
        )
    return notes
