"""LoRA files: kohya format for ComfyUI / A1111, and diffusers' pytorch_lora_weights.safetensors."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..base_models.components import text_model_path
from ..files.atomic import atomic_save
from .kohya_names import kohya_module_name

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def peft_key_to_module(key: str) -> tuple[str, str] | None:
    """'down_blocks.0...to_q.lora_A.weight' -> ('down_blocks.0...to_q', 'A'); None for non-LoRA keys."""
    for part, tag in ((".lora_A.", "A"), (".lora_B.", "B")):
        if part in key:
            module = key.split(part)[0]
            return module.removesuffix(".default") if module.endswith(".default") else module, tag
    return None


def kohya_state_dict(
    unet_lora: dict, text_lora: dict | None, alpha: float, dtype=None, text_prefix: str = "lora_te_"
) -> dict:
    """PEFT LoRA state dicts -> kohya keys: lora_unet_* / lora_te_* with lora_down, lora_up and alpha."""
    out = {}
    for prefix, sd, path_fn in (
        ("lora_unet_", unet_lora, lambda m: m),
        (text_prefix, text_lora or {}, text_model_path),
    ):
        modules: dict[str, dict] = {}
        for key, value in sd.items():
            parsed = peft_key_to_module(key)
            if parsed is None:
                raise ValueError(f"unexpected key in a LoRA state dict: {key}")
            module, tag = parsed
            modules.setdefault(module, {})[tag] = value
        for module, parts in sorted(modules.items()):
            name = kohya_module_name(prefix, path_fn(module))
            down, up = parts["A"], parts["B"]
            if dtype is not None:
                down, up = down.to(dtype), up.to(dtype)
            out[f"{name}.lora_down.weight"] = down.detach().contiguous().cpu()
            out[f"{name}.lora_up.weight"] = up.detach().contiguous().cpu()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=down.dtype)
    return out


def kohya_metadata(cfg, step: int, comps) -> dict[str, str]:
    """kohya's ss_* fields (what A1111 and LoRA browsers show), modelspec, and ours: base model, token, config."""
    token = cfg.token
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(float(cfg.alpha)),
        "ss_base_model_version": comps.family.kohya_base_version,
        "ss_output_name": cfg.output_name,
        "ss_steps": str(step),
        "ss_max_train_steps": str(cfg.max_train_steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_prior_loss_weight": str(cfg.prior_loss_weight if cfg.with_prior_preservation else 0.0),
        "ss_seed": str(cfg.seed),
        "ss_training_comment": f"DreamLoom DreamBooth LoRA, token {token!r}",
        "ss_network_args": json.dumps({"target_modules": cfg.lora_targets}),
        "modelspec.architecture": f"{comps.family.modelspec_architecture}/lora",
        "modelspec.title": cfg.output_name,
        "dreamloom.format": "kohya",
        "dreamloom.token": token,
        "dreamloom.base_model": comps.source,
        "dreamloom.base_fingerprint": comps.fingerprint,
        "dreamloom.steps": str(step),
        "dreamloom.config": cfg.to_json(),
    }


def save_kohya(
    path, unet_lora: dict, text_lora: dict | None, alpha: float, metadata: dict[str, str], text_prefix: str = "lora_te_"
) -> Path:
    from safetensors.torch import save_file

    sd = kohya_state_dict(unet_lora, text_lora, alpha, text_prefix=text_prefix)
    return atomic_save(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata))


def save_diffusers(path, unet_lora: dict, text_lora: dict | None, unet_lora_config, text_lora_config=None) -> Path:
    """Write diffusers' LoRA file (with the adapter config, so load_lora_weights uses alpha/rank)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
        kwargs = dict(
            unet_lora_layers=convert_state_dict_to_diffusers(
                {k: v.detach().cpu().contiguous() for k, v in unet_lora.items()}
            ),
            unet_lora_adapter_metadata=unet_lora_config.to_dict(),
            weight_name=DIFFUSERS_WEIGHT_NAME,
        )
        if text_lora:
            kwargs["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
                {k: v.detach().cpu().contiguous() for k, v in text_lora.items()}
            )
            kwargs["text_encoder_lora_adapter_metadata"] = text_lora_config.to_dict()
        StableDiffusionPipeline.save_lora_weights(tmp, **kwargs)
        atomic_save(path, lambda dst: shutil.copyfile(Path(tmp) / DIFFUSERS_WEIGHT_NAME, dst))
    return path
