"""The GPU proof for SDXL: a random-weight, full-size SDXL base written in the original single-file layout and
loaded through the offline path a user's checkpoint takes, trained at 1024 px on CUDA. Budget (issue 16): SDXL
LoRA at 1024 px fits a 12 GB card with fp16/bf16, gradient checkpointing and cached text embeddings. Run with
`pytest -m cuda`; elsewhere every test here is skipped with that reason. Peaks are printed for the README.
"""

import math

import pytest
import torch

from helpers.gpu_runs import run_config, train_with_peak, write_run_images

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU: run `pytest -m cuda` on one"),
]

# A 12 GB card has about 11.2 GiB; the CUDA context and PyTorch's cache take 0.5-1 GiB of it.
TWELVE_GB_CARD_BUDGET_GIB = 10.5


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory):
    from helpers.sdxl_layout import write_random_sdxl

    path = tmp_path_factory.mktemp("sdxl") / "sdxl-random.safetensors"
    write_random_sdxl(path)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_run_images(tmp_path_factory.mktemp("cuda_sdxl_data"), 1024, instance_count=4)


def _config(checkpoint, data, **overrides):
    return run_config(checkpoint, data, 1024, **{"max_train_steps": 4, "checkpoint_every": 0, **overrides})


def _train(cfg, run_dir):
    trainer, result, peak = train_with_peak(cfg, run_dir)
    assert all(math.isfinite(r["loss"]) for r in result.losses), result.losses
    return trainer, result, peak


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sdxl_lora_1024_training_fits_a_12gb_card(sdxl_checkpoint, data, tmp_path, precision):
    """Latent caching and training (class images given, no sample grids)."""
    trainer, result, peak = _train(_config(sdxl_checkpoint, data, mixed_precision=precision), tmp_path / "run")
    print(f"\nSDXL LoRA 1024 px {precision} + checkpointing, batch 1 + 1 prior, training: peak {peak:.2f} GiB")
    assert trainer.comps.family.name == "SDXL"
    moved = [k for k, v in trainer.method.trainable_state(trainer.comps).items() if "lora_B" in k and v.abs().max() > 0]
    assert moved, "no LoRA weight changed"
    assert peak < TWELVE_GB_CARD_BUDGET_GIB


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sdxl_whole_run_with_class_images_and_samples_fits_a_12gb_card(sdxl_checkpoint, data, tmp_path, precision):
    """Every phase of a run: class images made by the SDXL pipeline, latent caching, training and sample grids."""
    cfg = _config(
        sdxl_checkpoint,
        data,
        class_dir=None,
        class_steps=2,
        class_batch_size=2,
        sample_every=2,
        max_train_steps=2,
        mixed_precision=precision,
    )
    _, result, peak = _train(cfg, tmp_path / "run")
    print(f"\nSDXL 1024 px {precision} whole run, 2 class images and 2 sample grids: peak {peak:.2f} GiB")
    assert result.outputs["samples"]
    assert peak < TWELVE_GB_CARD_BUDGET_GIB
    # The text encoders wait on the CPU while the UNet samples: measured 8.45 (bf16) and 8.61 GiB (fp16) while they
    # stayed on the GPU; predicted 7.00 and 7.16 since. Within 15% of that, which a 10 GB card holds.
    from trainer.training.memory import predict_memory

    predicted = predict_memory(family="SDXL", precision=precision, checkpointing=True).peak
    assert peak < 1.15 * predicted, (peak, predicted)
