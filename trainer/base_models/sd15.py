"""Stable Diffusion 1.5: offline loading of single files and diffusers folders, prompts, pipelines."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import DreamLoomError
from ..files.safetensors_header import fingerprint_file
from .components import ASSETS, Components, diffusers_dtype, load_tokenizer
from .family import CLIP_POSITIONS, ModelFamily

SD15_CONFIG_DIR = ASSETS / "sd15"


def sd15_scheduler_config() -> dict:
    return json.loads((SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())


def scheduler_config_for_file(header: dict) -> dict:
    """SD1.5's noise schedule as a single file declares it. ComfyUI writes an empty `v_pred` tensor into the
    checkpoints of v-prediction models, and `ztsnr` beside it for zero-terminal-SNR schedules (the last
    timestep is pure noise), which also need trailing timestep spacing when sampling."""
    config = sd15_scheduler_config()
    if "v_pred" in header:
        config["prediction_type"] = "v_prediction"
        if "ztsnr" in header:
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def folder_fingerprint(path: Path) -> str:
    """The fingerprint of a diffusers folder: its weight files' names and fingerprints."""
    h = hashlib.sha256()
    for weights in sorted(path.rglob("*.safetensors")):
        h.update(str(weights.relative_to(path)).encode())
        h.update(fingerprint_file(weights).encode())
    return "diffusers-" + h.hexdigest()[:16]


def single_file_fingerprint(path: Path, header: dict | None = None) -> str:
    return "sd15-" + fingerprint_file(path, header)


class SD15Family(ModelFamily):
    name = "SD1.5"
    kohya_base_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1"

    def load_single_file(self, path: Path, header: dict, dtype) -> Components:
        from diffusers import StableDiffusionPipeline

        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                config=str(SD15_CONFIG_DIR),
                tokenizer=load_tokenizer(),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                local_files_only=True,
                **diffusers_dtype(dtype or torch.float32),
            )
        except Exception as err:  # diffusers raises many types for a bad file
            raise DreamLoomError(
                f"Could not load {path.name} as an SD1.5 checkpoint: {err}",
                "Check that the file is a complete SD1.5 .safetensors checkpoint.",
            ) from err
        return Components(
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            vae=pipe.vae,
            unet=pipe.unet,
            scheduler_config=scheduler_config_for_file(header),
            fingerprint=single_file_fingerprint(path, header),
            source=str(path),
            kind="single_file",
            family=self,
        ).freeze()

    def load_folder(self, path: Path, dtype) -> Components:
        unet_cfg = json.loads((path / "unet" / "config.json").read_text())
        if unet_cfg.get("cross_attention_dim") != 768 or unet_cfg.get("in_channels") != 4:
            raise DreamLoomError(
                f"{path.name} is not an SD1.5 model (cross_attention_dim={unet_cfg.get('cross_attention_dim')}, "
                f"in_channels={unet_cfg.get('in_channels')}).",
                "DreamLoom trains SD1.5-family models; pick an SD1.5 folder.",
            )
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        dtype = dtype or torch.float32
        loading = dict(local_files_only=True, **diffusers_dtype(dtype))
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **loading)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **loading)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True, dtype=dtype)
        tokenizer = load_tokenizer(path / "tokenizer" if (path / "tokenizer").is_dir() else None)
        tokenizer.model_max_length = min(tokenizer.model_max_length, CLIP_POSITIONS)  # pipelines read it too
        sched = path / "scheduler" / "scheduler_config.json"
        return Components(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            unet=unet,
            scheduler_config=json.loads(sched.read_text()) if sched.exists() else sd15_scheduler_config(),
            fingerprint=folder_fingerprint(path),
            source=str(path),
            kind="diffusers",
            family=self,
        ).freeze()

    def file_fingerprint(self, path: Path, header: dict | None = None) -> str:
        return single_file_fingerprint(path, header)

    def encode_prompts(self, comps, prompts: list[str], device, text_encoders: dict | None = None) -> dict:
        text_encoder = (text_encoders or {}).get("text_encoder") or comps.text_encoder
        return {"hidden": text_encoder(self.tokenize(comps.tokenizer, prompts).to(device))[0]}

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def pipeline(self, comps, scheduler, unet=None, text_encoder=None):
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # no safety-checker warning: there is none by design
        try:
            pipe = self.pipeline_class()(
                vae=comps.vae,
                text_encoder=text_encoder or comps.text_encoder,
                tokenizer=comps.tokenizer,
                unet=unet or comps.unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        finally:
            diffusers_logging.set_verbosity(verbosity)
        pipe.set_progress_bar_config(disable=True)
        return pipe


SD15 = SD15Family()
