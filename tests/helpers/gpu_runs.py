"""What the GPU proof's tests share (tests/test_cuda.py for SD1.5, tests/test_cuda_sdxl.py for SDXL): their images,
the settings of a measured run, and a run that reports its peak allocated CUDA memory."""

import gc
from pathlib import Path

import torch

GIB = 2**30


def write_run_images(root: Path, size: int, instance_count: int | None = None) -> Path:
    """root/instance: the fabric sample set at `size` px; root/class: two random-pixel class images, so the
    measured runs generate none (class-image generation has tests of its own)."""
    from PIL import Image

    from trainer.data.sample_set import write_fabric_samples

    if instance_count is None:
        write_fabric_samples(root / "instance", size=size)
    else:
        write_fabric_samples(root / "instance", size=size, count=instance_count)
    (root / "class").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand((size, size, 3), generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "class" / f"class_{i:05d}.png")
    return root


def run_config(checkpoint, data: Path, resolution: int, **overrides):
    """LoRA rank 4, batch 1 + 1 prior image (the budgets' setting), fp16 with checkpointing unless overridden."""
    from trainer.config import TrainConfig

    settings = dict(
        base_model=str(checkpoint),
        instance_dir=str(data / "instance"),
        class_dir=str(data / "class"),
        num_class_images=2,
        resolution=resolution,
        rank=4,
        alpha=4.0,
        learning_rate=1e-4,
        max_train_steps=6,
        checkpoint_every=3,
        sample_every=0,
        sample_steps=2,
        mixed_precision="fp16",
        gradient_checkpointing=True,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def fresh_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def train_with_peak(cfg, run_dir, **kwargs):
    """(trainer, result, peak GiB of torch.cuda.max_memory_allocated over the whole run)."""
    from trainer.training.loop import Trainer

    fresh_gpu()
    trainer = Trainer(cfg, run_dir, **kwargs)
    result = trainer.run()
    return trainer, result, torch.cuda.max_memory_allocated() / GIB
