"""Which model family an original-layout (LDM) checkpoint belongs to, from its tensor names and shapes.

diffusers has `single_file_utils.infer_diffusers_model_type`, but it answers "v1" for any layout it does not
know (a LoRA, SD3, Flux), so a wrong file would be loaded as SD1.5; this check names what it sees instead.
"""

from __future__ import annotations


def detect_family(header: dict) -> str:
    """Name the model family of an LDM-layout checkpoint from its tensor names and shapes."""
    keys = header.keys()

    def shape(k):
        return header.get(k, {}).get("shape")

    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "SDXL"
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
