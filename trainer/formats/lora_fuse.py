"""A LoRA file fused into a loaded model's layers, as ComfyUI applies one: W += strength * alpha/rank * up @ down.

`generate` and `morph` use this instead of diffusers' `load_lora_weights`: every format lora_import reads loads
(diffusers' own kohya converter refuses, for instance, a kohya text-encoder LoRA without out_proj layers), a module
that has no layer or does not fit is named rather than dropped or reported as "could not infer state dict type", and
sampling runs the plain layers (no adapter operators per step).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..base_models.components import text_model_path
from ..errors import DreamLoomError
from .kohya_names import kohya_module_name
from .lora_export import kohya_unet_namer
from .lora_import import load_lora_file, lora_shape_mismatches, trained_on
from .lora_svd import lora_delta

LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


def kohya_layer_table(comps) -> dict[str, torch.nn.Module]:
    """{kohya module name: layer} for every Linear and Conv2d of the UNet and text encoders, under each name a LoRA
    file of this family may use (lora_import keeps SDXL's kohya files' LDM names, and names a diffusers file's UNet
    modules by their diffusers paths and its first text encoder lora_te_)."""
    table: dict[str, torch.nn.Module] = {}
    kohya_unet_path = kohya_unet_namer(comps)
    for path, layer in comps.unet.named_modules():
        if isinstance(layer, LORA_LAYERS):
            for name in {path, kohya_unet_path(path)}:
                table[kohya_module_name("lora_unet_", name)] = layer
    for attr, prefix in comps.family.text_encoder_kohya_prefix.items():
        prefixes = {prefix, "lora_te_"} if attr == "text_encoder" else {prefix}
        for path, layer in getattr(comps, attr).named_modules():
            if isinstance(layer, LORA_LAYERS):
                for each in prefixes:
                    table[kohya_module_name(each, text_model_path(path))] = layer
    return table


@torch.no_grad()
def fuse_lora(comps, path: str | Path, strength: float) -> int:
    """Add the LoRA at `path` times `strength` into comps' layers (on their device, in their dtype; the sum is taken in
    float32). Returns the number of layers changed. Nothing is changed unless every module has a layer that fits."""
    path = Path(path)
    imported = load_lora_file(path)
    table = kohya_layer_table(comps)
    model_name = Path(comps.source).name
    trained = trained_on(imported.metadata)
    trained_note = f"; it was trained on {trained}." if trained else "."
    fix = (
        f"Pass the model it was trained on as --base-model{f' ({trained})' if trained else ''}, and give --lora a "
        "LoRA (LoRAs go to --lora, embeddings to --embedding)."
    )
    unmapped = [m for m in imported.modules if m not in table]
    if unmapped:
        raise DreamLoomError(
            f"{path.name} does not fit the base model {model_name}: {len(unmapped)} of its {len(imported.modules)} "
            f"modules have no layer there ({', '.join(unmapped[:6])}{' ...' if len(unmapped) > 6 else ''})"
            + trained_note,
            fix,
        )
    shapes = {m: tuple(table[m].weight.shape) for m in imported.modules}
    wrong = lora_shape_mismatches(imported.tensors, imported.modules, {m: m for m in shapes}, shapes)
    if wrong:
        raise DreamLoomError(
            f"{path.name} does not fit the base model {model_name}: its layers have other widths than this model's "
            f"({'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''})" + trained_note,
            fix,
        )
    for module in imported.modules:
        down = imported.tensors[f"{module}.lora_down.weight"]
        up = imported.tensors[f"{module}.lora_up.weight"]
        scale = strength * float(imported.tensors[f"{module}.alpha"]) / down.shape[0]
        weight = table[module].weight
        delta = lora_delta(down, up, scale, weight.shape).to(weight.device)
        weight.copy_((weight.float() + delta).to(weight.dtype))
    return len(imported.modules)
