"""Shared fixtures: the tiny model, the fabric sample set, and a random-weight full-size SD1.5 checkpoint."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def fabric_dir(tmp_path_factory) -> Path:
    from trainer.fabric import write_fabric_samples

    folder = tmp_path_factory.mktemp("fabric")
    write_fabric_samples(folder, size=128)
    return folder


@pytest.fixture
def tiny():
    from trainer.models import build_tiny

    return build_tiny()


def tiny_config(instance_dir, **overrides):
    from trainer.config import TrainConfig

    base = dict(
        base_model="tiny",
        instance_dir=str(instance_dir),
        resolution=64,
        max_train_steps=10,
        num_class_images=4,
        class_steps=2,
        class_batch_size=4,
        sample_steps=2,
        sample_every=0,
        checkpoint_every=0,
        learning_rate=1e-3,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def sd15_parts():
    """Random-weight full-size SD1.5 state dicts (fp16) in diffusers layout, plus the configs."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.models import SD15_CONFIG_DIR

    ucfg = json.loads((SD15_CONFIG_DIR / "unet" / "config.json").read_text())
    vcfg = json.loads((SD15_CONFIG_DIR / "vae" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ucfg)
        vae = AutoencoderKL.from_config(vcfg)
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SD15_CONFIG_DIR / "text_encoder")))
    g = torch.Generator().manual_seed(0)

    def rnd(module):
        return {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.float16) for k, v in module.state_dict().items()}

    return {"unet": rnd(unet), "vae": rnd(vae), "text": rnd(te), "unet_config": ucfg, "vae_config": vcfg}


@pytest.fixture(scope="session")
def sd15_checkpoint(sd15_parts, tmp_path_factory) -> Path:
    from trainer.ldm import write_ldm_checkpoint

    path = tmp_path_factory.mktemp("sd15") / "v1-5-random.safetensors"
    p = sd15_parts
    write_ldm_checkpoint(path, p["unet"], p["vae"], p["text"], p["unet_config"], p["vae_config"])
    return path


@pytest.fixture(scope="session")
def sd15_components(sd15_checkpoint):
    from trainer.models import load_base_model

    return load_base_model(str(sd15_checkpoint))
