"""Pretraining of the built-in `tiny-fabric` base model on the procedural corpus (issue 9).

`python -m trainer pretrain-tiny` trains, on a CPU in under an hour:
  1. an AutoencoderKL (4x down, 4 latent channels) on the corpus images (L1 + MSE + a small KL term);
  2. a CLIP text model and a UNet2DConditionModel together, on cached latents, with SD1.5's noise schedule,
     epsilon prediction, min-SNR weighting, caption variants (full / family / colours / class / empty)
     so the class prompt and classifier-free guidance work, and an EMA of the weights.
The result is one fp16 safetensors file (prefixes vae./unet./text_encoder.) with the configs in its
metadata; base_models/builtin.py loads it. The held-out family (kente) is never shown to the model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..base_models import builtin
from ..base_models.builtin import TINY_TEXT, TINY_UNET, TINY_VAE
from ..base_models.sd15 import SD15

RESOLUTION = 128
# The random `tiny` model's configs (base_models/builtin.py), at the widths and depths a 128 px pretrained model needs.
FABRIC_UNET = dict(
    TINY_UNET,
    sample_size=32,
    block_out_channels=(32, 64, 128),
    # SD1.5 has attention at its three finest levels; here the finest level (32x32 latents) has none,
    # which makes a CPU training step 4x cheaper. The mid block and 16x16/8x8 levels keep cross-attention.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
    norm_num_groups=16,
)
FABRIC_VAE = dict(
    TINY_VAE,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=16,
    sample_size=RESOLUTION,
    scaling_factor=1.0,  # set from the corpus latents after the VAE is trained
)
FABRIC_TEXT = dict(TINY_TEXT, intermediate_size=256, num_hidden_layers=3)


@dataclass
class PretrainConfig:
    out: Path
    per_family: int = 1000
    vae_steps: int = 1500
    vae_batch: int = 8
    vae_crop: int = 64
    vae_lr: float = 2e-3
    unet_steps: int = 4000
    unet_batch: int = 32
    # The patterns are stationary, so random 16x16 latent crops (64 px) are valid samples at a quarter
    # of the cost: the first crop_steps use them (crop_batch each), the rest use whole 32x32 latents.
    crop_steps: int = 1800
    crop_batch: int = 64
    crop_size: int = 16
    unet_lr: float = 4e-4
    ema_decay: float = 0.999
    seed: int = 0
    threads: int | None = None
    time_budget_s: float | None = None  # stop the UNet stage early when the budget runs out
    resume_vae: bool = False  # reuse out/stage1_vae.safetensors from an earlier run


def caption_variants(sample) -> list[str]:
    """Every caption a corpus sample is trained with: full, family only, colours only, class only."""
    full = sample.caption
    noun = full.split(" ", 4)[4].rsplit(" fabric pattern", 1)[0]  # "a red and gold <noun> fabric pattern"
    c1, c2 = sample.colors
    return [full, f"a {noun} fabric pattern", f"a {c1} and {c2} fabric pattern", "a fabric pattern"]


# Probabilities of the caption variants above, then of the empty caption (for classifier-free guidance).
CAPTION_WEIGHTS = (0.55, 0.15, 0.1, 0.1, 0.1)


def render_corpus(per_family: int, size: int = RESOLUTION):
    """(uint8 images N x H x W x 3, list of Sample) for the pretraining corpus (held-out family excluded)."""
    import numpy as np

    from .corpus import corpus, render

    images, samples = [], []
    for family, index in corpus(per_family):
        img, sample = render(family, index, size)
        images.append(np.asarray(img))
        samples.append(sample)
    return np.stack(images), samples


def _to_tensor(batch_uint8):
    import torch

    return torch.from_numpy(batch_uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(images, cfg: PretrainConfig, log):
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vae = AutoencoderKL(**FABRIC_VAE)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(cfg.vae_steps, 50))
    n, size = len(images), images.shape[1]
    losses = []
    for step in range(cfg.vae_steps):
        idx = rng.integers(0, n, cfg.vae_batch)
        c = cfg.vae_crop
        ys, xs = rng.integers(0, size - c + 1, cfg.vae_batch), rng.integers(0, size - c + 1, cfg.vae_batch)
        crops = np.stack([images[i, y : y + c, x : x + c] for i, y, x in zip(idx, ys, xs)])
        x = _to_tensor(crops)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # Pixel L1 + MSE, plus L1 on 8x8 block means: the histogram features and the eye both need the
        # colours right, and an under-trained small VAE gets shapes before it gets colours.
        pooled = torch.nn.functional.avg_pool2d(recon - x, 8).abs().mean()
        rec = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + pooled
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(rec.detach()))
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step + 1}/{cfg.vae_steps} recon {np.mean(losses[-50:]):.4f}")
    vae.eval().requires_grad_(False)
    return vae, losses


def _warmup_cosine(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def encode_corpus(vae, images, batch: int = 64):
    """Posterior means of every corpus image, and the scaling factor that gives them unit std."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(vae.encode(_to_tensor(images[i : i + batch])).latent_dist.mean)
    latents = torch.cat(out)
    return latents, float(1.0 / latents.std())


def tokenize_variants(tokenizer, samples):
    """Token ids [N, V+1, 77]: each sample's caption variants, then the empty caption."""
    texts = [v for s in samples for v in caption_variants(s) + [""]]
    ids = SD15.tokenize(tokenizer, texts)
    return ids.view(len(samples), len(CAPTION_WEIGHTS), -1)


def train_denoiser(latents, token_ids, cfg: PretrainConfig, log, scheduler_config: dict, deadline: float | None = None):
    """Train the UNet and the text encoder together; returns (unet, text_encoder, losses) with EMA weights."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..training.loss import min_snr_weights as snr_weights

    torch.manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    unet = UNet2DConditionModel(**FABRIC_UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(**FABRIC_TEXT))
    unet.train()
    text_encoder.train()
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(cfg.unet_steps, 100))
    ema = EMAModel(params, decay=cfg.ema_decay, foreach=True)  # decay warms up as (1 + step) / (10 + step)
    weights = np.array(CAPTION_WEIGHTS) / sum(CAPTION_WEIGHTS)
    n = len(latents)
    losses = []
    started = time.monotonic()
    for step in range(cfg.unet_steps):
        cropped = step < cfg.crop_steps
        bs = cfg.crop_batch if cropped else cfg.unet_batch
        idx = torch.from_numpy(rng.integers(0, n, bs))
        variant = torch.from_numpy(rng.choice(len(weights), bs, p=weights))
        x0 = latents[idx]
        if cropped:
            c, size = cfg.crop_size, latents.shape[-1]
            y, x = (int(v) for v in rng.integers(0, size - c + 1, 2))
            x0 = x0[..., y : y + c, x : x + c]
        flip = torch.from_numpy(rng.random(bs) < 0.5)
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bs,))
        noisy = noise_scheduler.add_noise(x0, noise, t)
        cond = text_encoder(token_ids[idx, variant])[0]
        pred = unet(noisy, t, cond).sample
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3)) * snr_weights(noise_scheduler, t, 5.0)
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            rate = (step + 1) / (time.monotonic() - started)
            log(f"unet step {step + 1}/{cfg.unet_steps} loss {np.mean(losses[-100:]):.4f} ({rate:.2f} steps/s)")
        if deadline is not None and time.monotonic() > deadline:
            log(f"time budget reached after {step + 1} UNet steps")
            break
    ema.copy_to(params)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return unet, text_encoder, losses


def save_tiny_fabric(path: Path, vae, unet, text_encoder, info: dict) -> None:
    """The built-in model's file (base_models/builtin.py reads it) with this recipe's configs."""
    configs = {
        "vae": dict(FABRIC_VAE, scaling_factor=info["scaling_factor"]),
        "unet": FABRIC_UNET,
        "text_encoder": FABRIC_TEXT,
    }
    builtin.save_tiny_fabric(path, {"vae": vae, "unet": unet, "text_encoder": text_encoder}, configs, RESOLUTION, info)


def pretrain(cfg: PretrainConfig, log=print) -> dict:
    """Run both stages and write the model, a loss plot and a sample grid under cfg.out."""
    import torch

    from ..base_models.components import load_tokenizer
    from ..base_models.sd15 import sd15_scheduler_config
    from ..files.atomic import atomic_save, atomic_write_text
    from ..pictures.plots import plot_pretrain_losses

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    deadline = t0 + cfg.time_budget_s if cfg.time_budget_s else None
    cfg.out.mkdir(parents=True, exist_ok=True)
    images, samples = render_corpus(cfg.per_family)
    log(f"corpus: {len(images)} images of {len({s.family for s in samples})} families ({time.monotonic() - t0:.0f} s)")
    t_vae = time.monotonic()
    vae_path = cfg.out / "stage1_vae.safetensors"
    if cfg.resume_vae and vae_path.exists():
        vae, vae_losses = _load_vae(vae_path), [float("nan")]
        log(f"reusing the stage-1 VAE from {vae_path}")
    else:
        vae, vae_losses = train_vae(images, cfg, log)
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in vae.state_dict().items()}
        atomic_save(vae_path, lambda tmp: save_file(state, str(tmp)))  # --resume-vae must never see half a file
    vae_s = time.monotonic() - t_vae
    _recon_grid(cfg.out / "vae_recon.png", vae, images)
    latents, scaling = encode_corpus(vae, images)
    latents = latents * scaling
    tokenizer = load_tokenizer()
    token_ids = tokenize_variants(tokenizer, samples)
    t_unet = time.monotonic()
    unet, text_encoder, unet_losses = train_denoiser(latents, token_ids, cfg, log, sd15_scheduler_config(), deadline)
    unet_s = time.monotonic() - t_unet
    info = {
        "scaling_factor": scaling,
        "per_family": cfg.per_family,
        "vae_steps": len(vae_losses),
        "unet_steps": len(unet_losses),
        "unet_batch": cfg.unet_batch,
        "seed": cfg.seed,
        "vae_seconds": round(vae_s, 1),
        "unet_seconds": round(unet_s, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
        "final_unet_loss": float(sum(unet_losses[-100:]) / len(unet_losses[-100:])),
        "final_vae_recon": float(sum(vae_losses[-50:]) / len(vae_losses[-50:])),
        "torch_threads": torch.get_num_threads(),
    }
    model_path = cfg.out / "tiny_fabric.safetensors"
    save_tiny_fabric(model_path, vae, unet, text_encoder, info)
    atomic_write_text(cfg.out / "pretrain.json", json.dumps(info, indent=2))
    atomic_write_text(cfg.out / "pretrain_losses.json", json.dumps({"vae": vae_losses, "unet": unet_losses}))
    plot_pretrain_losses(cfg.out / "pretrain_loss.png", vae_losses, unet_losses)
    info["path"] = str(model_path)
    info["size_bytes"] = model_path.stat().st_size
    log(f"wrote {model_path} ({info['size_bytes'] / 1e6:.1f} MB) in {info['total_seconds']:.0f} s")
    return info


def _load_vae(path: Path):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    vae = AutoencoderKL(**FABRIC_VAE)
    vae.load_state_dict(load_file(str(path)))
    return vae.eval().requires_grad_(False)


def _recon_grid(path: Path, vae, images) -> None:
    """Originals over reconstructions: 6 corpus images and 2 held-out kente images."""
    import numpy as np
    import torch
    from PIL import Image

    from ..data.sample_set import fabric_image
    from ..files.atomic import atomic_save

    picks = [images[(i * 7) % len(images)] for i in range(6)]  # the corpus interleaves the 6 families
    picks += [np.asarray(fabric_image(i, RESOLUTION)) for i in (0, 1)]
    batch = np.stack(picks)
    with torch.no_grad():
        recon = vae.decode(vae.encode(_to_tensor(batch)).latent_dist.mean).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    grid = np.concatenate([np.concatenate(list(batch), 1), np.concatenate(list(recon), 1)], 0)
    atomic_save(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
