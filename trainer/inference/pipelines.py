"""Image generation with diffusers pipelines built over in-memory components."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence

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
    on_batch: Callable[[int, list], None] | None = None,
):
    """One image per (prompt, seed) pair, generated in batches; each image depends only on its seed.

    Initial noise is drawn on the CPU from `torch.Generator().manual_seed(seed)` so the same seed gives
    the same image on any device. With `on_batch`, each batch's images go to `on_batch(start, images)` as soon as
    they are made (a class-image set is written as it goes, without holding it all) instead of into the returned
    list; an exception it raises stops the generation, with the modules given back as they were.

    Every batch's prompts are encoded first; on a GPU the frozen text encoders then wait on the CPU while the UNet
    and the VAE run (see _prompts_encoded_first).
    """
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    device = pipe.unet.device
    batch_size = gpu_batch_for(batch_size, resolution, device.type)
    dtype = pipe.unet.dtype
    channels = pipe.unet.config.in_channels
    scale = pipe.vae_scale_factor
    starts = range(0, len(prompts), batch_size)
    batch_prompts = [list(prompts[start : start + batch_size]) for start in starts]
    images = []
    # Decode one image at a time: a batch of 512 px decodes needs several GB of activations at once. On a GPU, larger
    # images decode whole where the free memory allows, else in 512 px tiles (see _decoding).
    with (
        _prompts_encoded_first(pipe, batch_prompts, negative_prompt, guidance, device) as encoded,
        _decoding(pipe.vae, resolution, device),
    ):
        for start, prompt_kwargs in zip(starts, encoded):
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
                    **prompt_kwargs,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=resolution,
                    width=resolution,
                    latents=init,
                    generator=generators,
                    output_type="pil",
                )
            if on_batch is None:
                images.extend(out.images)
            else:
                on_batch(start, out.images)
    return images


# On a GPU, at most this many pixels go through the pipeline at once: 8 images at 512 px, 2 at SDXL's 1024 px (class
# images 2 at a time kept a whole SDXL run within 8.6 GiB on an H100; tests/test_cuda_sdxl.py).
PIPELINE_BATCH_PIXELS = 2 * 1024 * 1024


def gpu_batch_for(requested: int, resolution: int, device_type: str) -> int:
    """Images per pipeline call: as requested on a CPU (RAM is the limit there, not a 12 GB card); on a GPU capped
    at PIPELINE_BATCH_PIXELS. Every caller of generate() gets it: class images, sample grids, `generate`, `morph`."""
    if device_type != "cuda":
        return requested
    return max(1, min(requested, PIPELINE_BATCH_PIXELS // (resolution * resolution)))


# The keyword arguments of a pipeline call that carry its prompts, in the order encode_prompt returns them (SD1.5
# returns the first two; SDXL all four).
PROMPT_EMBEDDING_ARGUMENTS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)


@contextlib.contextmanager
def _prompts_encoded_first(pipe, batch_prompts: list[list[str]], negative_prompt: str, guidance: float, device):
    """Per batch, the pipeline call's prompt arguments, encoded up front by the pipeline's own `encode_prompt`
    (the numbers its call would compute; a batch of the same prompts as one before is encoded once).

    On a GPU the frozen text encoders are on it only while they encode, and wait on the CPU while the UNet and the
    VAE run: SDXL's two are 1.5 GiB in fp16, which an 8 GB card needs for the sample grid and the class images
    beside the UNet. They are given back where they were when the generation ends, however it ends. Text encoders
    that train (textual inversion, text-encoder LoRA) stay where they are."""
    encoders = text_encoders_to_move(pipe, device)
    homes = [next(e.parameters()).device for e in encoders]
    cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None  # as the pipeline's call decides
    try:
        for encoder in encoders:
            encoder.to(device)
        encoded: dict[tuple, dict] = {}
        with torch.no_grad():
            for prompts in batch_prompts:
                if tuple(prompts) not in encoded:
                    out = pipe.encode_prompt(
                        prompt=prompts,
                        device=device,
                        num_images_per_prompt=1,
                        do_classifier_free_guidance=cfg,
                        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                    )
                    encoded[tuple(prompts)] = dict(zip(PROMPT_EMBEDDING_ARGUMENTS, out))
        for encoder in encoders:
            encoder.to("cpu")
        if encoders and pipe._execution_device != torch.device(device):
            # diffusers before 0.40 takes a pipeline's device from its first module by name, a text encoder: the
            # UNet's inputs would be made on the CPU. There the encoders stay on the GPU, as before.
            for encoder in encoders:
                encoder.to(device)
        yield [encoded[tuple(prompts)] for prompts in batch_prompts]
    finally:
        for encoder, home in zip(encoders, homes):
            encoder.to(home)


def text_encoders_to_move(pipe, device) -> list:
    """The text encoders that visit `device` only to encode: all of the pipeline's on a CUDA device, when none of
    them trains; none elsewhere (a CPU run has nowhere cheaper to keep them)."""
    encoders = [e for e in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")) if e is not None]
    if torch.device(device).type != "cuda" or any(p.requires_grad for e in encoders for p in e.parameters()):
        return []
    return encoders


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
