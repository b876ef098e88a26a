"""Training Settings: the advanced options shared by Train DreamBooth LoRA and Train Textual Inversion."""

from __future__ import annotations

from .widgets import bool_widget, choice_widget, float_widget, int_widget

CATEGORY = "DreamLoom/training"
# gradient_checkpointing's choices and what TrainConfig takes for each (None: decided by the GPU's free memory)
CHECKPOINTING = {"auto": None, "on": True, "off": False}


class TrainingSettings:
    DESCRIPTION = (
        "Advanced training options. Connect to the settings input of a training node; unconnected, the defaults apply."
    )
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("DL_TRAIN_SETTINGS",)
    RETURN_NAMES = ("settings",)
    OUTPUT_TOOLTIPS = ("Advanced settings for Train DreamBooth LoRA or Train Textual Inversion.",)

    @classmethod
    def INPUT_TYPES(cls):
        # imported here, not at the top: the pack's import stays a few milliseconds (trainer.config is the largest)
        from ..trainer.config import LR_SCHEDULERS, MIXED_PRECISION, SAMPLERS, TI_TEMPLATES, TrainConfig

        d = TrainConfig().validate()  # the defaults resolved (text_encoder_lr: LoRA 5e-5)
        required = {
            "lr_scheduler": choice_widget(LR_SCHEDULERS, d.lr_scheduler, "Learning-rate schedule."),
            "lr_warmup_steps": int_widget(d.lr_warmup_steps, 0, 100000, "Steps of linear warm-up."),
            "train_batch_size": int_widget(
                d.train_batch_size, 1, 64, "Instance images per step (prior preservation adds as many class images)."
            ),
            "gradient_accumulation_steps": int_widget(
                d.gradient_accumulation_steps,
                1,
                1024,
                "Micro-batches per optimizer step. Steps count optimizer updates.",
            ),
            "max_grad_norm": float_widget(d.max_grad_norm, 0.0, 100.0, 0.1, "Gradient clipping (0 = off)."),
            "snr_gamma": float_widget(
                d.snr_gamma, 0.0, 100.0, 0.5, "Min-SNR loss weighting gamma (0 = off, 5 is typical)."
            ),
            "noise_offset": float_widget(
                d.noise_offset, 0.0, 1.0, 0.01, "Noise offset (0.05-0.1 helps very dark or bright images)."
            ),
            "mixed_precision": choice_widget(
                MIXED_PRECISION,
                "auto",
                "auto: bf16 on Ampere and newer GPUs (RTX 30xx+), else fp16; 'no' (fp32) on the CPU. fp16 on the CPU "
                "falls back to 'no'.",
            ),
            "gradient_checkpointing": choice_widget(
                CHECKPOINTING,
                "auto",
                "Trade speed for less VRAM (SD1.5 LoRA at 512 px: 3.9 -> 3.0 GiB). auto: on when the training "
                "steps would not fit the GPU's free memory without it (as `doctor` predicts), off on the CPU.",
            ),
            "use_8bit_adam": bool_widget(
                False, "8-bit AdamW (bitsandbytes, CUDA only): less VRAM for optimizer state."
            ),
            "train_text_encoder": bool_widget(False, "LoRA: also train a LoRA on the text encoder."),
            "text_encoder_lr": float_widget(
                d.text_encoder_lr, 1e-7, 1.0, 1e-6, "Learning rate of the text-encoder LoRA.", round=False
            ),
            "checkpoint_every": int_widget(
                d.checkpoint_every, 0, 100000, "Write a resumable checkpoint every N steps (0 = only at the end)."
            ),
            "sample_steps": int_widget(d.sample_steps, 1, 200, "Sampling steps for the preview samples."),
            "sample_guidance": float_widget(d.sample_guidance, 0.0, 30.0, 0.1, "CFG for the preview samples."),
            "class_sampler": choice_widget(
                SAMPLERS, d.class_sampler, "Sampler for class images made by the training node itself."
            ),
            "class_steps": int_widget(
                d.class_steps, 1, 200, "Steps for class images made by the training node itself."
            ),
            "num_vectors": int_widget(
                d.num_vectors, 1, 16, "TI: vectors per token (more = more capacity, bigger file)."
            ),
            "ti_templates": choice_widget(
                TI_TEMPLATES, d.ti_templates, "TI: style templates, object templates, or the per-image captions."
            ),
            "clamp_norm": bool_widget(False, "TI: keep each learned vector's norm at or below the initializer's."),
            # new options go last: saved workflows map widget values by position
            "caption_shuffle": bool_widget(
                False,
                "Shuffle each caption's comma-separated tags at every showing, after the first caption_keep_tokens.",
            ),
            "caption_keep_tokens": int_widget(
                d.caption_keep_tokens, 0, 1000, "Tags at the front that shuffling leaves in place (the token's, first)."
            ),
            "caption_dropout": float_widget(
                d.caption_dropout, 0.0, 0.99, 0.01, "Probability of an empty prompt for a step (0.05-0.1 is typical)."
            ),
            "validation_images": int_widget(
                d.validation_images,
                0,
                1000,
                "Instance images held out of training; their loss at fixed noise is plotted every validation_every "
                "steps (green in the loss plot). A curve that rises again means overfitting: stop earlier.",
            ),
            "validation_every": int_widget(d.validation_every, 1, 100000, "Steps between validation measurements."),
        }
        return {"required": required}

    @classmethod
    def VALIDATE_INPUTS(cls, gradient_checkpointing):
        # Named here, so ComfyUI leaves its own list check to us: workflows saved when this was a boolean
        # widget hold True/False, which still mean on/off.
        if gradient_checkpointing in CHECKPOINTING or isinstance(gradient_checkpointing, bool):
            return True
        return f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)}, not {gradient_checkpointing!r}."

    def build(self, **kwargs):
        checkpointing = kwargs.get("gradient_checkpointing", "auto")
        if not isinstance(checkpointing, bool):
            kwargs["gradient_checkpointing"] = CHECKPOINTING[checkpointing]
        return (dict(kwargs),)
