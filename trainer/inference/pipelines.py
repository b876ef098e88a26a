"""Image generation with diffusers pipelines built over in-memory components."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

import diffusers
import torch

from ..errors import DreamLoomError

SCHEDULERS = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}


def make_scheduler(name: str, base_config: dict):
    if name not in SCHEDULERS:
        raise DreamLoomError(f"Unknown sampler {name!r}.", f"Use one of: {', '.join(SCHEDULERS)}.")
    cls_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, **overrides)


def make_pipeline(comps, sampler: str = "dpmpp_2m", unet=None, text_encoder=None):
    """The family's diffusers pipeline over the given components (no copies; no safety checker)."""
    return comps.family.pipeline(comps, make_scheduler(sampler, comps.scheduler_config), unet, text_encoder)


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    resolution: int,
    negative_prompt: str = "",
    batch_size: int = 4,
    latents=None,
):
    """One image per (prompt, seed) pair, generated in batches; each image depends only on its seed.

    Initial noise is drawn on the CPU from `torch.Generator().manual_seed(seed)` so the same seed gives
    the same image on any device.
    """
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    channels = pipe.unet.config.in_channels
    scale = pipe.vae_scale_factor
    images = []
    # Decode one image at a time: a batch of 512 px decodes needs several GB of activations at once. On a GPU, larger
    # images decode in 512 px tiles too (blended at the seams): SDXL's VAE decodes in fp32 under fp16, and a whole
    # 1024 px image then takes about 3 GiB of activations next to the UNet's weights.
    with _decoding(pipe.vae, resolution, device):
        for start in range(0, len(prompts), batch_size):
            p = list(prompts[start : start + batch_size])
            s = list(seeds[start : start + batch_size])
            if latents is not None:
                init = latents[start : start + batch_size].to(device, dtype)
            else:
                init = torch.stack(
                    [
                        torch.randn(
                            (channels, resolution // scale, resolution // scale),
                            generator=torch.Generator().manual_seed(int(seed)),
                        )
                        for seed in s
                    ]
                ).to(device, dtype)
            generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in s]
            with torch.no_grad():
                out = pipe(
                    prompt=p,
                    negative_prompt=[negative_prompt] * len(p) if negative_prompt else None,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=resolution,
                    width=resolution,
                    latents=init,
                    generator=generators,
                    output_type="pil",
                )
            images.extend(out.images)
    return images


TILE_PIXELS = 512  # the VAE decodes images larger than this in tiles of this size on a GPU
TILING_ATTRIBUTES = ("use_slicing", "use_tiling", "tile_sample_min_size", "tile_latent_min_size")


@contextlib.contextmanager
def _decoding(vae, resolution: int, device):
    """The VAE's decode while `generate` runs: sliced (and on CUDA above TILE_PIXELS tiled); outside autocast, in the
    VAE's own dtype (a caller's autocast, as around the training samples, would run a VAE kept in fp32 for fp16 runs
    in fp16, where SDXL's overflows into black pictures); and in fp32 from the first fp16/bf16 decode that gives
    non-finite pixels (some SD1.5 VAEs overflow in fp16; diffusers upcasts only SDXL's). The VAE is given back as it
    was."""
    state = {k: getattr(vae, k) for k in TILING_ATTRIBUTES if hasattr(vae, k)}
    half = vae.dtype if vae.dtype in (torch.float16, torch.bfloat16) else None
    vae.use_slicing = True
    if torch.device(device).type == "cuda" and resolution > TILE_PIXELS and "tile_sample_min_size" in state:
        vae.use_tiling = True
        vae.tile_latent_min_size = TILE_PIXELS * vae.tile_latent_min_size // vae.tile_sample_min_size
        vae.tile_sample_min_size = TILE_PIXELS
    decode = vae.decode

    def careful_decode(latents, *args, **kwargs):
        with torch.autocast(latents.device.type, enabled=False):
            out = decode(latents.to(vae.dtype), *args, **kwargs)
            pixels = out[0] if isinstance(out, tuple) else out.sample
            if vae.dtype == half and not bool(torch.isfinite(pixels).all()):
                print(f"note: the VAE overflowed in {str(half)[6:]}; decoding in fp32 from here on", file=sys.stderr)
                vae.to(torch.float32)
                out = decode(latents.float(), *args, **kwargs)
        return out

    vae.decode = careful_decode
    try:
        yield
    finally:
        del vae.decode  # the class's own again
        if half is not None and vae.dtype != half:
            vae.to(half)
        for key, value in state.items():
            setattr(vae, key, value)
