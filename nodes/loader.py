"""Load DreamLoom LoRA: kohya, diffusers and raw PEFT files into MODEL and CLIP via ComfyUI's own patching."""

from __future__ import annotations

import os
import re

from ..trainer.errors import DreamLoomError
from . import comfy
from .checkpoint import base_of
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
        from ..trainer.formats.lora_import import load_lora_file, lora_shape_mismatches, trained_on

        path = _resolve(lora_name, lora_path)
        imported = load_lora_file(path)
        key_map = comfy.lora_key_map(model, clip)
        name = os.path.basename(path)
        trained = trained_on(imported.metadata)
        where = f"{name} (trained on {trained})" if trained else name
        target = base_of(model) or base_of(clip)
        target = f"this model ({target['label']})" if target else "this model"
        unmapped = [m for m in imported.modules if m not in key_map]
        if unmapped:
            raise DreamLoomError(
                f"{len(unmapped)} of {len(imported.modules)} LoRA modules in {where} have no layer in {target}: "
                + ", ".join(unmapped[:10])
                + (" ..." if len(unmapped) > 10 else ""),
                "Apply the LoRA to the base model it was trained on (or one of the same architecture); a "
                "text-encoder part also needs the clip input connected.",
            )
        wrong = lora_shape_mismatches(imported.tensors, imported.modules, key_map, comfy.weight_shapes(model, clip))
        if wrong:
            raise DreamLoomError(
                f"{len(wrong)} of {len(imported.modules)} LoRA modules in {where} do not fit {target}'s layers: "
                + "; ".join(wrong[:5])
                + (" ..." if len(wrong) > 5 else ""),
                "The LoRA was trained on a model of another size: load its base model (e.g. with Load Checkpoint "
                "(DreamLoom)), or train the LoRA on this one.",
            )
        model_out, clip_out = comfy.apply_lora(model, clip, imported.tensors, strength_model, strength_clip)
        return (model_out, clip_out)


EMBEDDING_REF = re.compile(r"embedding:([^\s,()\[\]{}]+)")


def check_embeddings(clip, texts: list[str]) -> None:
    """Refuse prompts whose embedding:<name> ComfyUI would skip with only a console warning: a missing file, or
    one of DreamLoom's embeddings whose width does not fit this CLIP (trained on another base model)."""
    from ..trainer.files.safetensors_header import read_safetensors_header
    from ..trainer.formats.embeddings import EMBEDDING_KEY
    from ..trainer.formats.lora_import import trained_on

    widths = comfy.clip_embedding_widths(clip)
    for name in sorted({m for text in texts for m in EMBEDDING_REF.findall(text)}):
        path = comfy.embedding_path(name)
        if path is None:
            raise DreamLoomError(
                f"embedding:{name} is not in ComfyUI's embeddings folder.",
                "Check the name (a training node's prompt_token output gives the right one) or refresh (press R).",
            )
        if not path.endswith(".safetensors"):
            continue  # not one of ours; ComfyUI reads pickled embeddings itself
        header = read_safetensors_header(path)
        meta = header.get("__metadata__") or {}
        info = header.get(EMBEDDING_KEY)
        if meta.get("dreamloom.format") != "textual_inversion" or not info or not widths:
            continue
        width = int(info["shape"][-1])
        if width not in widths.values():
            target = base_of(clip)
            target = f"this CLIP ({target['label']})" if target else "this CLIP"
            trained = trained_on(meta) or "another model"
            raise DreamLoomError(
                f"embedding:{name} was trained on {trained}, whose text encoder is {width} wide; {target} takes "
                f"{' / '.join(str(w) for w in widths.values())}. ComfyUI would ignore the embedding.",
                "Use the checkpoint the embedding was trained on (e.g. with Load Checkpoint (DreamLoom)), or train "
                "the embedding on this one.",
            )
