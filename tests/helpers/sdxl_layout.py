"""Full-size SDXL base for tests without downloads: random weights, kohya module names, a single-file checkpoint.

The models are built on the meta device (shapes only) and every tensor is filled on its own, in fp16
(random_weights.py), so the full-size parts cost their fp16 size (~6.9 GB) and never a float32 model.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer.base_models.components import ASSETS
from trainer.formats.ldm_layout import kohya_ldm_unet_name

from .random_weights import RandomWeights

SDXL_CONFIG_DIR = ASSETS / "sdxl"


def sdxl_configs() -> dict:
    """The shipped SDXL base 1.0 configs: {"unet", "vae"} as dicts, {"text", "text_2"} as CLIPTextConfig."""
    return {
        "unet": json.loads((SDXL_CONFIG_DIR / "unet" / "config.json").read_text()),
        "vae": json.loads((SDXL_CONFIG_DIR / "vae" / "config.json").read_text()),
        "text": CLIPTextConfig.from_pretrained(str(SDXL_CONFIG_DIR / "text_encoder")),
        "text_2": CLIPTextConfig.from_pretrained(str(SDXL_CONFIG_DIR / "text_encoder_2")),
    }


def sdxl_meta_models(configs: dict | None = None) -> dict:
    """SDXL base's four models on the meta device: {"unet", "vae", "text", "text_2"}."""
    cfg = configs or sdxl_configs()
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(cfg["unet"]),
            "vae": AutoencoderKL.from_config(cfg["vae"]),
            "text": CLIPTextModel(cfg["text"]),
            "text_2": CLIPTextModelWithProjection(cfg["text_2"]),
        }


def sdxl_kohya_unet_modules() -> set[str]:
    """Every kohya (sd-scripts SDXL) module name of SDXL's UNet Linear/Conv2d layers (built on the meta device)."""
    cfg = sdxl_configs()["unet"]
    unet = sdxl_meta_models()["unet"]
    return {
        kohya_ldm_unet_name(n, cfg)
        for n, m in unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }


def random_sdxl_parts(seed: int = 0) -> dict:
    """Random-weight full-size SDXL base state dicts (fp16) in diffusers layout, plus the UNet and VAE configs:
    {"unet", "vae", "text", "text_2", "unet_config", "vae_config"}."""
    cfg = sdxl_configs()
    models = sdxl_meta_models(cfg)
    weights = RandomWeights(seed)
    parts = {name: weights.state_dict_like(models.pop(name)) for name in ("unet", "vae", "text", "text_2")}
    return {**parts, "unet_config": cfg["unet"], "vae_config": cfg["vae"]}


def write_random_sdxl(path: Path, seed: int = 0, extra: dict | None = None) -> Path:
    """A random-weight SDXL base single-file checkpoint (original sgm key layout, fp16, ~6.9 GB), as users keep
    real ones; `extra`: tensors stored as they are."""
    from trainer.formats.ldm_layout import write_sdxl_checkpoint

    p = random_sdxl_parts(seed)
    write_sdxl_checkpoint(
        path, p["unet"], p["vae"], p["text"], p["text_2"], p["unet_config"], p["vae_config"], extra=extra
    )
    return Path(path)


if __name__ == "__main__":  # PYTHONPATH=.:tests python -m helpers.sdxl_layout OUT.safetensors
    import sys

    print(write_random_sdxl(Path(sys.argv[1])))
