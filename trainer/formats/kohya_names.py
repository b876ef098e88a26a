"""Module names as kohya, A1111 and ComfyUI's LoRA loader spell them."""

from __future__ import annotations


def kohya_module_name(prefix: str, module_path: str) -> str:
    """('lora_unet_', 'down_blocks.0.attentions.0...to_q') -> 'lora_unet_down_blocks_0_attentions_0_..._to_q'."""
    return prefix + module_path.replace(".", "_")
