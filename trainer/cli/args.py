"""CLI flags for every TrainConfig field, and a TrainConfig from flags plus an optional TOML file."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path

from ..base_models.native import native_resolution
from ..config import TrainConfig

HELP = {
    "method": "lora (DreamBooth LoRA), ti (textual inversion) or full (DreamBooth full fine-tune: the whole UNet, "
    "one checkpoint file)",
    "base_model": "'tiny-fabric' (built-in, pretrained), 'tiny' or 'tiny-sdxl' (random weights), an SD1.5 or SDXL "
    ".safetensors checkpoint, or a diffusers folder",
    "instance_dir": "folder of 5-20 instance images (.jpg/.jpeg/.png/.webp/.bmp, any letter case; optional .txt "
    "captions)",
    "instance_prompt": "prompt for the instance images; must contain the token",
    "token": "the rare word that stands for the subject",
    "use_captions": "read a .txt caption beside each image; '{token}' in it becomes the token, and a caption "
    "without the token gets it in front",
    "caption_shuffle": "shuffle a caption's comma-separated tags at every showing, after the first caption_keep_tokens",
    "caption_dropout": "probability (0-0.99) that a step's prompt is empty, which trains the unconditional case",
    "class_dir": "folder for class images (default: a cache folder keyed by the settings)",
    "concepts": "several subjects in one run: best as [[concepts]] tables in a --config TOML file (keys: name, "
    "instance_dir, instance_prompt, token, class_prompt, class_dir, num_class_images, repeats, prior_loss_weight), or "
    "a JSON list of objects",
    "resolution": "training size: the square's side, and with aspect buckets the area (resolution² pixels) each keeps",
    "center_crop": "centred crop (false: random each step, latents encoded every step); with buckets only the few "
    "pixels that fit an image to its bucket, without them the square crop",
    "aspect_buckets": "images keep their shape, each at the bucket (width x height, about resolution² pixels) "
    "nearest its aspect ratio; false: centre-cropped squares",
    "bucket_step": "bucket sides are multiples of this (a multiple of 8); 0: an eighth of the resolution, at most 64 "
    "(64 for SD1.5 and SDXL, 16 for tiny-fabric)",
    "max_aspect": "longest / shortest side of a bucket; wider images are cropped to it",
    "masked_loss": "weight the loss by <name>_mask.png beside each image (white = learn, black = ignore)",
    "mask_from_alpha": "with masked_loss: an image without a mask file uses its alpha channel",
    "unmasked_weight": "the loss weight where a mask is black (0-1)",
    "alpha": "LoRA alpha; the LoRA scale is alpha/rank and is stored in the file",
    "max_train_steps": "number of optimizer updates",
    "sample_every": "make a sample grid every N steps, and at the start and the end (0: no samples at all)",
    "checkpoint_every": "write a resumable checkpoint every N steps (0: only at the end)",
    "snr_gamma": "min-SNR gamma loss weighting (0 = off, 5 is typical)",
    "prediction_type": "what the UNet predicts: auto (what the checkpoint declares, as ComfyUI's v_pred key; else "
    "epsilon), epsilon or v_prediction (for a v-prediction fine-tune whose file does not say so)",
    "sample_prompts": "one sample prompt; give several in a TOML file's list",
    "mixed_precision": "auto (bf16 on Ampere and newer GPUs, else fp16; no on a CPU), no, fp16 (CUDA) or bf16",
    "gradient_checkpointing": "true, false or auto (on when the training steps would not fit the GPU's free memory "
    "without it, as `doctor` predicts)",
    "half_frozen_convs": "fp32 training: keep frozen conv weights in the checkpoint's fp16/bf16 and widen each at its "
    "call; the same numbers, about 1.1 GiB less for SD1.5, steps 1.13x as long at 128 px on a CPU. true, false or auto "
    "(on for fp32 training on a CPU)",
    "cudnn_benchmark": "CUDA only: let cuDNN time its convolution algorithms for each new image size and keep the "
    "fastest (1.47x the step speed of diffusers' example at 512 px fp16 on an H100 against 1.18x without; its search "
    "briefly takes as much free GPU memory as it finds, handed back after the first step of each size)",
    "validation_images": "instance images held out of training and measured every validation_every steps at fixed "
    "noise and timesteps (loss.csv/png column validation_loss; a rising curve means overfitting)",
    "validation_dir": "a folder of held-out images of the subject, measured like validation_images",
    "learning_rate": "default: the method's (LoRA 1e-4, TI 5e-4, full 5e-6: the DreamBooth paper's)",
    "train_text_encoder": "LoRA: adapters on the text encoder(s) too; full: fine-tune the text encoder(s) too",
    "text_encoder_lr": "the text encoder's learning rate; default LoRA 5e-5, full 1e-6 (the Colab's)",
    "checkpoints_keep": "resumable checkpoints kept; default 2, full 1 (each holds the UNet and its optimizer state)",
    "use_8bit_adam": "8-bit AdamW (bitsandbytes, CUDA): 6 bytes less per trained weight; what fits a full SD1.5 "
    "fine-tune in about 10 GB",
    "use_ema": "full: export an exponential moving average of the weights (decay ema_decay)",
    "export_precision": "full: the checkpoint file's dtype, fp16 (half the size), bf16 or fp32",
    "export_diffusers": "full: also write the model as a diffusers folder (result/diffusers)",
}


# Defaults the CLI sets itself (_config_from_args), not TrainConfig's
CLI_DEFAULTS = {
    "base_model": "'tiny-fabric'",
    "resolution": "the base model's native size: tiny-fabric 128, tiny 64, SD1.5 512, SDXL 1024",
    "sample_prompts": "the method's three",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training settings (also accepted in a TOML file via --config)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{HELP.get(f.name, '')} (default: {CLI_DEFAULTS.get(f.name, repr(default))})".strip()
        metavar = "PROMPT" if f.name == "sample_prompts" else str(f.type).upper().replace("LIST[STR]", "A,B")
        group.add_argument(flag, dest=f.name, default=None, metavar=metavar, help=help_text)


def _toml_keys(path) -> set[str]:
    import tomllib

    raw = tomllib.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    return set(raw["train"] if set(raw) == {"train"} and isinstance(raw["train"], dict) else raw)


def _config_from_args(args) -> TrainConfig:
    data = {}
    if getattr(args, "config", None):
        from_file = TrainConfig.from_toml(args.config).to_dict()  # validated; keep only the keys the file sets
        data.update({k: from_file[k] for k in _toml_keys(args.config)})
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    # The CLI's base model is the pretrained tiny-fabric unless told otherwise; a model trains at its native size
    # (built-in 64/128, SD1.5 512, SDXL 1024) unless a resolution is given.
    data.setdefault("base_model", "tiny-fabric")
    if "resolution" not in data:
        data["resolution"] = native_resolution(data["base_model"])
    return TrainConfig.from_dict(data)


# --------------------------------------------------------------------------- checks before heavy imports
# They read only the file system, the settings and safetensors headers, so a wrong path, file or setting is
# reported in a fraction of a second, before torch and diffusers are imported (5-15 s), and before anything
# is written.
