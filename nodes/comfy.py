"""The only module that touches ComfyUI (comfy.*, folder_paths, server), and only inside functions.

Tests replace these functions with a stand-in; nothing else in the pack imports ComfyUI.
"""

from __future__ import annotations

import os


# --------------------------------------------------------------------------- folders
def filename_list(kind: str) -> list[str]:
    import folder_paths

    return list(folder_paths.get_filename_list(kind))


def full_path(kind: str, name: str) -> str | None:
    import folder_paths

    return folder_paths.get_full_path(kind, name)


def folder_paths_for(kind: str) -> list[str]:
    import folder_paths

    return list(folder_paths.get_folder_paths(kind))


def input_directory() -> str:
    import folder_paths

    return folder_paths.get_input_directory()


def output_directory() -> str:
    import folder_paths

    return folder_paths.get_output_directory()


def dreamloom_directory() -> str:
    """<ComfyUI output>/dreamloom: run dirs, class-image cache, saved IMAGE batches."""
    return os.path.join(output_directory(), "dreamloom")


# --------------------------------------------------------------------------- progress and interrupt
def progress_bar(total: int, node_id=None):
    import comfy.utils

    return comfy.utils.ProgressBar(total, node_id=node_id)


def interrupt_requested() -> bool:
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def raise_interrupt() -> None:
    """Raise ComfyUI's own interrupt exception, so the UI shows 'interrupted', not 'failed'."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()
    raise mm.InterruptProcessingException()


def free_memory() -> None:
    """Unload ComfyUI's models and empty the CUDA cache, so the training worker has the VRAM."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


# --------------------------------------------------------------------------- LoRA patching
def lora_key_map(model, clip) -> dict:
    import comfy.lora

    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def weight_shapes(model, clip) -> dict:
    """Weight key (as lora_key_map names them) -> shape, for the model's and the CLIP's layers."""
    shapes = {}
    if model is not None:
        shapes.update({k: tuple(v.shape) for k, v in model.model.state_dict().items()})
    if clip is not None:
        shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()})
    return shapes


def clip_embedding_widths(clip) -> dict[str, int]:
    """The token-embedding width each of the CLIP's text encoders takes (clip_l: 768 for SD1.5), by key."""
    widths = {}
    for tokenizer in vars(clip.tokenizer).values():
        if hasattr(tokenizer, "embedding_size") and hasattr(tokenizer, "embedding_key"):
            widths[tokenizer.embedding_key] = int(tokenizer.embedding_size)
    return widths


def embedding_path(name: str) -> str | None:
    """The file ComfyUI would load for `embedding:<name>` (it tries the name, then .safetensors, .pt, .bin)."""
    for candidate in (name, name + ".safetensors", name + ".pt", name + ".bin"):
        found = full_path("embeddings", candidate)
        if found and os.path.isfile(found):
            return found
    return None


def apply_lora(model, clip, lora: dict, strength_model: float, strength_clip: float):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


# --------------------------------------------------------------------------- sampling and saving
def sample_with_noise(model, positive, negative, cfg: float, sampler, sigmas, noise, latent_samples, seed: int):
    """One SamplerCustomAdvanced-style run (CFG guider) on a given noise batch; returns latent samples."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    latent_samples = comfy.sample.fix_empty_latent_channels(model, latent_samples)
    out = guider.sample(
        noise, latent_samples, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=True, seed=seed
    )
    return out.to(comfy.model_management.intermediate_device())


def vae_latent_geometry(vae) -> tuple[int, int]:
    """(pixels per latent cell, latent channels) of a ComfyUI VAE."""
    ratio = vae.spacial_compression_encode()
    return (ratio if isinstance(ratio, int) else 8), int(getattr(vae, "latent_channels", 4))


def vae_decode(vae, samples):
    return vae.decode(samples)


def save_path(prefix: str, width: int, height: int):
    """(folder, file stem, subfolder) for a new output file, as ComfyUI's save nodes pick them."""
    import folder_paths

    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), width, height
    )
    return folder, f"{filename}_{counter:05}_", subfolder


# --------------------------------------------------------------------------- built-in models as MODEL, CLIP, VAE
def load_checkpoint_file(path: str):
    """(MODEL, CLIP, VAE) from a checkpoint file, exactly as core Load Checkpoint makes them."""
    import comfy.sd
    import folder_paths

    out = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
    )
    return out[:3]


def _set_group_norm_groups(module, groups: int) -> None:
    # ComfyUI's UNet and VAE classes build every GroupNorm with 32 groups; the built-in models use fewer. The
    # parameters have the same shapes either way, so the group count is set on the built modules.
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.num_groups = groups


def _strict_load(module, state: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:  # a built-in model that does not fit ComfyUI's class is our bug: say so, loudly
        raise RuntimeError(
            f"DreamLoom: the built-in {what} does not fit ComfyUI's class: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def builtin_unet(comps, state: dict):
    """The built-in UNet as ComfyUI's SD1.5 model class (UNetModel) with the config its weights imply."""
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comps.unet.config
    unet_config = comfy.model_detection.detect_unet_config(state, "")
    heads = cfg.num_attention_heads or cfg.attention_head_dim  # diffusers calls SD1.5's head count attention_head_dim

    class LatentFormat(comfy.latent_formats.SD15):
        def __init__(self):
            super().__init__(scale_factor=comps.vae.config.scaling_factor)
            self.latent_rgb_factors = None  # SD1.5's preview colours do not apply to these latents
            self.taesd_decoder_name = None

    class ModelConfig(comfy.supported_models.SD15):
        unet_extra_config = {"num_heads": heads, "num_head_channels": -1}
        latent_format = LatentFormat

    model_config = ModelConfig(unet_config)
    load_device = mm.get_torch_device()
    dtype = mm.unet_dtype(
        model_params=comps.unet.num_parameters(), supported_dtypes=model_config.supported_inference_dtypes
    )
    model_config.set_inference_dtype(
        dtype, mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    )
    model = model_config.get_model({}, "")
    _strict_load(model.diffusion_model, state, "UNet")
    _set_group_norm_groups(model.diffusion_model, cfg.norm_num_groups)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def builtin_clip(comps, state: dict):
    """The built-in text encoder as ComfyUI's SD1 CLIP, with a tokenizer that checks embeddings at its width."""
    import functools

    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import folder_paths

    cfg = comps.text_encoder.config
    config = {
        k: getattr(cfg, k)
        for k in (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "hidden_act",
            "max_position_embeddings",
            "eos_token_id",
            "vocab_size",
            "projection_dim",
        )
    }
    tokenizer = functools.partial(comfy.sd1_clip.SDTokenizer, embedding_size=cfg.hidden_size, embedding_key="clip_l")
    target = comfy.supported_models_base.ClipTarget(
        functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=tokenizer),
        functools.partial(
            comfy.sd1_clip.SD1ClipModel,
            clip_model=functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=config),
        ),
    )
    clip = comfy.sd.CLIP(
        target,
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        parameters=comps.text_encoder.num_parameters(),
    )
    missing, unexpected = clip.load_sd({"clip_l.transformer." + k: v for k, v in state.items()}, full_model=True)
    # CLIP-L's projection and logit scale are for image-text matching; SD1 checkpoints do not carry them either
    missing = [k for k in missing if not k.endswith((".logit_scale", ".transformer.text_projection.weight"))]
    if missing or unexpected:
        raise RuntimeError(
            f"DreamLoom: the built-in text encoder does not fit ComfyUI's CLIP: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return clip


def builtin_vae(comps, state: dict):
    """The built-in VAE as ComfyUI's VAE (its AutoencoderKL), with the built-in model's down-scaling factor."""
    import comfy.sd

    cfg = comps.vae.config
    channels = list(cfg.block_out_channels)
    ddconfig = {
        "double_z": True,
        "z_channels": cfg.latent_channels,
        "resolution": cfg.sample_size,
        "in_channels": 3,
        "out_ch": 3,
        "ch": channels[0],
        "ch_mult": [c // channels[0] for c in channels],
        "num_res_blocks": cfg.layers_per_block,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    vae = comfy.sd.VAE(sd=dict(state), config={"params": {"embed_dim": cfg.latent_channels, "ddconfig": ddconfig}})
    _strict_load(vae.first_stage_model, state, "VAE")
    _set_group_norm_groups(vae.first_stage_model, cfg.norm_num_groups)
    vae.downscale_ratio = vae.upscale_ratio = 2 ** (len(channels) - 1)
    vae.latent_channels = cfg.latent_channels
    return vae


def load_builtin(comps):
    """(MODEL, CLIP, VAE) for a built-in model's diffusers components, in ComfyUI's own classes."""
    from ..trainer.formats.ldm_layout import split_ldm_state_dict, to_ldm_state_dict

    parts = split_ldm_state_dict(
        to_ldm_state_dict(
            comps.unet.state_dict(),
            comps.vae.state_dict(),
            comps.text_encoder.state_dict(),
            dict(comps.unet.config),
            dict(comps.vae.config),
        )
    )
    return builtin_unet(comps, parts["unet"]), builtin_clip(comps, parts["text"]), builtin_vae(comps, parts["vae"])
