"""Stable Diffusion XL (base): offline loading of single files and diffusers folders, prompts, pipelines.

SDXL conditions its UNet on two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG; their penultimate hidden states
side by side, 768 + 1280 = 2048 wide), on the pooled, projected output of the second, and on six "time ids" per
image: the original size, the top-left of the crop and the target size (SDXL paper, section 2.2).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DreamLoomError
from ..files.safetensors_header import fingerprint_file
from .components import ASSETS, Components, diffusers_dtype, load_tokenizer
from .family import CLIP_POSITIONS, ModelFamily
from .sd15 import folder_fingerprint

SDXL_CONFIG_DIR = ASSETS / "sdxl"
# OpenCLIP pads with "!" (id 0) where CLIP ViT-L pads with its end token; the pooled output is read at the end
# token either way, but the padded positions of the hidden states differ, so each tokenizer keeps its own.
TOKENIZER_2_PAD = "!"


def load_tokenizer_2(folder=None):
    tokenizer = load_tokenizer(folder)
    if folder is None:
        tokenizer.pad_token = TOKENIZER_2_PAD
    return tokenizer


def sdxl_scheduler_config() -> dict:
    return json.loads((SDXL_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())


def scheduler_config_for_file(header: dict) -> dict:
    """The noise schedule a single file declares: ComfyUI's `v_pred` / `ztsnr` markers (as for SD1.5), which
    v-prediction SDXL fine-tunes carry."""
    config = sdxl_scheduler_config()
    if "v_pred" in header:
        config["prediction_type"] = "v_prediction"
        if "ztsnr" in header:
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


class SDXLFamily(ModelFamily):
    name = "SDXL"
    default_resolution = 1024
    kohya_base_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    text_encoder_kohya_prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    kohya_unet_layout = "ldm"
    embedding_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}

    def load_single_file(self, path: Path, header: dict, dtype) -> Components:
        from diffusers import StableDiffusionXLPipeline

        try:
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path),
                config=str(SDXL_CONFIG_DIR),
                tokenizer=load_tokenizer(),
                tokenizer_2=load_tokenizer_2(),
                local_files_only=True,
                **diffusers_dtype(dtype or torch.float32),
                add_watermarker=False,
            )
        except Exception as err:  # diffusers raises many types for a bad file
            raise DreamLoomError(
                f"Could not load {path.name} as an SDXL checkpoint: {err}",
                "Check that the file is a complete SDXL base .safetensors checkpoint (UNet, both text encoders, VAE).",
            ) from err
        return self._components(pipe, scheduler_config_for_file(header), self.file_fingerprint(path, header), path)

    def load_folder(self, path: Path, dtype) -> Components:
        from diffusers import StableDiffusionXLPipeline

        tokenizers = {}
        for name, loader in (("tokenizer", load_tokenizer), ("tokenizer_2", load_tokenizer_2)):
            tokenizers[name] = loader(path / name if (path / name).is_dir() else None)
            tokenizers[name].model_max_length = min(tokenizers[name].model_max_length, CLIP_POSITIONS)
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                str(path),
                local_files_only=True,
                **diffusers_dtype(dtype or torch.float32),
                add_watermarker=False,
                **tokenizers,
            )
        except Exception as err:
            raise DreamLoomError(
                f"Could not load the diffusers folder {path.name} as SDXL: {err}",
                "Check that the folder holds unet/, vae/, text_encoder/ and text_encoder_2/ with their weights.",
            ) from err
        sched = path / "scheduler" / "scheduler_config.json"
        config = json.loads(sched.read_text()) if sched.exists() else sdxl_scheduler_config()
        return self._components(pipe, config, folder_fingerprint(path), path, kind="diffusers")

    def _components(self, pipe, scheduler_config, fingerprint, path, kind="single_file") -> Components:
        return Components(
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            vae=pipe.vae,
            unet=pipe.unet,
            scheduler_config=scheduler_config,
            fingerprint=fingerprint,
            source=str(path),
            kind=kind,
            family=self,
            native_resolution=self.default_resolution,
            tokenizer_2=pipe.tokenizer_2,
            text_encoder_2=pipe.text_encoder_2,
        ).freeze()

    def file_fingerprint(self, path: Path, header: dict | None = None) -> str:
        return "sdxl-" + fingerprint_file(path, header)

    def encode_prompts(self, comps, prompts: list[str], device, text_encoders: dict | None = None) -> dict:
        """Penultimate hidden states of both encoders side by side, and the second encoder's projected pooled
        output, as diffusers' StableDiffusionXLPipeline.encode_prompt computes them."""
        encoders = {**comps.text_encoders(), **(text_encoders or {})}
        hidden, pooled = [], None
        for name, tokenizer in comps.tokenizers().items():
            out = encoders[name](self.tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if name == "text_encoder_2":
                pooled = out[0]  # CLIPTextModelWithProjection's text_embeds
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}

    def unused_text_modules(self, name: str, text_encoder) -> list[str]:
        """CLIP-L's last layer and final norm: encode_prompts takes its penultimate hidden states. (The second
        encoder's last layer makes the pooled embedding, so all of it is used.)"""
        if name != "text_encoder":
            return []
        return [f"encoder.layers.{text_encoder.config.num_hidden_layers - 1}", "final_layer_norm"]

    def unet_conditioning(self, embeddings: dict, size_ids, dtype) -> tuple:
        pooled = embeddings["pooled"]
        added = {"text_embeds": pooled.to(dtype), "time_ids": size_ids.to(pooled.device, dtype)}
        return embeddings["hidden"].to(dtype), {"added_cond_kwargs": added}

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def pipeline(self, comps, scheduler, unet=None, text_encoder=None):
        pipe = self.pipeline_class()(
            vae=comps.vae,
            text_encoder=text_encoder or comps.text_encoder,
            text_encoder_2=comps.text_encoder_2,
            tokenizer=comps.tokenizer,
            tokenizer_2=comps.tokenizer_2,
            unet=unet or comps.unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


SDXL = SDXLFamily()
