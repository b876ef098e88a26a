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


def vae_decode(vae, samples):
    return vae.decode(samples)


def save_path(prefix: str, width: int, height: int):
    """(folder, file stem, subfolder) for a new output file, as ComfyUI's save nodes pick them."""
    import folder_paths

    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), width, height
    )
    return folder, f"{filename}_{counter:05}_", subfolder
