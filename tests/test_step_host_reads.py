"""A training step never makes the host wait for the device.

On a fast GPU the step is bound by how quickly Python queues kernels (README, "Speed on a GPU"): a read of a device
value (`.item()`, `float(t)`, `if t:`, a boolean mask, `nonzero`) inside the step stalls that queue until the GPU
has caught up, every step. The loss is read back only by `Trainer._flush`, every 10 steps on CUDA. These tests run
the tiny model on the CPU, where the same aten ops are dispatched, and count the ops that read a value back.

The fp16 case stands in for CUDA's fp16 path, which the CPU cannot run as such (accelerate keeps fp16 for GPUs):
fp16 autocast and a GradScaler, whose step reads `found_inf` back unless the optimizer takes the scale itself
(fused AdamW does; a per-tensor AdamW would add one read per step, which test_a_per_tensor_adamw_is_caught shows
this test sees).
"""

import collections

import pytest
import torch
from conftest import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.base_models.builtin import build_tiny, build_tiny_sdxl
from trainer.training import loop

# aten ops that copy a device value to the host, or whose output size depends on values (so they sync on CUDA)
HOST_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique2"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while `counting` is on."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.counting = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _fp16_accelerator_on_cpu(monkeypatch):
    """make_accelerator as on a CUDA GPU in fp16: autocast to fp16 and a GradScaler (the CPU's)."""
    real = loop.make_accelerator

    def make(_precision, *args):
        acc = real("bf16", *args)
        acc.state._mixed_precision = "fp16"
        acc.native_amp = True
        acc.scaler = torch.amp.GradScaler("cpu")
        return acc

    monkeypatch.setattr(loop, "make_accelerator", make)


def _count_step_ops(monkeypatch, cfg, run_dir) -> tuple[collections.Counter, loop.Trainer]:
    """Run `cfg` and count the ops of every step after the first (its micro-batches and its end), leaving out
    the loss read-back (`_flush`)."""
    counter = OpCounter()
    micro_batch, end_of_step, flush = loop.Trainer._micro_batch, loop.Trainer._end_of_step, loop.Trainer._flush

    def counted(method):
        def run(self, step, *args):
            counter.counting = step >= 2  # the first step sets things up once (the GradScaler's scale, ...)
            try:
                with counter:  # only here: a dispatch mode slows every op it sees
                    return method(self, step, *args)
            finally:
                counter.counting = False

        return run

    def uncounted_flush(self, step):
        was, counter.counting = counter.counting, False
        try:
            return flush(self, step)
        finally:
            counter.counting = was

    monkeypatch.setattr(loop.Trainer, "_micro_batch", counted(micro_batch))
    monkeypatch.setattr(loop.Trainer, "_end_of_step", counted(end_of_step))
    monkeypatch.setattr(loop.Trainer, "_flush", uncounted_flush)
    comps = build_tiny_sdxl() if cfg.base_model == "tiny-sdxl" else build_tiny()
    trainer = loop.Trainer(cfg, run_dir, comps=comps, bench=True)  # the same steps, without samples or export
    trainer.run()
    return counter.counts, trainer


CASES = {
    "lora fp16 prior snr noise-offset": dict(snr_gamma=5.0, noise_offset=0.05),
    "lora fp16 text encoder, 2 micro-batches": dict(train_text_encoder=True, gradient_accumulation_steps=2),
    "ti fp16 clamp_norm": dict(method="ti", clamp_norm=True, learning_rate=5e-3),
    "full fp16 ema": dict(method="full", use_ema=True, learning_rate=1e-5, with_prior_preservation=False),
    "sdxl lora fp16 text encoders": dict(base_model="tiny-sdxl", train_text_encoder=True),
    "lora fp32": dict(mixed_precision="no"),
}


@pytest.mark.parametrize("case", CASES)
def test_training_steps_read_nothing_back_from_the_device(case, fabric_dir, tmp_path, monkeypatch):
    overrides = {"mixed_precision": "bf16", **CASES[case]}
    if overrides["mixed_precision"] == "bf16":
        _fp16_accelerator_on_cpu(monkeypatch)
    cfg = tiny_config(fabric_dir, max_train_steps=3, **overrides)
    counts, trainer = _count_step_ops(monkeypatch, cfg, tmp_path / "run")
    if "fp16" in case:  # the stand-in took effect: fp16 autocast and the scaler's ops ran in the counted steps
        assert trainer.acc.scaler is not None and counts["_amp_update_scale_"] == 2
    assert counts["_fused_adamw_"] >= 2 and sum(counts.values()) > 500  # the steps ran and were counted
    assert {op: counts[op] for op in HOST_READS if counts[op]} == {}


def test_a_per_tensor_adamw_is_caught(fabric_dir, tmp_path, monkeypatch):
    """The test above can fail: GradScaler with an optimizer that does not take the scale reads found_inf back."""
    _fp16_accelerator_on_cpu(monkeypatch)
    monkeypatch.setattr(
        loop, "make_optimizer", lambda cfg, groups: torch.optim.AdamW(groups, lr=cfg.learning_rate, foreach=True)
    )
    cfg = tiny_config(fabric_dir, max_train_steps=3, mixed_precision="bf16")
    counts, _ = _count_step_ops(monkeypatch, cfg, tmp_path / "run")
    assert counts["_local_scalar_dense"] >= 2  # at least one read per counted step
