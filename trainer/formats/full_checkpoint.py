"""A full fine-tune's result: one single-file checkpoint that ComfyUI's Load Checkpoint and A1111 load, and on
request a diffusers folder.

SD1.5 is written in the original (LDM) layout and SDXL in Stability's sgm layout (ldm_layout.py), both with the
base model's VAE and whatever text encoders did not train; ComfyUI's `v_pred` / `ztsnr` markers are kept for
v-prediction models. A fine-tune of a built-in model has toy widths ComfyUI's core loader cannot build, so it is
written in DreamLoom's built-in fine-tune format (base_models/builtin.py), which load_base_model and Load
Checkpoint (DreamLoom) read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..base_models.builtin import save_builtin_finetune
from ..files.atomic import give_usual_permissions
from .ldm_layout import write_ldm_checkpoint, write_sdxl_checkpoint

EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# modelspec.implementation: the code base whose layout the file has
IMPLEMENTATIONS = {
    "SD1.5": "https://github.com/CompVis/stable-diffusion",
    "SDXL": "https://github.com/Stability-AI/generative-models",
}


@contextlib.contextmanager
def export_weights(modules: dict, replacements: dict, dtype: torch.dtype) -> Iterator[None]:
    """While inside: every floating-point parameter and buffer of `modules` ({name: module}) on the CPU in `dtype`,
    with `replacements` ({"<module name>.<parameter name>": tensor}, e.g. EMA weights) in place of the trained
    values; afterwards the modules are exactly as before. The state dicts read inside are the file's tensors."""
    saved = []
    try:
        for name, module in modules.items():
            for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if not tensor.is_floating_point():
                    continue
                source = replacements.get(f"{name}.{key}", tensor.data)
                saved.append((tensor, tensor.data))
                tensor.data = source.detach().to("cpu", dtype)
        yield
    finally:
        for tensor, data in saved:
            tensor.data = data


def full_checkpoint_metadata(cfg, step: int, comps) -> dict[str, str]:
    """modelspec (what model browsers show) and ours: the base model's fingerprint, the token, the steps, the run."""
    prediction = comps.scheduler_config.get("prediction_type", "epsilon")
    res = cfg.resolution
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": comps.family.modelspec_architecture,
        "modelspec.implementation": IMPLEMENTATIONS.get(comps.family.name, ""),
        "modelspec.title": cfg.output_name,
        "modelspec.description": f"DreamLoom DreamBooth full fine-tune of {Path(comps.source).name}, token "
        f"{cfg.token!r}, {step} steps",
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "dreamloom.format": "full",
        "dreamloom.token": cfg.token,
        "dreamloom.base_model": comps.source,
        "dreamloom.base_fingerprint": comps.fingerprint,
        "dreamloom.steps": str(step),
        "dreamloom.ema": "true" if cfg.use_ema else "false",
        "dreamloom.precision": cfg.export_precision,
        "dreamloom.config": cfg.to_json(),
    }


def schedule_markers(scheduler_config: dict) -> dict:
    """ComfyUI's empty marker tensors for the noise schedule (what base_models/sd15.py reads back)."""
    extra = {}
    if scheduler_config.get("prediction_type") == "v_prediction":
        extra["v_pred"] = torch.tensor([])
        if scheduler_config.get("rescale_betas_zero_snr"):
            extra["ztsnr"] = torch.tensor([])
    return extra


def write_full_checkpoint(path, comps, metadata: dict[str, str]) -> Path:
    """comps' modules as they are now (inside export_weights: the export's weights) as one file, atomically."""
    path = Path(path)
    states = {name: module.state_dict() for name, module in comps.modules().items()}
    if comps.builtin:
        return save_builtin_finetune(path, comps.builtin, states, metadata)
    unet_config, vae_config = dict(comps.unet.config), dict(comps.vae.config)
    extra = schedule_markers(comps.scheduler_config)
    if "text_encoder_2" in states:
        write_sdxl_checkpoint(
            path,
            states["unet"],
            states["vae"],
            states["text_encoder"],
            states["text_encoder_2"],
            unet_config,
            vae_config,
            metadata,
            extra,
        )
    else:
        write_ldm_checkpoint(
            path, states["unet"], states["vae"], states["text_encoder"], unet_config, vae_config, metadata, extra
        )
    return path


def write_diffusers_folder(folder, comps, scheduler) -> Path:
    """comps (inside export_weights) as a diffusers pipeline folder, written beside and renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    pipe = comps.family.pipeline(comps, scheduler)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        give_usual_permissions(tmp)
        if folder.exists():  # an earlier export of the same run
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
