"""Image generation with diffusers pipelines built over in-memory components."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

import diffusers
import torch

from ..errors import DreamLoomError
from .gpu_memory import free_cuda_bytes

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
    # images decode whole where the free memory allows, else in 512 px tiles (see _decoding).
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


TILE_PIXELS = 512  # on a GPU short of memory the VAE decodes larger images in tiles of this size
TILING_ATTRIBUTES = ("use_slicing", "use_tiling", "tile_sample_min_size", "tile_latent_min_size")
# A whole decode's activations per pixel and byte of the VAE's dtype: SDXL's VAE decoding 1024 px in fp32 raised a
# whole run's peak by about 3 GiB on an H100 (11.6 against 8.6 GiB tiled), 3 GiB / 1024^2 px / 4 bytes.
DECODE_ACTIVATION_BYTES_PER_PIXEL_BYTE = 768


def _tile(vae) -> None:
    vae.use_tiling = True
    vae.tile_latent_min_size = TILE_PIXELS * vae.tile_latent_min_size // vae.tile_sample_min_size
    vae.tile_sample_min_size = TILE_PIXELS


@contextlib.contextmanager
def _decoding(vae, resolution: int, device):
    """The VAE's decode while `generate` runs, given back as it was after:
    - sliced (one image at a time), and on CUDA above TILE_PIXELS whole only where the free memory holds the decode's
      activations, else in tiles; a whole decode that runs out of memory anyway is done again in tiles. Tiles are
      blended, but each normalises on its own, which can leave faint tone seams: class images are trained on, so
      they are decoded whole where they can be (as ComfyUI decodes);
    - outside autocast, in the VAE's own dtype (a caller's autocast, as around the training samples, would run a VAE
      kept in fp32 for fp16 runs in fp16, where SDXL's overflows into black pictures);
    - in fp32 from the first fp16/bf16 decode that gives non-finite pixels (some SD1.5 VAEs overflow in fp16;
      diffusers upcasts only SDXL's)."""
    state = {k: getattr(vae, k) for k in TILING_ATTRIBUTES if hasattr(vae, k)}
    half = vae.dtype if vae.dtype in (torch.float16, torch.bfloat16) else None
    vae.use_slicing = True
    can_tile = torch.device(device).type == "cuda" and resolution > TILE_PIXELS and "tile_sample_min_size" in state
    if can_tile:
        need = DECODE_ACTIVATION_BYTES_PER_PIXEL_BYTE * resolution**2 * vae.dtype.itemsize
        if free_cuda_bytes(device) < 1.25 * need:
            _tile(vae)
    decode = vae.decode

    def careful_decode(latents, *args, **kwargs):
        with torch.autocast(latents.device.type, enabled=False):
            out_of_memory = False
            try:
                out = decode(latents.to(vae.dtype), *args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                if not can_tile or vae.use_tiling:
                    raise
                out_of_memory = True  # retried below, once the failed attempt's tensors are gone
            if out_of_memory:
                print("note: the VAE ran out of memory decoding whole images; decoding in tiles", file=sys.stderr)
                torch.cuda.empty_cache()
                _tile(vae)
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
