"""Full-size SD1.5 for tests without downloads: random weights, module names, a single-file checkpoint."""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from trainer.base_models.sd15 import SD15_CONFIG_DIR
from trainer.formats.kohya_names import kohya_module_name

from .random_weights import RandomWeights


def sd15_kohya_unet_modules() -> set[str]:
    """Every kohya module name of SD1.5's UNet Linear/Conv layers (built on the meta device)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD15_CONFIG_DIR / "unet")))
    return {
        kohya_module_name("lora_unet_", n)
        for n, m in unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }


def random_sd15_parts(seed: int = 0) -> dict:
    """Random-weight full-size SD1.5 state dicts (fp16) in diffusers layout, plus the configs."""
    ucfg = json.loads((SD15_CONFIG_DIR / "unet" / "config.json").read_text())
    vcfg = json.loads((SD15_CONFIG_DIR / "vae" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ucfg)
        vae = AutoencoderKL.from_config(vcfg)
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SD15_CONFIG_DIR / "text_encoder")))
    weights = RandomWeights(seed)
    parts = {name: weights.state_dict_like(module) for name, module in (("unet", unet), ("vae", vae), ("text", te))}
    return {**parts, "unet_config": ucfg, "vae_config": vcfg}


def write_random_sd15(path: Path, seed: int = 0) -> Path:
    """A random-weight SD1.5 single-file checkpoint (original key layout), as users keep real ones."""
    from trainer.formats.ldm_layout import write_ldm_checkpoint

    p = random_sd15_parts(seed)
    write_ldm_checkpoint(path, p["unet"], p["vae"], p["text"], p["unet_config"], p["vae_config"])
    return Path(path)


if __name__ == "__main__":  # PYTHONPATH=.:tests python -m helpers.sd15_layout OUT.safetensors (for `bench`)
    import sys

    print(write_random_sd15(Path(sys.argv[1])))
