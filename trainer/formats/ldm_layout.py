"""SD1.5-family components in the original (LDM / CompVis) single-file key layout.

ComfyUI's model classes take this layout: the node pack builds ComfyUI's MODEL, CLIP and VAE for the built-in
models from it, and the tests write random-weight full-size SD1.5 checkpoints with it. The mapping is written
from the two architectures' module structure (UNet `input_blocks` / `middle_block` / `output_blocks`, VAE
`down` / `mid` / `up`) and holds for any number of levels and layers per block.
"""

from __future__ import annotations

import re

from ..base_models.components import text_model_path
from ..files.atomic import atomic_save

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet_tail(tail: str) -> str:
    head, _, rest = tail.partition(".")
    return f"{_RESNET[head]}.{rest}" if head in _RESNET else tail


def unet_key_to_ldm(key: str, layers_per_block: int, attn_up_blocks: set[int]) -> str:
    """Map one diffusers UNet2DConditionModel key to its LDM name (without the prefix)."""
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for src, dst in fixed.items():
        if key.startswith(src + "."):
            return dst + key[len(src) :]
    per_down = layers_per_block + 1
    per_up = layers_per_block + 1
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        idx = per_down * i + j + 1
        return f"input_blocks.{idx}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"input_blocks.{idx}.1.{tail}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{per_down * (int(m[1]) + 1)}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, j, tail = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{tail}"
        return f"middle_block.{2 * j}.{_resnet_tail(tail)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        idx = per_up * i + j
        return f"output_blocks.{idx}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"output_blocks.{idx}.1.{tail}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        i = int(m[1])
        slot = 2 if i in attn_up_blocks else 1
        return f"output_blocks.{per_up * i + layers_per_block}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_to_ldm(key: str, num_blocks: int) -> tuple[str, bool]:
    """Map a diffusers AutoencoderKL key to LDM; the flag says a linear weight must become a 1x1 conv."""

    def resnet(tail: str) -> str:
        head, _, rest = tail.partition(".")
        return f"{_VAE_RESNET.get(head, head)}.{rest}"

    def attn(tail: str) -> tuple[str, bool]:
        for src, dst in _VAE_ATTN.items():
            if tail.startswith(src + "."):
                rest = tail[len(src) + 1 :]
                return f"{dst}.{rest}", src != "group_norm" and rest == "weight"
        raise KeyError(key)

    for part in ("encoder", "decoder"):
        if not key.startswith(part + "."):
            continue
        tail = key[len(part) + 1 :]
        if tail.startswith("conv_norm_out."):
            return f"{part}.norm_out.{tail[len('conv_norm_out.') :]}", False
        if tail.startswith(("conv_in.", "conv_out.")):
            return key, False
        m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", tail)
        if m:
            return f"{part}.mid.block_{int(m[1]) + 1}.{resnet(m[2])}", False
        m = re.match(r"mid_block\.attentions\.0\.(.*)", tail)
        if m:
            name, conv = attn(m[1])
            return f"{part}.mid.attn_1.{name}", conv
        m = re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", tail)
        if m:
            return f"{part}.down.{m[1]}.block.{m[2]}.{resnet(m[3])}", False
        m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", tail)
        if m:
            return f"{part}.down.{m[1]}.downsample.conv.{m[2]}", False
        m = re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", tail)
        if m:
            return f"{part}.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}", False
        m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", tail)
        if m:
            return f"{part}.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key, False
    raise KeyError(f"no LDM name for VAE key {key}")


def to_ldm_state_dict(unet_sd: dict, vae_sd: dict, text_sd: dict, unet_config: dict, vae_config: dict) -> dict:
    """Combine diffusers-layout state dicts into one LDM-layout state dict."""
    layers = unet_config["layers_per_block"]
    attn_up = {i for i, t in enumerate(unet_config["up_block_types"]) if "CrossAttn" in t}
    out = {}
    for k, v in unet_sd.items():
        out[UNET_PREFIX + unet_key_to_ldm(k, layers, attn_up)] = v
    nblocks = len(vae_config["block_out_channels"])
    for k, v in vae_sd.items():
        name, conv = vae_key_to_ldm(k, nblocks)
        out[VAE_PREFIX + name] = v[:, :, None, None] if conv and v.ndim == 2 else v
    for k, v in text_sd.items():
        out[TEXT_PREFIX + text_model_path(k)] = v
    return out


def split_ldm_state_dict(sd: dict) -> dict[str, dict]:
    """{"unet", "vae", "text"}: each component's LDM keys without the single-file prefix; other keys dropped
    (a checkpoint may hold e.g. ComfyUI's `v_pred` marker)."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text": TEXT_PREFIX}
    return {part: {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)} for part, p in prefixes.items()}


def write_ldm_checkpoint(
    path,
    unet_sd: dict,
    vae_sd: dict,
    text_sd: dict,
    unet_config: dict,
    vae_config: dict,
    metadata: dict | None = None,
    extra: dict | None = None,
) -> None:
    """`extra`: tensors stored as they are, e.g. ComfyUI's empty `v_pred` marker."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in to_ldm_state_dict(unet_sd, vae_sd, text_sd, unet_config, vae_config).items()}
    sd.update(extra or {})
    atomic_save(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata or {}))
