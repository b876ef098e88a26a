"""Load DreamLoom LoRA: kohya, diffusers and raw PEFT files into MODEL and CLIP via ComfyUI's own patching; and the
checks that a LoRA or an embedding fits the model it meets (family first: SD1.5, SD2, SDXL; then layers and widths)."""

from __future__ import annotations

import os
import re

from ..trainer.errors import DreamLoomError
from . import comfy, runner
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


# the embedding keys of a CLIP's tokenizers -> the family ({"clip_l"} is also what the built-in SD1.5 models have)
CLIP_KEYS = {("clip_l",): "SD1.5", ("clip_h",): "SD2", ("clip_g", "clip_l"): "SDXL", ("clip_g",): "SDXL refiner"}
ROOTS = ("SDXL refiner", "SDXL", "SD1.5", "SD2")


def family_root(name: str | None) -> str | None:
    """The family a model name belongs to for LoRAs and embeddings: "SD1.5 inpainting" -> "SD1.5", "SDXL inpainting"
    -> "SDXL"; None for a name no family claims (then only layers and widths are compared)."""
    return next((root for root in ROOTS if name and name.startswith(root)), None)


def file_family(header: dict) -> str | None:
    """The family a LoRA or embedding file was made for, from its safetensors header: DreamLoom's built-in base
    model, else what the trainer reads for LoRAs (kohya's and modelspec's metadata, SDXL's second text encoder, the
    cross-attention width)."""
    from ..trainer.formats.lora_import import lora_family

    base = (header.get("__metadata__") or {}).get("dreamloom.base_model")
    if base in runner.BUILTIN_MODELS:
        return runner.model_family(base)
    return lora_family(header)


def clip_family(clip) -> str | None:
    return CLIP_KEYS.get(tuple(sorted(comfy.clip_embedding_widths(clip))))


def _short(info: dict) -> str:
    """A model's name as the user knows it: a built-in model's short name, or the checkpoint as picked in the list."""
    return info["base_model"] if info.get("base_model") in runner.BUILTIN_MODELS else info["label"]


def target_of(model, clip) -> tuple[str | None, str]:
    """(family, name) of the model a LoRA or embedding meets: from Load Checkpoint (DreamLoom)'s tag, else from
    ComfyUI's model classes."""
    info = base_of(model) or base_of(clip)
    family = info.get("family") if info else None
    if family is None and model is not None:
        family = comfy.model_family(model)
    if family is None and clip is not None:
        family = clip_family(clip)
    return family, _short(info) if info else "the connected model"


def _trained(metadata: dict) -> str:
    from ..trainer.formats.lora_import import trained_on

    return trained_on(metadata) or "its base model not named in the file"


class LoadDreamLoomLoRA:
    DESCRIPTION = (
        "Applies a LoRA to MODEL and CLIP through ComfyUI's own LoRA patching. Reads kohya, diffusers and raw PEFT "
        "files (base_model.model.* with adapter_config.json) of SD1.5 and SDXL models and applies each at its "
        "trained scale (alpha/rank). A LoRA of another model family, and keys that cannot be mapped, are an error "
        "naming them, never silently skipped."
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
                "model": ("MODEL", {"tooltip": "The diffusion model to patch (SD1.5 or SDXL)."}),
                "clip": ("CLIP", {"tooltip": "The CLIP text encoder to patch (SDXL: both of its text encoders)."}),
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
        from ..trainer.files.safetensors_header import read_safetensors_header
        from ..trainer.formats.lora_import import load_lora_file, lora_shape_mismatches, trained_on

        path = _resolve(lora_name, lora_path)
        imported = load_lora_file(path)
        name = os.path.basename(path)
        family, target_name = target_of(model, clip)
        trained_family = file_family(read_safetensors_header(path))
        if family_root(trained_family) and family_root(family) and family_root(trained_family) != family_root(family):
            raise DreamLoomError(
                f"{name} was trained on {trained_family} ({_trained(imported.metadata)}), applied to {family} "
                f"({target_name}): a LoRA only fits the model family it was trained on.",
                f"Load an {trained_family} checkpoint for this LoRA (e.g. with Load Checkpoint (DreamLoom)), or train "
                f"the LoRA on this {family} model.",
            )
        key_map = comfy.lora_key_map(model, clip)
        trained = trained_on(imported.metadata)
        where = f"{name} (trained on {trained})" if trained else name
        target = f"this model ({target_name})"
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
SDXL_KEYS = ("clip_l", "clip_g")


def _comfy_picks(tensors: dict, key: str):
    """The shape of the tensor ComfyUI's loader takes from an embedding file for a text encoder's key (its own key,
    else SD1.5's emb_params or a file's only tensor, which is what ComfyUI falls back to); None if unclear."""
    from ..trainer.formats.embeddings import EMBEDDING_KEY

    if key in tensors:
        return tensors[key]
    if EMBEDDING_KEY in tensors:
        return tensors[EMBEDDING_KEY]
    return next(iter(tensors.values())) if len(tensors) == 1 else None


def embedding_family(header: dict, tensors: dict) -> str | None:
    """The family an embedding file was made for: as file_family reads it, else by its keys (SDXL's clip_l and
    clip_g) or the width of its one text encoder's vectors."""
    from ..trainer.formats.embeddings import EMBEDDING_KEY
    from ..trainer.formats.lora_import import CONTEXT_WIDTH_FAMILY

    family = file_family(header)
    if family:
        return family
    if all(k in tensors for k in SDXL_KEYS):
        return "SDXL"
    one = tensors.get(EMBEDDING_KEY) or (next(iter(tensors.values())) if len(tensors) == 1 else None)
    return CONTEXT_WIDTH_FAMILY.get(int(one[-1])) if one else None


def _describe_file(tensors: dict) -> str:
    if all(k in tensors for k in SDXL_KEYS):
        return f"vectors for two text encoders (clip_l {tensors['clip_l'][-1]} and clip_g {tensors['clip_g'][-1]} wide)"
    (key, shape), *_ = tensors.items()
    return f"vectors for one text encoder ({key}, {shape[-1]} wide)"


def _embedding_misfit(tensors: dict, widths: dict) -> str | None:
    """What ComfyUI would do wrong with this embedding file on a CLIP whose tokenizers take `widths` (key -> width):
    ignore it for some text encoder (its vectors are another width), or use only a part of it (an SDXL file on a
    CLIP with one text encoder); None when it fits, or when the file's layout is not one we can predict."""
    picked = {key: _comfy_picks(tensors, key) for key in widths}
    if any(shape is None or len(shape) not in (1, 2) for shape in picked.values()):
        return None
    ignored = [key for key, shape in picked.items() if int(shape[-1]) != widths[key]]
    used = [key for key in widths if key not in ignored]
    unused = [k for k in SDXL_KEYS if k in tensors and k not in widths] if all(k in tensors for k in SDXL_KEYS) else []
    if not ignored and not unused:
        return None
    if not used:
        return "ComfyUI would ignore the embedding"
    if ignored:
        return f"ComfyUI would use it for {', '.join(used)} and ignore it for {', '.join(ignored)}"
    return f"ComfyUI would use only its {', '.join(used)} part and drop {', '.join(unused)}"


def check_embeddings(clip, texts: list[str]) -> None:
    """Refuse prompts whose embedding:<name> ComfyUI would skip or only half use, with only a console warning or none:
    a missing file, or an embedding of another model family or width (an SD1.5 file on SDXL's two text encoders, an
    SDXL file's clip_l/clip_g pair on SD1.5's one, a tiny model's on a full-size one)."""
    from ..trainer.files.safetensors_header import read_safetensors_header

    widths = comfy.clip_embedding_widths(clip)
    for name in sorted({m for text in texts for m in EMBEDDING_REF.findall(text)}):
        path = comfy.embedding_path(name)
        if path is None:
            raise DreamLoomError(
                f"embedding:{name} is not in ComfyUI's embeddings folder.",
                "Check the name (a training node's prompt_token output gives the right one) or refresh (press R).",
            )
        if not path.endswith(".safetensors") or not widths:
            continue  # a pickle (ComfyUI reads those itself; we do not open them), or a CLIP we cannot see into
        header = read_safetensors_header(path)
        meta = header.get("__metadata__") or {}
        tensors = {k: v["shape"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
        problem = _embedding_misfit(tensors, widths) if tensors else None
        if problem is None:
            continue
        family, target = target_of(None, clip)
        trained_family = embedding_family(header, tensors) or "another model"
        takes = " and ".join(f"{k} {w}" for k, w in widths.items())
        raise DreamLoomError(
            f"embedding:{name} was trained on {trained_family} ({_trained(meta)}), applied to {family or 'a model'} "
            f"({target}): it holds {_describe_file(tensors)}, this CLIP takes {takes}. {problem}.",
            "Use the checkpoint the embedding was trained on (e.g. with Load Checkpoint (DreamLoom)), or train "
            "the embedding on this one.",
        )
