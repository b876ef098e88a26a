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


def free_memory() -> str | None:
    """Unload ComfyUI's models and empty the CUDA cache, so the training worker has the VRAM. Returns a note when
    ComfyUI keeps its models on the GPU anyway: with --highvram or --gpu-only, "unloading" moves them to the GPU."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()
    if mm.vram_state != mm.VRAMState.HIGH_VRAM:
        return None
    import torch

    held = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    if held < 0.25:
        return None
    return (
        f"ComfyUI runs with --highvram or --gpu-only, so its models stay on the GPU while DreamLoom trains "
        f"({held:.1f} GiB). Training chooses its settings for the VRAM left; start ComfyUI without those flags "
        "to give it the whole card."
    )


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


def model_family(model) -> str | None:
    """The family of a MODEL of ComfyUI's classes: SDXL, SD1.5, SD2 or SDXL refiner (as DreamLoom names them); None
    for others, and outside ComfyUI (where tests stand in for the model)."""
    try:
        import comfy.model_base
        import comfy.supported_models
    except ImportError:
        return None
    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    if isinstance(inner, comfy.model_base.SDXL):
        return "SDXL"
    if isinstance(inner, comfy.model_base.SDXLRefiner):
        return "SDXL refiner"
    if isinstance(config, comfy.supported_models.SD15):
        return "SD1.5"
    if isinstance(config, comfy.supported_models.SD20):
        return "SD2"
    return None


def clip_embedding_widths(clip) -> dict[str, int]:
    """The token-embedding width each of the CLIP's text encoders takes, by embedding key: {"clip_l": 768} for SD1.5,
    {"clip_l": 768, "clip_g": 1280} for SDXL, {"clip_h": 1024} for SD2."""
    widths = {}
    for tokenizer in getattr(getattr(clip, "tokenizer", None), "__dict__", {}).values():
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


def _unet_heads(cfg) -> dict:
    """ComfyUI's UNetModel takes one head count or one head width for every attention level; which one the
    built-in model keeps constant (diffusers calls SD1.5's and SDXL's head count attention_head_dim)."""
    heads = cfg.num_attention_heads or cfg.attention_head_dim
    channels = list(cfg.block_out_channels)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    levels = [i for i, kind in enumerate(cfg.down_block_types) if "CrossAttn" in kind] + [len(channels) - 1]
    counts = {heads[i] for i in levels}
    widths = {channels[i] // heads[i] for i in levels}
    if len(counts) == 1:
        return {"num_heads": counts.pop(), "num_head_channels": -1}
    if len(widths) == 1:
        return {"num_heads": -1, "num_head_channels": widths.pop()}
    raise RuntimeError(f"DreamLoom: ComfyUI's UNet cannot take {heads} heads on {channels} channels")


def _model_patcher(model_config, state: dict, cfg, num_parameters: int):
    """ComfyUI's model for `model_config` (at the dtype ComfyUI picks), the UNet weights loaded, as a MODEL."""
    import comfy.model_management as mm
    import comfy.model_patcher

    load_device = mm.get_torch_device()
    dtype = mm.unet_dtype(model_params=num_parameters, supported_dtypes=model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(
        dtype, mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    )
    model = model_config.get_model({}, "")
    _strict_load(model.diffusion_model, state, "UNet")
    _set_group_norm_groups(model.diffusion_model, cfg.norm_num_groups)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def _latent_format(base, scale_factor: float):
    """`base` (ComfyUI's SD15 or SDXL latent format) with the built-in VAE's scale and no preview colours or TAESD
    decoder (those of the real VAEs do not apply to these latents)."""

    class LatentFormat(base):
        def __init__(self):
            base.__init__(self)
            self.scale_factor = scale_factor
            self.latent_rgb_factors = self.latent_rgb_factors_bias = None
            self.taesd_decoder_name = None

    return LatentFormat


def builtin_unet(comps, state: dict):
    """The built-in SD1.5-family UNet as ComfyUI's SD1.5 model class (UNetModel) with the config its weights imply."""
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.supported_models

    cfg = comps.unet.config

    class ModelConfig(comfy.supported_models.SD15):
        unet_extra_config = _unet_heads(cfg)
        latent_format = _latent_format(comfy.latent_formats.SD15, comps.vae.config.scaling_factor)

    model_config = ModelConfig(comfy.model_detection.detect_unet_config(state, ""))
    return _model_patcher(model_config, state, cfg, comps.unet.num_parameters())


def builtin_sdxl_unet(comps, state: dict):
    """The built-in SDXL UNet as ComfyUI's SDXL model (model_base.SDXL: its `y` vector is the pooled text embedding
    and the six size/crop ids, each embedded addition_time_embed_dim wide, where real SDXL uses 256)."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_detection
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

    cfg = comps.unet.config

    class Model(comfy.model_base.SDXL):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.embedder = Timestep(cfg.addition_time_embed_dim)

    class ModelConfig(comfy.supported_models.SDXL):
        unet_extra_config = _unet_heads(cfg)
        latent_format = _latent_format(comfy.latent_formats.SDXL, comps.vae.config.scaling_factor)

        def get_model(self, state_dict, prefix="", device=None):
            return Model(self, model_type=self.model_type(state_dict, prefix), device=device)

    model_config = ModelConfig(comfy.model_detection.detect_unet_config(state, ""))
    return _model_patcher(model_config, state, cfg, comps.unet.num_parameters())


CLIP_CONFIG_KEYS = (
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
# CLIP-L's projection and logit scale are for image-text matching; SD1.5 and SDXL files do not carry CLIP-L's
NOT_IN_CHECKPOINTS = (".logit_scale", "clip_l.transformer.text_projection.weight")


def _clip_config(text_encoder) -> dict:
    return {k: getattr(text_encoder.config, k) for k in CLIP_CONFIG_KEYS}


def _clip(target, comps, state: dict):
    """ComfyUI's CLIP for `target`, loaded with `state` (keys as ComfyUI's text encoder classes name them)."""
    import comfy.sd
    import folder_paths
    import torch

    clip = comfy.sd.CLIP(
        target,
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        parameters=sum(m.num_parameters() for m in comps.text_encoders().values()),
        # ComfyUI keeps text encoders in fp16 on a CPU; the built-in models' few weights stay fp32, so prompts
        # encode exactly as in the trainer (tiny-sdxl's random fp32 weights would otherwise be rounded)
        model_options={"dtype": torch.float32},
    )
    missing, unexpected = clip.load_sd(state, full_model=True)
    missing = [k for k in missing if not k.endswith(NOT_IN_CHECKPOINTS)]
    if missing or unexpected:
        raise RuntimeError(
            f"DreamLoom: the built-in text encoder does not fit ComfyUI's CLIP: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return clip


def builtin_clip(comps, state: dict):
    """The built-in text encoder as ComfyUI's SD1 CLIP, with a tokenizer that checks embeddings at its width."""
    import functools

    import comfy.sd1_clip
    import comfy.supported_models_base

    width = comps.text_encoder.config.hidden_size
    tokenizer = functools.partial(comfy.sd1_clip.SDTokenizer, embedding_size=width, embedding_key="clip_l")
    target = comfy.supported_models_base.ClipTarget(
        functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=tokenizer),
        functools.partial(
            comfy.sd1_clip.SD1ClipModel,
            clip_model=functools.partial(
                comfy.sd1_clip.SDClipModel, textmodel_json_config=_clip_config(comps.text_encoder)
            ),
        ),
    )
    return _clip(target, comps, {"clip_l.transformer." + k: v for k, v in state.items()})


def builtin_sdxl_clip(comps):
    """The built-in SDXL text encoders as ComfyUI's SDXL CLIP (SDXLClipModel: CLIP-L and OpenCLIP-G, each from its
    penultimate layer without the final layer norm, side by side, and G's projected pooled output), with
    tokenizers that check embeddings at each encoder's width (clip_l / clip_g keys, as for SDXL)."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base
    import torch

    config_l, config_g = _clip_config(comps.text_encoder), _clip_config(comps.text_encoder_2)

    class Tokenizer(comfy.sdxl_clip.SDXLTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 - ComfyUI's signature
            self.clip_l = comfy.sd1_clip.SDTokenizer(
                embedding_directory=embedding_directory,
                embedding_size=config_l["hidden_size"],
                embedding_key="clip_l",
                tokenizer_data=tokenizer_data,
            )
            self.clip_g = comfy.sd1_clip.SDTokenizer(
                pad_with_end=False,  # OpenCLIP pads with "!" (as the built-in model's second tokenizer)
                embedding_directory=embedding_directory,
                embedding_size=config_g["hidden_size"],
                embedding_key="clip_g",
                tokenizer_data=tokenizer_data,
            )

    def encoder(config, model_options, **kwargs):
        # ComfyUI asserts |layer_idx| < layers, which a 2-layer encoder's -2 fails: the same layer counted from 0
        layer_idx = -2 if config["num_hidden_layers"] > 2 else config["num_hidden_layers"] - 2
        return comfy.sd1_clip.SDClipModel(
            layer="hidden", layer_idx=layer_idx, textmodel_json_config=dict(config), layer_norm_hidden_state=False,
            model_options=model_options, **kwargs,
        )  # fmt: skip

    class ClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 - ComfyUI's signature
            torch.nn.Module.__init__(self)
            common = dict(device=device, dtype=dtype)
            self.clip_l = encoder(config_l, {**model_options, "model_name": "clip_l"}, **common)
            self.clip_g = encoder(
                config_g,
                {**model_options, "model_name": "clip_g"},
                special_tokens={"start": 49406, "end": 49407, "pad": 0},
                return_projected_pooled=True,
                **common,
            )
            self.dtypes = {dtype}

    from ..trainer.base_models.components import text_model_path

    state = {}
    for key, encoder_module in (("clip_l", comps.text_encoder), ("clip_g", comps.text_encoder_2)):
        for k, v in encoder_module.state_dict().items():
            if not k.endswith("position_ids"):
                name = k if k.startswith("text_projection.") else text_model_path(k)
                state[f"{key}.transformer.{name}"] = v
    return _clip(comfy.supported_models_base.ClipTarget(Tokenizer, ClipModel), comps, state)


def builtin_vae(comps, state: dict):
    """The built-in VAE as ComfyUI's VAE (its AutoencoderKL), with the built-in model's down-scaling factor."""
    import comfy.ldm.modules.diffusionmodules.model
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
    # ComfyUI's VAE builds every GroupNorm through Normalize(channels, num_groups=32), which cannot even be built on
    # the 16 channels of tiny's first level: its default is the built-in model's group count while the VAE is built.
    normalize = comfy.ldm.modules.diffusionmodules.model.Normalize
    defaults = normalize.__defaults__
    normalize.__defaults__ = (cfg.norm_num_groups,)
    try:
        vae = comfy.sd.VAE(sd=dict(state), config={"params": {"embed_dim": cfg.latent_channels, "ddconfig": ddconfig}})
    finally:
        normalize.__defaults__ = defaults
    _strict_load(vae.first_stage_model, state, "VAE")
    _set_group_norm_groups(vae.first_stage_model, cfg.norm_num_groups)
    vae.downscale_ratio = vae.upscale_ratio = 2 ** (len(channels) - 1)
    vae.latent_channels = cfg.latent_channels
    return vae


def load_builtin(comps):
    """(MODEL, CLIP, VAE) for a built-in model's diffusers components, in ComfyUI's own classes."""
    from ..trainer.formats.ldm_layout import split_ldm_state_dict, to_ldm_state_dict, unet_to_ldm, vae_to_ldm

    if comps.text_encoder_2 is not None:  # SDXL
        return (
            builtin_sdxl_unet(comps, unet_to_ldm(comps.unet.state_dict(), dict(comps.unet.config))),
            builtin_sdxl_clip(comps),
            builtin_vae(comps, vae_to_ldm(comps.vae.state_dict(), dict(comps.vae.config))),
        )
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
