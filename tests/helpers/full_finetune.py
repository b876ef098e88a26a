"""A full-size SD1.5 fine-tuned by the full method and exported as one file, for the slow and ComfyUI tests."""

from pathlib import Path

import torch

from trainer.base_models.load import load_base_model
from trainer.config import TrainConfig
from trainer.training.loss import diffusion_loss
from trainer.training.methods.full import FullFineTuneMethod


@torch.no_grad()
def _sign_step(params, lr: float) -> None:
    for p in params:
        p.add_(p.grad.sign(), alpha=-lr)
        p.grad = None


def finetune_sd15(checkpoint: Path, result_dir: Path, resolution: int = 64):
    """(the exported file, the fine-tuned Components): the full method's setup, one real gradient step of every
    UNet weight at `resolution` px and its export. The step is sign-SGD rather than AdamW, whose 7 GB of moments
    would double the test's memory; the large 1e-3 step survives the fp16 export's rounding."""
    comps = load_base_model(str(checkpoint))
    cfg = TrainConfig(
        method="full", base_model=str(checkpoint), resolution=resolution, with_prior_preservation=False
    ).validate()
    cfg.output_name = "sd15_full"
    method = FullFineTuneMethod(cfg)
    method.setup(comps)
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    latents, noise = torch.randn(1, 4, side, side, generator=g), torch.randn(1, 4, side, side, generator=g)
    with torch.no_grad():
        hidden = comps.family.encode_prompts(comps, [cfg.instance_prompt], "cpu")["hidden"]
    loss = diffusion_loss(comps.unet, comps.noise_scheduler(), latents, noise, torch.tensor([500]), hidden, 1)[0]
    loss.backward()
    _sign_step(comps.unet.parameters(), 1e-3)
    Path(result_dir).mkdir(parents=True, exist_ok=True)
    return Path(method.export(comps, Path(result_dir), 1)["checkpoint"]), comps
