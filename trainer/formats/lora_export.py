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


def kohya_unet_namer(comps):
    """The function that names a UNet module (diffusers path) the way kohya does for this model's family:
    SD1.5 LoRAs use diffusers' paths, SDXL LoRAs the original (LDM) layout's."""
    if comps.family.kohya_unet_layout == "ldm":
        from .ldm_layout import unet_module_to_ldm

        config = dict(comps.unet.config)
        return lambda module: unet_module_to_ldm(module, config)
    return lambda module: module


def kohya_state_dict(unet_lora: dict, text_loras: dict | None, alpha: float, dtype=None, unet_name=None) -> dict:
    """PEFT LoRA state dicts -> kohya keys with lora_down, lora_up and alpha: lora_unet_* for the UNet (its module
    paths named by `unet_name`, diffusers' by default), and `text_loras` maps a kohya prefix (lora_te_, lora_te1_,
    lora_te2_) to a text encoder's PEFT state dict."""
    out = {}
    parts = [("lora_unet_", unet_lora, unet_name or (lambda m: m))]
    parts += [(prefix, sd, text_model_path) for prefix, sd in (text_loras or {}).items()]
    for prefix, sd, path_fn in parts:
        modules: dict[str, dict] = {}
        for key, value in sd.items():
            parsed = peft_key_to_module(key)
            if parsed is None:
                raise ValueError(f"unexpected key in a LoRA state dict: {key}")
            module, tag = parsed
            modules.setdefault(module, {})[tag] = value
        for module, pair in sorted(modules.items()):
            name = kohya_module_name(prefix, path_fn(module))
            down, up = pair["A"], pair["B"]
            if dtype is not None:
                down, up = down.to(dtype), up.to(dtype)
            out[f"{name}.lora_down.weight"] = down.detach().contiguous().cpu()
            out[f"{name}.lora_up.weight"] = up.detach().contiguous().cpu()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=down.dtype)
    return out


def kohya_network_metadata(family, rank, alpha, output_name: str) -> dict[str, str]:
    """The fields every kohya LoRA file of ours has: network type, rank and alpha (kohya writes "Dynamic" where
    modules differ), the family's kohya and modelspec names (what loaders and the family checks read), the title."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)) if isinstance(alpha, (int, float)) else str(alpha),
        "ss_base_model_version": family.kohya_base_version,
        "ss_output_name": output_name,
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.title": output_name,
        "dreamloom.format": "kohya",
    }


def kohya_metadata(cfg, step: int, comps) -> dict[str, str]:
    """kohya's ss_* fields (what A1111 and LoRA browsers show), modelspec, and ours: base model, token, config."""
    token = cfg.token
    return {
        **kohya_network_metadata(comps.family, cfg.rank, float(cfg.alpha), cfg.output_name),
        "ss_steps": str(step),
        "ss_max_train_steps": str(cfg.max_train_steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_prior_loss_weight": str(cfg.prior_loss_weight if cfg.with_prior_preservation else 0.0),
        "ss_seed": str(cfg.seed),
        "ss_training_comment": f"DreamLoom DreamBooth LoRA, token {token!r}",
        "ss_network_args": json.dumps({"target_modules": cfg.lora_targets}),
        "dreamloom.token": token,
        "dreamloom.base_model": comps.source,
        "dreamloom.base_fingerprint": comps.fingerprint,
        "dreamloom.steps": str(step),
        "dreamloom.config": cfg.to_json(),
    }


def save_kohya(path, comps, unet_lora: dict, text_loras: dict, alpha: float, metadata: dict[str, str]) -> Path:
    """The kohya file for a model of comps' family; `text_loras` maps a Components text-encoder attribute to its
    PEFT LoRA state dict."""
    from safetensors.torch import save_file

    prefixes = comps.family.text_encoder_kohya_prefix
    sd = kohya_state_dict(
        unet_lora, {prefixes[name]: lora for name, lora in text_loras.items()}, alpha, unet_name=kohya_unet_namer(comps)
    )
    return atomic_save(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata))


def save_diffusers(
    path, comps, unet_lora: dict, text_loras: dict, unet_lora_config, text_lora_configs: dict | None = None
) -> Path:
    """Write diffusers' LoRA file (with the adapter configs, so load_lora_weights uses alpha/rank), through the
    family's pipeline class (SDXL's adds text_encoder_2). `text_lora_configs`: each text encoder's LoraConfig, as it
    was trained (diffusers builds the adapters from it, so one naming layers without weights in the file fails)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    pipeline_class = comps.family.pipeline_class()
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
        kwargs = dict(
            unet_lora_layers=convert_state_dict_to_diffusers(
                {k: v.detach().cpu().contiguous() for k, v in unet_lora.items()}
            ),
            unet_lora_adapter_metadata=unet_lora_config.to_dict(),
            weight_name=DIFFUSERS_WEIGHT_NAME,
        )
        for name, lora in text_loras.items():
            kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(
                {k: v.detach().cpu().contiguous() for k, v in lora.items()}
            )
            kwargs[f"{name}_lora_adapter_metadata"] = text_lora_configs[name].to_dict()
        pipeline_class.save_lora_weights(tmp, **kwargs)
        atomic_save(path, lambda dst: shutil.copyfile(Path(tmp) / DIFFUSERS_WEIGHT_NAME, dst))
    return path
