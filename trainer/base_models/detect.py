"""Which model family an original-layout (LDM / sgm) checkpoint belongs to, from its tensor names and shapes.

diffusers has `single_file_utils.infer_diffusers_model_type`, but it answers "v1" for any layout it does not
know (a LoRA, SD3, Flux), so a wrong file would be loaded as SD1.5; this check names what it sees instead.

The names a family can claim (`ModelFamily.recognises`) are exact: "SD1.5", "SDXL", "SDXL refiner",
"SDXL inpainting". Everything else is a description for the error message ("an SDXL variant with ...").
"""

from __future__ import annotations

import re

UNET = "model.diffusion_model."

# Transformer blocks per UNet block, (input_blocks, middle_block, output_blocks), 0 where a block has no attention:
# what distilled SDXL models (SSD-1B, Vega) change while keeping SDXL's channels and text encoders.
SDXL_DEPTHS = ((0, 0, 0, 2, 2, 0, 10, 10), (10,), (10, 10, 10, 2, 2, 2, 0, 0, 0))
SDXL_REFINER_DEPTHS = ((0, 0, 0, 4, 4, 0, 4, 4, 0, 0, 0), (4,), (0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0))


def _depths(keys) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Transformer blocks in each input, middle and output block of an LDM UNet, from the key names."""
    blocks: dict[str, dict[int, set[int]]] = {"input_blocks": {}, "middle_block": {}, "output_blocks": {}}
    pattern = re.compile(r"model\.diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:\d+\.)?(.*)")
    for k in keys:
        m = pattern.match(k)
        if not m:
            continue
        found = blocks[m[1]].setdefault(int(m[2]), set())
        t = re.match(r"transformer_blocks\.(\d+)\.", m[3])
        if t:
            found.add(int(t[1]))
    ins = tuple(len(blocks["input_blocks"].get(i, ())) for i in range(1, max(blocks["input_blocks"], default=0) + 1))
    mid = tuple(n for n in (len(v) for _, v in sorted(blocks["middle_block"].items())) if n)
    outs = tuple(len(blocks["output_blocks"].get(i, ())) for i in range(max(blocks["output_blocks"], default=-1) + 1))
    return ins, mid, outs


def _describe(depths) -> str:
    return " / ".join(",".join(map(str, part)) or "-" for part in depths)


def _context_width(header: dict) -> int | None:
    for k, v in header.items():
        if k.startswith(UNET) and k.endswith(".attn2.to_k.weight"):
            return v.get("shape", [None, None])[1]
    return None


def _sdxl_unet(header: dict, base: str, channels: int, context: int, depths) -> str:
    """`base` ("SDXL" or "SDXL refiner") when the UNet has its standard shape, else what differs."""
    in_w = header.get(UNET + "input_blocks.0.0.weight", {}).get("shape")
    if in_w is None:
        return f"{base} without a UNet"
    variant = "an SDXL refiner variant" if base == "SDXL refiner" else "an SDXL variant"
    if in_w[0] != channels:
        return f"{variant} with {in_w[0]} base channels"
    ctx = _context_width(header)
    if ctx is not None and ctx != context:
        return f"{variant} with {ctx}-wide text conditioning"
    found = _depths(header.keys())
    if found != depths:
        return (
            f"{variant} with a non-standard UNet (e.g. a distilled SSD-1B or Vega: transformer blocks per "
            f"input / middle / output block {_describe(found)}; {base} has {_describe(depths)})"
        )
    if in_w[1] == 9:
        return f"{base} inpainting"
    if in_w[1] != 4:
        return f"{variant} with {in_w[1]} input channels (e.g. an image-editing model)"
    return base


def _detect_sgm(header: dict) -> str:
    """Checkpoints in Stability's sgm layout (text encoders under `conditioner.embedders.N`): SDXL and kin."""
    keys = header.keys()

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if "edm_mean" in header or "edm_std" in header:
        return "Playground v2.5 (SDXL's layout with an EDM noise schedule)"
    clip_l = has("conditioner.embedders.0.transformer.")
    open_clip_0 = has("conditioner.embedders.0.model.")
    open_clip_1 = has("conditioner.embedders.1.model.")
    if open_clip_0 and not clip_l and not has("conditioner.embedders.1."):
        width = header.get("conditioner.embedders.0.model.ln_final.weight", {}).get("shape", [1280])[0]
        if width != 1280:
            return f"an sgm-layout model with a {width}-wide OpenCLIP text encoder (e.g. SD2)"
        return _sdxl_unet(header, "SDXL refiner", 384, 1280, SDXL_REFINER_DEPTHS)
    if open_clip_1 and not clip_l:
        return "SDXL without its CLIP ViT-L text encoder (conditioner.embedders.0.transformer)"
    if clip_l and not open_clip_1:
        return "SDXL without its OpenCLIP ViT-bigG text encoder (conditioner.embedders.1.model)"
    if not clip_l:
        return "an sgm-layout model with text encoders DreamLoom does not know"
    return _sdxl_unet(header, "SDXL", 320, 2048, SDXL_DEPTHS)


# A full fine-tune of a built-in model: one safetensors file, each component under its Components attribute in
# diffusers names (unet., vae., text_encoder., text_encoder_2.), the built-in it was trained from in the metadata
# (written by base_models/builtin.py:save_builtin_finetune). ComfyUI's core loader cannot build the toy widths (e.g.
# 8 GroupNorm groups), so these files load through load_base_model and Load Checkpoint (DreamLoom).
BUILTIN_FINETUNE_FORMAT = "dreamloom-builtin-finetune-v1"
BUILTIN_BASE_KEY = "dreamloom.builtin_base"
BUILTIN_FINETUNE_FAMILIES = {"tiny": "SD1.5", "tiny-fabric": "SD1.5", "tiny-sdxl": "SDXL"}


def builtin_base_of(header: dict) -> str | None:
    """The built-in model a DreamLoom fine-tune file was trained from (from its safetensors header), else None."""
    meta = header.get("__metadata__") or {}
    base = meta.get(BUILTIN_BASE_KEY)
    return base if meta.get("format") == BUILTIN_FINETUNE_FORMAT and base in BUILTIN_FINETUNE_FAMILIES else None


def detect_family(header: dict) -> str:
    """Name the model family of an LDM-layout checkpoint from its tensor names and shapes (a DreamLoom fine-tune
    of a built-in model: its base's family, from the metadata)."""
    base = builtin_base_of(header)
    if base:
        return BUILTIN_FINETUNE_FAMILIES[base]
    keys = header.keys()

    def shape(k):
        return header.get(k, {}).get("shape")

    if any(k.startswith("conditioner.embedders.") for k in keys):
        return _detect_sgm(header)
    if any(k.startswith("model.diffusion_model.joint_blocks") for k in keys):
        return "SD3"
    if any(k.startswith("double_blocks.") or k.startswith("model.diffusion_model.double_blocks") for k in keys):
        return "Flux"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "SD2"
    in_w = shape("model.diffusion_model.input_blocks.0.0.weight")
    if in_w is None:
        if any(k.startswith("down_blocks.") or k.startswith("lora_unet_") for k in keys):
            return "not a full checkpoint (looks like a LoRA or a lone UNet)"
        return "unknown"
    adm = shape("model.diffusion_model.label_emb.0.0.weight")
    if adm and adm[1] == 2816 and not any(k.startswith("cond_stage_model.") for k in keys):
        return "SDXL without text encoders (a lone UNet)"
    if in_w[1] == 9:
        return "SD1.5 inpainting"
    if in_w[1] != 4:
        return f"an SD variant with {in_w[1]} input channels (e.g. instruct-pix2pix)"
    ctx = shape("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if ctx and ctx[1] != 768:
        return f"an SD variant with {ctx[1]}-wide text conditioning"
    if in_w[0] != 320:
        return f"an SD variant with {in_w[0]} base channels"
    if not any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "SD1.5 without a text encoder"
    return "SD1.5"
