"""A loaded base model: its modules, where it came from, and the family that knows how to drive it."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "clip_tokenizer"


@dataclass
class Components:
    """The modules of a base model. They are never replaced by wrappers: the trainer keeps its
    compiled/DDP-wrapped handles apart, so code that reads these always sees the plain modules."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler_config: dict
    fingerprint: str  # identifies the weights (see docs/architecture.md, "Run identities")
    source: str  # "tiny", "tiny-fabric", or the file/folder path
    kind: str  # "tiny", "single_file" or "diffusers"
    family: Any  # a base_models.family.ModelFamily
    native_resolution: int = 512
    tokenizer_2: Any = None  # SDXL's second text encoder (OpenCLIP ViT-bigG) and its tokenizer; None for SD1.5
    text_encoder_2: Any = None
    builtin: str = ""  # the built-in model whose architecture this is ("tiny", ...; also for its fine-tunes), else ""

    def noise_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    def modules(self) -> dict:
        return {**self.text_encoders(), "vae": self.vae, "unet": self.unet}

    def text_encoders(self) -> dict:
        """The text encoders by attribute name: text_encoder, and text_encoder_2 where the family has one."""
        encoders = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            encoders["text_encoder_2"] = self.text_encoder_2
        return encoders

    def tokenizers(self) -> dict:
        """The tokenizers by the name of the text encoder they feed."""
        tokenizers = {"text_encoder": self.tokenizer}
        if self.text_encoder_2 is not None:
            tokenizers["text_encoder_2"] = self.tokenizer_2
        return tokenizers

    def freeze(self) -> Components:
        """Every module frozen and in eval mode, as loaded; methods then enable what they train."""
        for module in self.modules().values():
            module.requires_grad_(False)
            module.eval()
        return self


TEXT_MODEL = "text_model."  # CLIPTextModel's top level up to transformers 5.5; 5.6 and later have none


def text_model_path(path: str) -> str:
    """A CLIP text-encoder module path with its `text_model.` level, as kohya, ComfyUI and the LDM layout name it."""
    return path if path.startswith(TEXT_MODEL) else TEXT_MODEL + path


def match_text_model_level(state: dict, text_encoder) -> dict:
    """A CLIP text-encoder state dict in the layout of the installed transformers (with or without `text_model.`),
    so files written under one version load under the other."""
    if any(k.startswith(TEXT_MODEL) for k in text_encoder.state_dict()):
        return {text_model_path(k): v for k, v in state.items()}
    return {k.removeprefix(TEXT_MODEL): v for k, v in state.items()}


def diffusers_dtype(dtype) -> dict:
    """The dtype keyword for diffusers' from_pretrained/from_single_file: `dtype` from diffusers 0.40, which warns
    that `torch_dtype` goes in 1.0; `torch_dtype` before (our floor, 0.34, knows no other)."""
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (0, 40) else "torch_dtype": dtype}


def load_tokenizer(folder: str | os.PathLike | None = None):
    """The CLIP tokenizer shipped in trainer/assets (or one from a diffusers folder), never downloaded."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder or TOKENIZER_DIR), local_files_only=True)


def state_fingerprint(modules, seed: bytes = b"") -> str:
    """A hash of the modules' weights: for built-in models, which have no file to fingerprint."""
    h = hashlib.sha256(seed)
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
