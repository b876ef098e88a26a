"""The model-family extension point.

A family is one module in this package (sd15.py, sdxl.py) holding one ModelFamily instance, registered in
load.py's FAMILIES. It says how to recognise the family's checkpoints, load them offline, turn prompts into the
UNet's conditioning, and name modules for kohya export. Everything above this package (training, methods,
formats, inference) asks the family of the loaded Components, never the checkpoint layout itself.
"""

from __future__ import annotations

from pathlib import Path

CLIP_POSITIONS = 77  # the position table of every CLIP text encoder SD1.5 and SDXL use


class ModelFamily:
    name = "base"  # as users read it, e.g. "SD1.5"
    default_resolution = 512  # the training and sample size a user gets unless they set one
    kohya_base_version = ""  # kohya's ss_base_model_version
    modelspec_architecture = ""  # modelspec.architecture prefix, e.g. "stable-diffusion-v1"
    text_encoder_kohya_prefix = {"text_encoder": "lora_te_"}  # Components attribute -> kohya key prefix
    # How kohya names UNet LoRA modules: "diffusers" module paths (SD1.5) or the original "ldm" layout (SDXL)
    kohya_unet_layout = "diffusers"
    # The keys of an A1111/ComfyUI embedding file, per text encoder ("emb_params" for one encoder)
    embedding_keys = {"text_encoder": "emb_params"}

    def recognises(self, family_name: str) -> bool:
        """True for the name detect.detect_family gives this family's single-file checkpoints."""
        return family_name == self.name

    def load_single_file(self, path: Path, header: dict, dtype):
        raise NotImplementedError

    def load_folder(self, path: Path, dtype):
        raise NotImplementedError

    def file_fingerprint(self, path: Path, header: dict | None = None) -> str:
        raise NotImplementedError

    def tokenize(self, tokenizer, prompts: list[str]):
        """Token ids padded to CLIP's 77 positions, longer prompts truncated. Some diffusers folders' tokenizers
        claim a model_max_length of 8192, which the text encoder's position table cannot take."""
        length = min(tokenizer.model_max_length, CLIP_POSITIONS)
        return tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids

    def encode_prompts(self, comps, prompts: list[str], device, text_encoders: dict | None = None) -> dict:
        """What the UNet is conditioned on for `prompts`, as tensors with one row per prompt: "hidden" (the
        encoder_hidden_states), and "pooled" where the family uses a pooled text embedding. `text_encoders`
        maps a Components attribute to the handle to run instead (the trainer's DDP-wrapped module)."""
        raise NotImplementedError

    def unused_text_modules(self, name: str, text_encoder) -> list[str]:
        """Modules of the text encoder `name` (paths without `text_model.`) whose output never reaches the UNet's
        conditioning: nothing there can learn, and under multi-GPU training a parameter that gets no gradient ends
        the run at its second step."""
        return []

    def unet_conditioning(self, embeddings: dict, size_ids, dtype) -> tuple:
        """(encoder_hidden_states, extra UNet keyword arguments) for a batch. `size_ids` holds each row's
        (original height, original width, crop top, crop left, target height, target width): SDXL's time ids."""
        return embeddings["hidden"].to(dtype), {}

    def pipeline_class(self):
        """The diffusers pipeline class of the family (also what saves its LoRA files)."""
        raise NotImplementedError

    def pipeline(self, comps, scheduler, unet=None, text_encoder=None):
        raise NotImplementedError
