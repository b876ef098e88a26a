"""Load DreamLoom LoRA: kohya, diffusers and raw PEFT files into MODEL and CLIP via ComfyUI's own patching."""

from __future__ import annotations

import os

from ..trainer.errors import DreamLoomError
from . import comfy
from .widgets import float_widget

LINKED = "(use lora_path input)"


def _resolve(lora_name: str, lora_path: str | None) -> str:
    if lora_path and lora_path.strip():
        candidate = lora_path.strip()
        if os.path.isabs(candidate):
            if os.path.exists(candidate):
                return candidate
        else:
            found = comfy.full_path("loras", candidate)
            if found:
                return found
        raise DreamLoomError(
            f"LoRA {candidate!r} not found.",
            "Give a name from the loras folder (as a training node outputs it) or an absolute path.",
        )
    if lora_name == LINKED:
        raise DreamLoomError(
            "No LoRA chosen.", "Pick a file in lora_name, or connect a training node's lora_name output to lora_path."
        )
    found = comfy.full_path("loras", lora_name)
    if not found:
        raise DreamLoomError(
            f"LoRA {lora_name!r} is not in the loras folder.", "Refresh the node list (press R) or pick another file."
        )
    return found


class LoadDreamLoomLoRA:
    DESCRIPTION = (
        "Applies a LoRA to MODEL and CLIP through ComfyUI's own LoRA patching. Reads kohya, diffusers and raw PEFT "
        "files (base_model.model.* with adapter_config.json) and applies each at its trained scale (alpha/rank). "
        "Keys that cannot be mapped are an error listing them, never silently skipped."
    )
    CATEGORY = "DreamLoom/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = (
        "The model with the LoRA applied.",
        "The CLIP with the LoRA's text-encoder part applied (if any).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to patch."}),
                "clip": ("CLIP", {"tooltip": "The CLIP text encoder to patch."}),
                "lora_name": (
                    [LINKED] + comfy.filename_list("loras"),
                    {"tooltip": "A LoRA in the loras folder, or the first entry to use the lora_path input."},
                ),
                "strength_model": float_widget(
                    1.0, -10.0, 10.0, 0.01, "Multiplier on the UNet part (1.0 = as trained)."
                ),
                "strength_clip": float_widget(1.0, -10.0, 10.0, 0.01, "Multiplier on the text-encoder part."),
            },
            "optional": {
                "lora_path": (
                    "STRING",
                    {"forceInput": True, "tooltip": "A LoRA name or path from a training node; overrides lora_name."},
                ),
            },
        }

    def load(self, model, clip, lora_name, strength_model, strength_clip, lora_path=None):
        from ..trainer.formats.lora_import import load_lora_file

        path = _resolve(lora_name, lora_path)
        imported = load_lora_file(path)
        key_map = comfy.lora_key_map(model, clip)
        unmapped = [m for m in imported.modules if m not in key_map]
        if unmapped:
            raise DreamLoomError(
                f"{len(unmapped)} of {len(imported.modules)} LoRA modules in {os.path.basename(path)} do not "
                f"match this model: " + ", ".join(unmapped[:10]) + (" ..." if len(unmapped) > 10 else ""),
                "The LoRA was trained for another architecture (e.g. SDXL), or its text-encoder part needs a CLIP "
                "input.",
            )
        model_out, clip_out = comfy.apply_lora(model, clip, imported.tensors, strength_model, strength_clip)
        return (model_out, clip_out)
