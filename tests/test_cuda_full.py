"""The full fine-tune on CUDA: a few steps of a random-weight full-size SD1.5 at 512 px with fp16, gradient
checkpointing and 8-bit AdamW (bitsandbytes), the settings the DreamBooth Colab fits in about 10 GB on a T4. Run
`pytest -m cuda` on a machine with an NVIDIA GPU; elsewhere every test here is skipped with that reason.

Not yet run: no GPU was at hand when the method was written. The budget is doctor's prediction (10.2 GiB for these
settings, +-25%); the first GPU run should replace it with the measured peak."""

import os

import pytest
import torch

from helpers.gpu_runs import run_config, train_with_peak, write_run_images

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU: run `pytest -m cuda` on one"),
]

PREDICTED_GIB = 10.2  # trainer/lab/doctor.py: SD1.5 full, fp16, checkpointing, 8-bit AdamW, batch 1 + 1 prior


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_run_images(tmp_path_factory.mktemp("cuda_full_data"), 512)


def test_sd15_full_fine_tune_fp16_8bit_adam_fits_the_predicted_budget(sd15_checkpoint, data, tmp_path):
    pytest.importorskip("bitsandbytes", reason="8-bit AdamW needs bitsandbytes")
    from trainer.base_models.load import load_base_model
    from trainer.lab.doctor import predict_memory

    cfg = run_config(
        sd15_checkpoint,
        data,
        512,
        method="full",
        learning_rate=5e-6,
        use_8bit_adam=True,
        mixed_precision="fp16",
        gradient_checkpointing=True,
        max_train_steps=4,
        checkpoint_every=0,
    )
    predicted = predict_memory("full", 512, 1, False, "fp16", True, use_8bit_adam=True).training
    assert predicted == pytest.approx(PREDICTED_GIB, abs=0.1)
    before = {k: v.clone() for k, v in load_base_model(str(sd15_checkpoint)).unet.state_dict().items()}
    trainer, result, peak = train_with_peak(cfg, tmp_path / "run")
    print(f"\n[cuda] SD1.5 full fine-tune fp16 + checkpointing + 8-bit AdamW: peak {peak:.2f} GiB "
          f"(predicted {predicted:.2f})")  # fmt: skip
    losses = [r["loss"] for r in result.losses]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    unet = trainer.comps.unet
    assert {p.dtype for p in unet.parameters()} == {torch.float32}  # fp32 master weights under fp16 autocast
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW8bit"
    moved = sum(not torch.equal(v.cpu(), before[k]) for k, v in unet.state_dict().items())
    assert moved > 0.5 * len(before)  # fp16 gradients of random weights may underflow in a few layers
    assert peak < PREDICTED_GIB * 1.25, f"peak {peak:.2f} GiB"
    assert os.path.getsize(result.outputs["checkpoint"]) < 2.3e9  # fp16: about 2 GB
