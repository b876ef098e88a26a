"""Train DreamBooth LoRA, Train Textual Inversion, and the advanced Training Settings node."""

from __future__ import annotations

from pathlib import Path

from ..trainer.config import LR_SCHEDULERS, MIXED_PRECISION, SAMPLERS, TI_TEMPLATES, TrainConfig
from ..trainer.errors import DreamLoomError
from . import comfy, runner

CATEGORY = "DreamLoom/training"
SEED_MAX = 2**63 - 1


class TrainingSettings:
    DESCRIPTION = "Advanced training options. Connect to the settings input of a training node; unconnected, the defaults apply."
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("DL_TRAIN_SETTINGS",)
    RETURN_NAMES = ("settings",)
    OUTPUT_TOOLTIPS = ("Advanced settings for Train DreamBooth LoRA or Train Textual Inversion.",)

    @classmethod
    def INPUT_TYPES(cls):
        d = TrainConfig()
        return {
            "required": {
                "lr_scheduler": (list(LR_SCHEDULERS), {"default": d.lr_scheduler, "tooltip": "Learning-rate schedule."}),
                "lr_warmup_steps": ("INT", {"default": d.lr_warmup_steps, "min": 0, "max": 100000, "tooltip": "Steps of linear warm-up."}),
                "train_batch_size": ("INT", {"default": d.train_batch_size, "min": 1, "max": 64, "tooltip": "Instance images per step (prior preservation adds as many class images)."}),
                "gradient_accumulation_steps": ("INT", {"default": d.gradient_accumulation_steps, "min": 1, "max": 1024, "tooltip": "Micro-batches per optimizer step. Steps count optimizer updates."}),
                "max_grad_norm": ("FLOAT", {"default": d.max_grad_norm, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Gradient clipping (0 = off)."}),
                "snr_gamma": ("FLOAT", {"default": d.snr_gamma, "min": 0.0, "max": 100.0, "step": 0.5, "tooltip": "Min-SNR loss weighting gamma (0 = off, 5 is typical)."}),
                "noise_offset": ("FLOAT", {"default": d.noise_offset, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Noise offset (0.05-0.1 helps very dark or bright images)."}),
                "mixed_precision": (list(MIXED_PRECISION), {"default": "fp16", "tooltip": "fp16 or bf16 on a GPU; 'no' on the CPU (fp16 on the CPU falls back to 'no')."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Trade speed for much less VRAM."}),
                "use_8bit_adam": ("BOOLEAN", {"default": False, "tooltip": "8-bit AdamW (bitsandbytes, CUDA only): less VRAM for optimizer state."}),
                "train_text_encoder": ("BOOLEAN", {"default": False, "tooltip": "LoRA: also train a LoRA on the text encoder."}),
                "text_encoder_lr": ("FLOAT", {"default": d.text_encoder_lr, "min": 1e-7, "max": 1.0, "step": 1e-6, "round": False, "tooltip": "Learning rate of the text-encoder LoRA."}),
                "checkpoint_every": ("INT", {"default": d.checkpoint_every, "min": 0, "max": 100000, "tooltip": "Write a resumable checkpoint every N steps (0 = only at the end)."}),
                "sample_steps": ("INT", {"default": d.sample_steps, "min": 1, "max": 200, "tooltip": "Sampling steps for the preview samples."}),
                "sample_guidance": ("FLOAT", {"default": d.sample_guidance, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "CFG for the preview samples."}),
                "class_sampler": (list(SAMPLERS), {"default": d.class_sampler, "tooltip": "Sampler for class images made by the training node itself."}),
                "class_steps": ("INT", {"default": d.class_steps, "min": 1, "max": 200, "tooltip": "Steps for class images made by the training node itself."}),
                "num_vectors": ("INT", {"default": d.num_vectors, "min": 1, "max": 16, "tooltip": "TI: vectors per token (more = more capacity, bigger file)."}),
                "ti_templates": (list(TI_TEMPLATES), {"default": d.ti_templates, "tooltip": "TI: style templates, object templates, or the per-image captions."}),
                "clamp_norm": ("BOOLEAN", {"default": False, "tooltip": "TI: keep each learned vector's norm at or below the initializer's."}),
            }
        }

    def build(self, **kwargs):
        return (dict(kwargs),)


def _common_inputs(method: str) -> dict:
    d = TrainConfig(method=method).validate()
    return {
        "ckpt_name": (runner.checkpoint_choices(), {"tooltip": "SD1.5 checkpoint to personalise (from models/checkpoints)."}),
        "instance_images": ("DL_DATASET", {"tooltip": "Your 5-20 images, from Load Training Images."}),
        "output_name": ("STRING", {"default": "sks_fabric" if method == "lora" else "sks_fabric_ti", "tooltip": "File name for the result (no folders). An existing different file is never overwritten: a _v2 suffix is added."}),
        "learning_rate": ("FLOAT", {"default": d.learning_rate, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False, "tooltip": "Learning rate (tutorial: LoRA 1e-4, TI 5e-4)."}),
        "max_train_steps": ("INT", {"default": 800 if method == "lora" else 1500, "min": 1, "max": 100000, "tooltip": "Optimizer steps."}),
        "seed": ("INT", {"default": 42, "min": 0, "max": SEED_MAX, "control_after_generate": True, "tooltip": "Seed for the whole run: same seed and inputs give the same result."}),
        "sample_every": ("INT", {"default": 100, "min": 0, "max": 100000, "tooltip": "Preview samples every N steps (also at the start and the end)."}),
    }


def _config(method: str, ckpt_name, dataset, settings, **fields) -> TrainConfig:
    base = runner.resolve_checkpoint(ckpt_name)
    if dataset is None:
        raise DreamLoomError("No training images connected.", "Connect Load Training Images to instance_images.")
    extra = dict(settings or {})
    data = dict(method=method, base_model=base, instance_dir=dataset.folder, resolution=dataset.resolution,
                center_crop=dataset.center_crop, random_flip=dataset.random_flip, use_captions=dataset.use_captions,
                checkpoint_every=100, **fields)
    data.update(extra)
    if data.get("mixed_precision") == "fp16" and not _cuda():
        data["mixed_precision"] = "no"  # stated in the settings tooltip
    return TrainConfig.from_dict(data).validate()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(cfg: TrainConfig, dataset, class_dataset, unique_id):
    from ..trainer.jobs import prepare_run_dir

    request = {"kind": "train", "config": cfg.to_dict(), "cache_root": comfy.dreamloom_directory(),
               "class_dir": class_dataset.folder if class_dataset is not None else None}
    fingerprints = {"model": runner.model_fingerprint(cfg.base_model), "data": dataset.fingerprint,
                    "class": class_dataset.fingerprint if class_dataset is not None else None}
    run_dir = prepare_run_dir(Path(comfy.dreamloom_directory()) / "runs", request, fingerprints, name_hint=cfg.output_name)
    return run_dir, runner.run_with_progress(run_dir, cfg.max_train_steps, unique_id)


def _read_back(path: str) -> None:
    """Success only after the file exists and reads back as safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            if not list(f.keys()):
                raise ValueError("no tensors")
    except Exception as err:  # noqa: BLE001
        raise DreamLoomError(f"The trained file {path} cannot be read back ({err}).", "Run the node again; the job resumes from its last checkpoint.") from err


def _stack_images(paths: list[str]):
    import numpy as np
    import torch
    from PIL import Image

    if not paths:
        return torch.zeros((1, 64, 64, 3))
    first = None
    arrays = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            first = first or im.size
            if im.size != first:
                im = im.resize(first)
            arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays))


def _ui_result(outputs: dict, result: tuple):
    previews = [p for p in outputs.get("samples", [])[-1:]] + [outputs["loss_plot"]]
    try:
        ui = {"images": runner.ui_images(previews)}
    except ValueError:  # run dir outside the output folder (custom setups): no UI preview
        ui = {}
    return {"ui": ui, "result": result}


class TrainDreamBoothLoRA:
    DESCRIPTION = ("DreamBooth LoRA training with prior preservation, in a separate worker process: live progress with sample "
                   "previews, cancel (a checkpoint is kept) and resume. Publishes a kohya-format LoRA into ComfyUI's loras folder.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("lora_name", "loss_plot", "samples")
    OUTPUT_TOOLTIPS = ("The LoRA's file name in the loras folder; connect it to Load DreamLoom LoRA.",
                       "Instance and prior loss per step.", "The sample grids made during training, oldest first.")

    @classmethod
    def INPUT_TYPES(cls):
        d = TrainConfig()
        common = _common_inputs("lora")
        return {
            "required": {
                **{k: common[k] for k in ("ckpt_name", "instance_images")},
                "instance_prompt": ("STRING", {"default": d.instance_prompt, "tooltip": "Prompt for your images; must contain the token."}),
                "token": ("STRING", {"default": d.token, "tooltip": "The rare word that will mean your subject (e.g. sks)."}),
                "class_prompt": ("STRING", {"default": d.class_prompt, "tooltip": "The same description without the token; used for prior preservation and drift samples."}),
                "prior_preservation": ("BOOLEAN", {"default": True, "tooltip": "Train on class images too, so the class keeps its meaning."}),
                "prior_loss_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": "Weight of the class-image loss."}),
                "num_class_images": ("INT", {"default": 100, "min": 1, "max": 10000, "tooltip": "Class images to generate when class_images is not connected."}),
                "rank": ("INT", {"default": d.rank, "min": 1, "max": 256, "tooltip": "LoRA rank (tutorial: 4)."}),
                "alpha": ("FLOAT", {"default": d.alpha, "min": 0.01, "max": 1024.0, "step": 0.5, "tooltip": "LoRA alpha; the LoRA is applied at scale alpha/rank, stored in the file."}),
                **{k: common[k] for k in ("learning_rate", "max_train_steps", "seed", "sample_every", "output_name")},
            },
            "optional": {
                "class_images": ("DL_DATASET", {"tooltip": "Class images from Generate Class Images (otherwise they are generated here)."}),
                "settings": ("DL_TRAIN_SETTINGS", {"tooltip": "Advanced options from DreamLoom Training Settings."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, ckpt_name, instance_images, instance_prompt, token, class_prompt, prior_preservation, prior_loss_weight,
              num_class_images, rank, alpha, learning_rate, max_train_steps, seed, sample_every, output_name,
              class_images=None, settings=None, unique_id=None):
        from ..trainer.fsutil import publish

        cfg = _config("lora", ckpt_name, instance_images, settings, instance_prompt=instance_prompt, token=token,
                      class_prompt=class_prompt, with_prior_preservation=bool(prior_preservation),
                      prior_loss_weight=float(prior_loss_weight),
                      num_class_images=int(class_images.count if class_images is not None else num_class_images),
                      rank=int(rank), alpha=float(alpha), learning_rate=float(learning_rate),
                      max_train_steps=int(max_train_steps), seed=int(seed), sample_every=int(sample_every),
                      output_name=output_name.strip())
        run_dir, outputs = _run(cfg, instance_images, class_images if prior_preservation else None, unique_id)
        _read_back(outputs["lora"])
        loras = comfy.folder_paths_for("loras")
        if not loras:
            raise DreamLoomError("ComfyUI has no loras folder configured.", "Check extra_model_paths.yaml.")
        published = publish(outputs["lora"], loras[0], cfg.output_name, ".safetensors")
        return _ui_result(outputs, (published.name, runner.image_to_tensor(outputs["loss_plot"]), _stack_images(outputs.get("samples", []))))


class TrainTextualInversion:
    DESCRIPTION = ("Textual Inversion: learns a new token's embedding (a file of a few KB), in a worker process with progress, "
                   "cancel and resume. Publishes into ComfyUI's embeddings folder; use it in prompts as embedding:<name>.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("embedding_name", "prompt_token", "loss_plot", "samples")
    OUTPUT_TOOLTIPS = ("The embedding's name in the embeddings folder.", "Text to put in prompts: embedding:<name>.",
                       "Loss per step.", "The sample grids made during training, oldest first.")

    @classmethod
    def INPUT_TYPES(cls):
        d = TrainConfig(method="ti")
        common = _common_inputs("ti")
        return {
            "required": {
                **{k: common[k] for k in ("ckpt_name", "instance_images")},
                "placeholder_token": ("STRING", {"default": d.placeholder_token, "tooltip": "A made-up token for training, e.g. <sks-fabric>. In ComfyUI prompts you then write embedding:<name>."}),
                "initializer_token": ("STRING", {"default": d.initializer_token, "tooltip": "One existing word the embedding starts from (e.g. pattern)."}),
                **{k: common[k] for k in ("learning_rate", "max_train_steps", "seed", "sample_every", "output_name")},
            },
            "optional": {
                "settings": ("DL_TRAIN_SETTINGS", {"tooltip": "Advanced options from DreamLoom Training Settings."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, ckpt_name, instance_images, placeholder_token, initializer_token, learning_rate, max_train_steps, seed,
              sample_every, output_name, settings=None, unique_id=None):
        from ..trainer.fsutil import publish

        cfg = _config("ti", ckpt_name, instance_images, settings, placeholder_token=placeholder_token.strip(),
                      initializer_token=initializer_token.strip(), learning_rate=float(learning_rate),
                      max_train_steps=int(max_train_steps), seed=int(seed), sample_every=int(sample_every),
                      with_prior_preservation=False, output_name=output_name.strip())
        run_dir, outputs = _run(cfg, instance_images, None, unique_id)
        _read_back(outputs["embedding"])
        folders = comfy.folder_paths_for("embeddings")
        if not folders:
            raise DreamLoomError("ComfyUI has no embeddings folder configured.", "Check extra_model_paths.yaml.")
        published = publish(outputs["embedding"], folders[0], cfg.output_name, ".safetensors")
        name = published.stem
        return _ui_result(outputs, (name, f"embedding:{name}", runner.image_to_tensor(outputs["loss_plot"]),
                                    _stack_images(outputs.get("samples", []))))
