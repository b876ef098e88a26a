"""SD1.5 and SDXL components in the original (LDM / CompVis, and Stability's "sgm") single-file key layout.

ComfyUI's model classes take this layout: the node pack builds ComfyUI's MODEL, CLIP and VAE for the built-in
models from it, and the tests write random-weight full-size SD1.5 and SDXL checkpoints with it. The mapping is
written from the two architectures' module structure (UNet `input_blocks` / `middle_block` / `output_blocks`, VAE
`down` / `mid` / `up`) and holds for any number of levels, layers per block and transformer blocks per level.

SDXL's single file holds the UNet under `model.diffusion_model.` (its `add_embedding` is `label_emb.0`), the VAE
under `first_stage_model.`, CLIP ViT-L under `conditioner.embedders.0.transformer.` in the Hugging Face layout and
OpenCLIP ViT-bigG under `conditioner.embedders.1.model.` in OpenCLIP's own layout (fused q/k/v, `text_projection`
as the transpose of Hugging Face's, a `logit_scale`). Kohya names an SDXL UNet's LoRA modules by their LDM path
(`lora_unet_input_blocks_4_1_...`): `unet_module_to_ldm` and `ldm_module_to_unet` convert module names both ways.
"""

from __future__ import annotations

import math
import re

import torch

from ..base_models.components import text_model_path
from ..files.atomic import atomic_save
from .kohya_names import kohya_module_name

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."  # CLIP ViT-L, Hugging Face layout
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG, OpenCLIP layout
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."  # the refiner's only text encoder (OpenCLIP bigG)
OPEN_CLIP_LOGIT_SCALE = math.log(100.0)  # what real SDXL files hold (OpenCLIP clamps the trained scale at 100)

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


_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL: pooled text + size/crop conditioning
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",  # class_embed_type "projection" (the same LDM module)
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_key_to_ldm(key: str, layers_per_block: int, attn_up_blocks: set[int]) -> str:
    """Map one diffusers UNet2DConditionModel key to its LDM name (without the prefix)."""
    for src, dst in _UNET_FIXED.items():
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


def _unet_layout(unet_config: dict) -> tuple[int, set[int]]:
    """(layers per block, indices of the up blocks with attention): what the LDM numbering depends on."""
    layers = unet_config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"the LDM layout needs one layers_per_block for every level, not {layers}")
    return layers, {i for i, t in enumerate(unet_config["up_block_types"]) if "CrossAttn" in t}


def unet_to_ldm(unet_sd: dict, unet_config: dict) -> dict:
    """A diffusers UNet2DConditionModel state dict in LDM names (without `model.diffusion_model.`)."""
    layers, attn_up = _unet_layout(unet_config)
    return {unet_key_to_ldm(k, layers, attn_up): v for k, v in unet_sd.items()}


_RESNET_BACK = {v: k for k, v in _RESNET.items()}


def _resnet_tail_back(tail: str) -> str:
    for src, dst in _RESNET_BACK.items():
        if tail.startswith(src + "."):
            return dst + tail[len(src) :]
    return tail


def ldm_key_to_unet(key: str, unet_config: dict) -> str:
    """The inverse of `unet_key_to_ldm`: one LDM UNet key (without the prefix) -> its diffusers name."""
    layers, attn_up = _unet_layout(unet_config)
    per = layers + 1
    label = "add_embedding" if unet_config.get("addition_embed_type") == "text_time" else "class_embedding"
    fixed = {dst: src for src, dst in _UNET_FIXED.items() if not src.startswith(("add_emb", "class_emb"))}
    fixed.update({"label_emb.0.0": f"{label}.linear_1", "label_emb.0.2": f"{label}.linear_2"})
    for src, dst in fixed.items():
        if key.startswith(src + "."):
            return dst + key[len(src) :]
    m = re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", key)
    if m and int(m[1]) > 0:
        idx, slot, tail = int(m[1]), int(m[2]), m[3]
        if slot == 0 and tail.startswith("op.") and idx % per == 0:
            return f"down_blocks.{idx // per - 1}.downsamplers.0.conv.{tail[3:]}"
        i, j = divmod(idx - 1, per)
        if j < layers:
            kind = "resnets" if slot == 0 else "attentions"
            return f"down_blocks.{i}.{kind}.{j}.{_resnet_tail_back(tail) if slot == 0 else tail}"
    m = re.fullmatch(r"middle_block\.([012])\.(.+)", key)
    if m:
        n, tail = int(m[1]), m[2]
        if n == 1:
            return f"mid_block.attentions.0.{tail}"
        return f"mid_block.resnets.{n // 2}.{_resnet_tail_back(tail)}"
    m = re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", key)
    if m:
        idx, slot, tail = int(m[1]), int(m[2]), m[3]
        i, j = divmod(idx, per)
        if slot == 0:
            return f"up_blocks.{i}.resnets.{j}.{_resnet_tail_back(tail)}"
        upsampler_slot = 2 if i in attn_up else 1
        if slot == upsampler_slot and j == layers and tail.startswith("conv."):
            return f"up_blocks.{i}.upsamplers.0.{tail}"
        if slot == 1 and i in attn_up:
            return f"up_blocks.{i}.attentions.{j}.{tail}"
    raise KeyError(f"no diffusers name for LDM UNet key {key}")


def unet_from_ldm(ldm_sd: dict, unet_config: dict) -> dict:
    """An LDM UNet state dict (without `model.diffusion_model.`) in diffusers names."""
    return {ldm_key_to_unet(k, unet_config): v for k, v in ldm_sd.items()}


def unet_module_to_ldm(module: str, unet_config: dict) -> str:
    """A diffusers UNet module path -> its LDM module path (no `.weight`), for modules with parameters; in SDXL
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` is
    `input_blocks.4.1.transformer_blocks.0.attn1.to_q`."""
    layers, attn_up = _unet_layout(unet_config)
    return unet_key_to_ldm(module + ".weight", layers, attn_up).removesuffix(".weight")


def ldm_unet_layout(keys) -> dict:
    """The part of a diffusers UNet config that the LDM numbering depends on (`layers_per_block`, `up_block_types`
    and SDXL's `addition_embed_type`), read from an LDM UNet's key names (without `model.diffusion_model.`): enough
    for `ldm_key_to_unet` when a single file comes without its config (a fine-tune of unknown size)."""
    inputs, downsamplers, outputs, attention_out = set(), set(), set(), set()
    label = False
    for key in keys:
        label = label or key.startswith("label_emb.")
        m = re.match(r"(input|output)_blocks\.(\d+)\.(\d+)\.(.*)", key)
        if not m:
            continue
        idx, slot, tail = int(m[2]), int(m[3]), m[4]
        if m[1] == "input":
            inputs.add(idx)
            if slot == 0 and tail.startswith("op."):
                downsamplers.add(idx)
        else:
            outputs.add(idx)
            if slot == 1 and not tail.startswith("conv."):  # slot 1 holds attention, or the upsampler's conv
                attention_out.add(idx)
    if not outputs:
        raise ValueError("no LDM UNet keys (input_blocks / output_blocks) found")
    layers = min(downsamplers) - 1 if downsamplers else max(inputs)
    levels = (max(outputs) + 1) // (layers + 1)
    attn_levels = {idx // (layers + 1) for idx in attention_out}
    config = {
        "layers_per_block": layers,
        "up_block_types": ["CrossAttnUpBlock2D" if i in attn_levels else "UpBlock2D" for i in range(levels)],
    }
    if label:
        config["addition_embed_type"] = "text_time"
    return config


def ldm_module_to_unet(path: str, unet_config: dict) -> str:
    """The inverse of `unet_module_to_ldm`: an LDM UNet module path -> the diffusers module path."""
    return ldm_key_to_unet(path + ".weight", unet_config).removesuffix(".weight")


def kohya_ldm_unet_name(module: str, unet_config: dict) -> str:
    """The kohya (sd-scripts) SDXL LoRA name of a diffusers UNet module: its LDM path, dots as underscores,
    e.g. `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`."""
    return kohya_module_name("lora_unet_", unet_module_to_ldm(module, unet_config))


def kohya_ldm_unet_table(modules, unet_config: dict) -> dict[str, str]:
    """{kohya SDXL LoRA name: diffusers module path} for the given diffusers module paths: a kohya name cannot be
    split back into a path by itself (`transformer_blocks`, `in_layers`), so imports look names up here."""
    table = {}
    for module in modules:
        name = kohya_ldm_unet_name(module, unet_config)
        if table.setdefault(name, module) != module:
            raise ValueError(f"{module} and {table[name]} share the kohya name {name}")
    return table


def vae_to_ldm(vae_sd: dict, vae_config: dict) -> dict:
    """A diffusers AutoencoderKL state dict in LDM names (without `first_stage_model.`); attention projections
    become 1x1 convolutions."""
    nblocks = len(vae_config["block_out_channels"])
    out = {}
    for k, v in vae_sd.items():
        name, conv = vae_key_to_ldm(k, nblocks)
        out[name] = v[:, :, None, None] if conv and v.ndim == 2 else v
    return out


_VAE_ATTN_BACK = {v: k for k, v in _VAE_ATTN.items()}


def ldm_key_to_vae(key: str, num_blocks: int) -> tuple[str, bool]:
    """The inverse of `vae_key_to_ldm`; the flag says a 1x1 conv weight must become a linear weight."""

    def resnet(tail: str) -> str:
        return "conv_shortcut" + tail[len("nin_shortcut") :] if tail.startswith("nin_shortcut.") else tail

    def attn(tail: str) -> tuple[str, bool]:
        name, _, rest = tail.partition(".")
        if name not in _VAE_ATTN_BACK:
            raise KeyError(f"no diffusers name for LDM VAE key {key}")
        return f"{_VAE_ATTN_BACK[name]}.{rest}", name != "norm" and rest == "weight"

    for part in ("encoder", "decoder"):
        if not key.startswith(part + "."):
            continue
        tail = key[len(part) + 1 :]
        if tail.startswith("norm_out."):
            return f"{part}.conv_norm_out.{tail[len('norm_out.') :]}", False
        if tail.startswith(("conv_in.", "conv_out.")):
            return key, False
        m = re.fullmatch(r"mid\.block_(\d+)\.(.+)", tail)
        if m:
            return f"{part}.mid_block.resnets.{int(m[1]) - 1}.{resnet(m[2])}", False
        m = re.fullmatch(r"mid\.attn_1\.(.+)", tail)
        if m:
            name, linear = attn(m[1])
            return f"{part}.mid_block.attentions.0.{name}", linear
        m = re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(.+)", tail)
        if m:
            return f"{part}.down_blocks.{m[1]}.resnets.{m[2]}.{resnet(m[3])}", False
        m = re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(.+)", tail)
        if m:
            return f"{part}.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}", False
        m = re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(.+)", tail)
        if m:
            return f"{part}.up_blocks.{num_blocks - 1 - int(m[1])}.resnets.{m[2]}.{resnet(m[3])}", False
        m = re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(.+)", tail)
        if m:
            return f"{part}.up_blocks.{num_blocks - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}", False
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key, False
    raise KeyError(f"no diffusers name for LDM VAE key {key}")


def vae_from_ldm(ldm_sd: dict, vae_config: dict) -> dict:
    """An LDM VAE state dict (without `first_stage_model.`) in diffusers names."""
    nblocks = len(vae_config["block_out_channels"])
    out = {}
    for k, v in ldm_sd.items():
        name, linear = ldm_key_to_vae(k, nblocks)
        out[name] = v[:, :, 0, 0] if linear and v.ndim == 4 else v
    return out


def to_ldm_state_dict(unet_sd: dict, vae_sd: dict, text_sd: dict, unet_config: dict, vae_config: dict) -> dict:
    """Combine SD1.5 diffusers-layout state dicts into one LDM-layout state dict."""
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet_sd, unet_config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae_sd, vae_config).items()})
    for k, v in text_sd.items():
        out[TEXT_PREFIX + text_model_path(k)] = v
    return out


def split_ldm_state_dict(sd: dict) -> dict[str, dict]:
    """{"unet", "vae", "text"}: each component's LDM keys without the single-file prefix; other keys dropped
    (a checkpoint may hold e.g. ComfyUI's `v_pred` marker)."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text": TEXT_PREFIX}
    return {part: {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)} for part, p in prefixes.items()}


def _save(path, sd: dict, metadata: dict | None, extra: dict | None) -> None:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in sd.items()}
    sd.update(extra or {})
    atomic_save(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata or {}))


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
    _save(path, to_ldm_state_dict(unet_sd, vae_sd, text_sd, unet_config, vae_config), metadata, extra)


# OpenCLIP's text tower (SDXL's second text encoder) <-> Hugging Face CLIPTextModelWithProjection.
_OPEN_CLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPEN_CLIP_DROPPED = ("logit_scale", "attn_mask")  # not weights of the text model: CLIP's loss scale, a buffer


def open_clip_from_hf(hf_sd: dict, logit_scale: float | torch.Tensor | None = OPEN_CLIP_LOGIT_SCALE) -> dict:
    """A CLIPTextModelWithProjection state dict (with or without `text_model.`) in OpenCLIP's layout: q/k/v fused
    into `attn.in_proj_*` in that order, `text_projection` as the [width, projection] matrix OpenCLIP multiplies by
    (Hugging Face's `text_projection.weight` transposed), and `logit_scale` (a scalar, as real SDXL files have;
    None leaves it out; a float is stored in the text projection's dtype)."""
    out, qkv = {}, {}
    for key, v in hf_sd.items():
        if key == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
            continue
        k = text_model_path(key)
        if k == "text_model.embeddings.position_ids":
            continue
        if k in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[k]] = v
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        if m and m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2][len("self_attn.")]] = v
            continue
        if m and m[2] in _OPEN_CLIP_LAYER:
            out[f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = v
            continue
        raise KeyError(f"no OpenCLIP name for text encoder key {key}")
    for (i, param), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyError(f"layer {i} lacks one of q/k/v_proj.{param}")
        out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if logit_scale is not None and out:
        if not isinstance(logit_scale, torch.Tensor):
            ref = out.get("text_projection", next(iter(out.values())))
            logit_scale = torch.full((), float(logit_scale), dtype=ref.dtype, device=ref.device)
        out["logit_scale"] = logit_scale
    return out


def hf_from_open_clip(oc_sd: dict) -> dict:
    """The inverse of `open_clip_from_hf`: OpenCLIP text-tower keys (without the single-file prefix) -> a
    CLIPTextModelWithProjection state dict with `text_model.` (see base_models.components.match_text_model_level);
    `logit_scale` and `attn_mask` are dropped."""
    fixed = {v: k for k, v in _OPEN_CLIP_FIXED.items()}
    layer = {v: k for k, v in _OPEN_CLIP_LAYER.items()}
    out = {}
    for k, v in oc_sd.items():
        if k in _OPEN_CLIP_DROPPED:
            continue
        if k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
            continue
        if k in fixed:
            out[fixed[k]] = v
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", k)
        if m and m[2] in layer:
            out[f"text_model.encoder.layers.{m[1]}.{layer[m[2]]}.{m[3]}"] = v
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k)
        if m:
            for name, part in zip("qkv", v.chunk(3)):
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part.clone()
            continue
        raise KeyError(f"no Hugging Face name for OpenCLIP key {k}")
    return out


def to_sdxl_ldm_state_dict(
    unet_sd: dict,
    vae_sd: dict,
    text_sd: dict,
    text_2_sd: dict,
    unet_config: dict,
    vae_config: dict,
    logit_scale: float | torch.Tensor | None = OPEN_CLIP_LOGIT_SCALE,
) -> dict:
    """Combine SDXL's diffusers-layout state dicts (UNet, VAE, CLIPTextModel, CLIPTextModelWithProjection) into
    one single-file state dict in the original (sgm) layout, as sd_xl_base_1.0.safetensors has it."""
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet_sd, unet_config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae_sd, vae_config).items()})
    for k, v in text_sd.items():
        out[SDXL_TEXT_PREFIX + text_model_path(k)] = v
    for k, v in open_clip_from_hf(text_2_sd, logit_scale).items():
        out[SDXL_TEXT_2_PREFIX + k] = v
    return out


def split_sdxl_state_dict(sd: dict) -> dict[str, dict]:
    """{"unet", "vae", "text", "text_2"}: an SDXL single file's components in their original names without the
    single-file prefix (UNet and VAE in LDM names, `text` in Hugging Face's CLIP layout, `text_2` in OpenCLIP's);
    other keys dropped."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text": SDXL_TEXT_PREFIX, "text_2": SDXL_TEXT_2_PREFIX}
    return {part: {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)} for part, p in prefixes.items()}


def from_sdxl_ldm_state_dict(sd: dict, unet_config: dict, vae_config: dict) -> dict[str, dict]:
    """The inverse of `to_sdxl_ldm_state_dict`: {"unet", "vae", "text", "text_2"} as diffusers / Hugging Face
    state dicts (`text` and `text_2` with `text_model.`; CLIP-L's `position_ids`, if stored, dropped)."""
    parts = split_sdxl_state_dict(sd)
    text = {k: v for k, v in parts["text"].items() if not k.endswith("embeddings.position_ids")}
    return {
        "unet": unet_from_ldm(parts["unet"], unet_config),
        "vae": vae_from_ldm(parts["vae"], vae_config),
        "text": text,
        "text_2": hf_from_open_clip(parts["text_2"]),
    }


def write_sdxl_checkpoint(
    path,
    unet_sd: dict,
    vae_sd: dict,
    text_sd: dict,
    text_2_sd: dict,
    unet_config: dict,
    vae_config: dict,
    metadata: dict | None = None,
    extra: dict | None = None,
    logit_scale: float | torch.Tensor | None = OPEN_CLIP_LOGIT_SCALE,
) -> None:
    """An SDXL single-file checkpoint (original layout), written atomically; `extra`: tensors stored as they are."""
    sd = to_sdxl_ldm_state_dict(unet_sd, vae_sd, text_sd, text_2_sd, unet_config, vae_config, logit_scale)
    _save(path, sd, metadata, extra)
