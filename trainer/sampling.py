"""Image generation with diffusers from in-memory components, and labelled grids."""

from __future__ import annotations

from typing import Sequence

from .errors import DreamLoomError

SCHEDULERS = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}


def make_scheduler(name: str, base_config: dict):
    import diffusers

    if name not in SCHEDULERS:
        raise DreamLoomError(f"Unknown sampler {name!r}.", f"Use one of: {', '.join(SCHEDULERS)}.")
    cls_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, **overrides)


def make_pipeline(comps, sampler: str = "dpmpp_2m", unet=None, text_encoder=None):
    """A StableDiffusionPipeline over the given components (no copies; no safety checker)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        pipe = StableDiffusionPipeline(
            vae=comps.vae,
            text_encoder=text_encoder or comps.text_encoder,
            tokenizer=comps.tokenizer,
            unet=unet or comps.unet,
            scheduler=make_scheduler(sampler, comps.scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    finally:
        dlogging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
    import torch

    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    channels = pipe.unet.config.in_channels
    scale = pipe.vae_scale_factor
    images = []
    for start in range(0, len(prompts), batch_size):
        p = list(prompts[start : start + batch_size])
        s = list(seeds[start : start + batch_size])
        if latents is not None:
            init = latents[start : start + batch_size].to(device, dtype)
        else:
            init = torch.stack(
                [torch.randn((channels, resolution // scale, resolution // scale), generator=torch.Generator().manual_seed(int(seed))) for seed in s]
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


def labelled_grid(images, labels: Sequence[str] | None = None, cols: int = 3, tile: int | None = None, title: str | None = None):
    """A grid of images with a caption under each tile (and an optional title line)."""
    from PIL import Image, ImageDraw, ImageFont

    if not images:
        raise ValueError("no images for the grid")
    tile = tile or max(images[0].size[0], 128)
    rows = (len(images) + cols - 1) // cols
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        font = ImageFont.load_default()
    label_h = 14 * max(1, max((len(_wrap(lbl, tile)) for lbl in labels), default=1)) + 6 if labels else 0
    title_h = 22 if title else 0
    pad = 4
    grid = Image.new("RGB", (cols * (tile + pad) + pad, title_h + rows * (tile + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 4), title, fill="black", font=font)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x = pad + c * (tile + pad)
        y = title_h + pad + r * (tile + label_h + pad)
        grid.paste(im.convert("RGB").resize((tile, tile)), (x, y))
        if labels:
            for j, line in enumerate(_wrap(labels[i], tile)):
                draw.text((x + 2, y + tile + 3 + 14 * j), line, fill="black", font=font)
    return grid


def _wrap(text: str, width_px: int) -> list[str]:
    per_line = max(8, width_px // 7)
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > per_line and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return lines[:4] or [""]
