"""Module names as kohya, A1111 and ComfyUI's LoRA loader spell them."""

from __future__ import annotations

TEXT_MODEL = "text_model."


def text_model_path(path: str) -> str:
    """A CLIP text-encoder module path with its `text_model.` level, as kohya and ComfyUI names include it
    (transformers 5's CLIPTextModel and PEFT state dicts leave it out)."""
    return path if path.startswith(TEXT_MODEL) else TEXT_MODEL + path


def kohya_module_name(prefix: str, module_path: str) -> str:
    """('lora_unet_', 'down_blocks.0.attentions.0...to_q') -> 'lora_unet_down_blocks_0_attentions_0_..._to_q'."""
    return prefix + module_path.replace(".", "_")
