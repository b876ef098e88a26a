"""Load Checkpoint (DreamLoom) and Empty Latent (DreamLoom): one loader for the built-in models and checkpoint files.

The loader returns ComfyUI's own MODEL, CLIP and VAE for either, so core samplers, core LoRA and embedding
loading and VAE decode work on the built-in models exactly as on SD1.5 and SDXL (tiny-sdxl is ComfyUI's SDXL
model with its two text encoders and size conditioning); its base_model output feeds the training nodes, so one
widget picks the model of a whole workflow. tiny-fabric's VAE scales by 4, not 8, and the native sizes differ (64
to 1024 px), so the workflows make latents with Empty Latent (DreamLoom), which asks the VAE and the model.
"""

from __future__ import annotations

from ..trainer.errors import DreamLoomError
from . import comfy, runner
from .widgets import choice_widget, int_widget

CATEGORY = "DreamLoom/loaders"
BASE_MODEL_TYPE = "DL_BASE_MODEL"
SIZE_TOOLTIP = (
    "{} in pixels; 0 = the model's native size (128 for tiny-fabric, 64 for tiny and tiny-sdxl, 512 for SD1.5, "
    "1024 for SDXL; 512 for a VAE that did not come from Load Checkpoint (DreamLoom))."
)


def tag_models(model, clip, vae, label: str, base_model: str) -> None:
    """Remember which base model these objects came from, so our loaders can name it in a mismatch error.
    The attribute sits on the inner modules, which ComfyUI's clones share."""
    info = {
        "label": label,
        "base_model": base_model,
        "family": runner.model_family(base_model),
        "native_resolution": runner.native_resolution(base_model),
    }
    for obj in (getattr(model, "model", None), getattr(clip, "cond_stage_model", None), vae):
        if obj is not None:
            obj.dreamloom_base = info


def base_of(obj) -> dict | None:
    """The tag of a MODEL, CLIP or VAE from Load Checkpoint (DreamLoom); None for one from elsewhere."""
    for inner in (getattr(obj, "model", None), getattr(obj, "cond_stage_model", None), obj):
        info = getattr(inner, "dreamloom_base", None)
        if info is not None:
            return info
    return None


class LoadCheckpoint:
    DESCRIPTION = (
        "Loads a checkpoint as MODEL, CLIP and VAE: the built-in tiny-fabric model (trains and renders on a laptop "
        "CPU in minutes), the built-in tiny-sdxl (SDXL's layout at toy size, random weights: for trying SDXL "
        "workflows) or any SD1.5 or SDXL checkpoint file, as core Load Checkpoint does. Connect base_model to the "
        "training and class-image nodes so this one widget chooses the model of the whole workflow."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", BASE_MODEL_TYPE)
    RETURN_NAMES = ("model", "clip", "vae", "base_model")
    OUTPUT_TOOLTIPS = (
        "The diffusion model.",
        "The CLIP text encoder.",
        "The VAE.",
        "The same choice, for the base_model input of DreamLoom's training and class-image nodes.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        choices = [runner.BUILTIN_TINY_FABRIC] + comfy.filename_list("checkpoints")
        choices += [runner.BUILTIN_TINY, runner.BUILTIN_TINY_SDXL]
        return {
            "required": {
                "ckpt_name": choice_widget(
                    choices,
                    runner.BUILTIN_TINY_FABRIC,
                    "tiny-fabric is built in (128 px, for CPUs and trying things out), and so is tiny-sdxl (64 px, "
                    "random weights, to try SDXL workflows); pick an SD1.5 or SDXL checkpoint from "
                    "models/checkpoints for real work.",
                ),
            },
            "optional": {
                "ckpt_path": (
                    "STRING",
                    {
                        "forceInput": True,
                        "tooltip": "A checkpoint name from Train DreamBooth (full fine-tune); overrides ckpt_name.",
                    },
                ),
            },
        }

    def load(self, ckpt_name, ckpt_path=None):
        if ckpt_path and ckpt_path.strip():
            ckpt_name = ckpt_path.strip()
        base_model = runner.resolve_checkpoint(ckpt_name)
        if base_model in runner.BUILTIN_MODELS or runner.builtin_finetune_base(base_model):
            # the built-in models and their full fine-tunes: toy widths core cannot build, built from our modules
            from ..trainer.base_models.load import load_base_model

            model, clip, vae = comfy.load_builtin(load_base_model(base_model))
        else:
            model, clip, vae = comfy.load_checkpoint_file(base_model)
        tag_models(model, clip, vae, ckpt_name, base_model)
        return (model, clip, vae, ckpt_name)


def latent_size(vae, width: int, height: int) -> tuple[int, int, int, int]:
    """(channels, latent height, latent width, pixel size used) for `vae`; 0 means the model's native size."""
    ratio, channels = comfy.vae_latent_geometry(vae)
    info = base_of(vae)
    native = info["native_resolution"] if info else runner.SD15_RESOLUTION  # SD1.5 and SDXL VAEs look alike
    width, height = int(width) or native, int(height) or native
    if width % ratio or height % ratio:
        raise DreamLoomError(
            f"{width}x{height} px is not a multiple of this VAE's scale factor {ratio}.",
            f"Use a width and height divisible by {ratio}, or 0 for the model's native size.",
        )
    return channels, height // ratio, width // ratio, max(width, height)


class EmptyLatent:
    DESCRIPTION = (
        "An empty latent batch sized for the connected VAE and its model: SD1.5 (8x, 512 px native), SDXL (8x, "
        "1024 px) and the built-in tiny-fabric (4x, 128 px) alike, where core Empty Latent Image always divides by "
        "8 and has no native size."
    )
    CATEGORY = "DreamLoom/latent"
    FUNCTION = "build"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("An empty latent batch for a sampler's latent_image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("VAE", {"tooltip": "The VAE that will decode the result (its scale factor sizes the latent)."}),
                "width": int_widget(0, 0, 8192, SIZE_TOOLTIP.format("Width"), step=8),
                "height": int_widget(0, 0, 8192, SIZE_TOOLTIP.format("Height"), step=8),
                "batch_size": int_widget(1, 1, 4096, "Number of latents."),
            }
        }

    def build(self, vae, width, height, batch_size):
        import torch

        channels, h, w, _ = latent_size(vae, width, height)
        return ({"samples": torch.zeros((int(batch_size), channels, h, w))},)
