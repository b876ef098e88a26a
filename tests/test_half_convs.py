"""Frozen conv weights kept in fp16/bf16 under fp32 training (training/half_convs.py): the same numbers to the bit
as widening them once, while autograd holds no fp32 copy of any of them."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import assert_same_tensors, tiny_config
from torch import nn

from trainer.base_models.builtin import build_tiny
from trainer.config import TrainConfig
from trainer.training import half_convs
from trainer.training.half_convs import keep_frozen_convs_half, qualifies, resolve_half_frozen_convs
from trainer.training.loop import Trainer
from trainer.training.precision import place_trainable_module

CONVS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2, groups=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="circular", bias=False),
]


def _conv_pair(kwargs: dict, dtype: torch.dtype):
    """The same frozen conv twice: widened to fp32 once (the plain placement), and kept in `dtype`."""
    torch.manual_seed(0)
    stored = nn.Conv2d(**kwargs).to(dtype).requires_grad_(False)
    widened = nn.Conv2d(**kwargs).requires_grad_(False)
    widened.load_state_dict({k: v.float() for k, v in stored.state_dict().items()})
    kept = keep_frozen_convs_half(stored, "cpu")
    assert kept == [stored.weight]
    if stored.bias is not None:
        stored.bias.data = stored.bias.data.float()  # place_trainable_module widens the rest
    return stored, widened


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kwargs", CONVS, ids=lambda k: "-".join(f"{n}{v}" for n, v in k.items() if n != "in_channels"))
def test_a_kept_conv_computes_what_the_widened_one_does_forward_and_backward(kwargs, dtype):
    stored, widened = _conv_pair(kwargs, dtype)
    assert stored.weight.dtype == dtype
    x = torch.randn(2, 4, 9, 11)
    outs, grads = [], []
    for conv in (stored, widened):
        xi = x.clone().requires_grad_(True)
        out = conv(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    with torch.no_grad():  # samples run the same layers without autograd
        assert torch.equal(stored(x), widened(x))


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_a_stack_of_kept_convs_sharing_one_buffer_computes_what_widened_ones_do(device, monkeypatch):
    """Every widened weight is written into one buffer that grows to the largest: each layer, forward and backward,
    must still read its own weight (on a GPU, in stream order)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    half_convs.free_buffers()  # what earlier tests in this thread left
    shapes = [(4, 8, 3), (8, 32, 3), (32, 16, 1), (16, 4, 3)]  # the buffer grows, then later weights are smaller
    torch.manual_seed(0)
    stored = nn.Sequential(*[nn.Conv2d(i, o, k, padding=k // 2) for i, o, k in shapes]).half().requires_grad_(False)
    widened = nn.Sequential(*[nn.Conv2d(i, o, k, padding=k // 2) for i, o, k in shapes]).requires_grad_(False)
    widened.load_state_dict({k: v.float() for k, v in stored.state_dict().items()})
    kept = place_trainable_module(stored, device, torch.float32, half_frozen_convs=True)
    assert kept == sum(m.weight.numel() for m in stored)
    widened.to(device)
    x = torch.randn(2, 4, 16, 16, device=device)
    results = []
    for model in (stored, widened):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (out * out).sum().backward()
        results.append((out.detach(), xi.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    # one buffer, as large as the largest weight, whatever the number of layers and calls
    buffers = half_convs._scratch.buffers
    assert [b.numel() for b in buffers.values()] == [max(m.weight.numel() for m in stored)]
    half_convs.free_buffers()
    assert not hasattr(half_convs._scratch, "buffers")


def _saved_for_backward(layer, x) -> list[torch.Tensor]:
    """The tensors autograd saves in a forward of `layer` on `x` (then runs the backward)."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x).sum().backward()
    return saved


def test_autograd_keeps_no_fp32_copy_of_a_kept_weight():
    """What saves the memory: a plain conv2d(x, w.float()) would keep the widened weight until the backward."""
    stored, widened = _conv_pair(dict(in_channels=64, out_channels=64, kernel_size=3, padding=1), torch.float16)
    weight_shape = stored.weight.shape
    for conv, expect_fp32_copy in ((stored, False), (widened, True)):
        saved = _saved_for_backward(conv, torch.randn(1, 64, 8, 8, requires_grad=True))
        fp32_weights = [t for t in saved if t.shape == weight_shape and t.dtype == torch.float32]
        assert bool(fp32_weights) == expect_fp32_copy
        if not expect_fp32_copy:
            assert any(t.shape == weight_shape and t.dtype == torch.float16 for t in saved)


def test_only_plain_frozen_16_bit_convs_qualify():
    conv = nn.Conv2d(4, 4, 3).half().requires_grad_(False)
    assert qualifies(conv)
    assert not qualifies(nn.Conv2d(4, 4, 3).requires_grad_(False))  # fp32: nothing to keep
    assert not qualifies(nn.Conv2d(4, 4, 3).half())  # trains: it needs a weight gradient
    trained_bias = nn.Conv2d(4, 4, 3).half().requires_grad_(False)
    trained_bias.bias.requires_grad_(True)
    assert not qualifies(trained_bias)
    assert not qualifies(nn.Conv2d(4, 4, 3, padding="same").half().requires_grad_(False))
    assert not qualifies(nn.Linear(4, 4).half().requires_grad_(False))


def test_the_setting_is_resolved_by_device_precision_and_compile():
    on, why = resolve_half_frozen_convs(None, "cpu", torch.float32, torch_compile=False)
    assert on and "auto" in why
    assert not resolve_half_frozen_convs(None, "cpu", torch.float32, torch_compile=True)[0]
    assert not resolve_half_frozen_convs(None, "cuda", torch.float32, torch_compile=False)[0]
    assert resolve_half_frozen_convs(True, "cuda", torch.float32, torch_compile=True) == (True, "set")
    assert resolve_half_frozen_convs(False, "cpu", torch.float32, torch_compile=False) == (False, "set")
    on, why = resolve_half_frozen_convs(True, "cpu", torch.bfloat16, torch_compile=False)
    assert not on and "bf16 already" in why
    assert TrainConfig.from_dict({"half_frozen_convs": "auto"}).half_frozen_convs is None
    assert TrainConfig.from_dict({"half_frozen_convs": "false"}).half_frozen_convs is False


def test_placing_a_fp16_unet_keeps_its_frozen_convs_16_bit_and_widens_the_rest():
    unet = build_tiny().unet.half().requires_grad_(False)
    convs = [m for m in unet.modules() if type(m) is nn.Conv2d]
    kept = place_trainable_module(unet, "cpu", torch.float32, half_frozen_convs=True)
    assert kept == sum(m.weight.numel() for m in convs) > 0
    assert {m.weight.dtype for m in convs} == {torch.float16}
    others = [p for p in unet.parameters() if all(p is not m.weight for m in convs)]
    assert {p.dtype for p in others} == {torch.float32}
    # a fp32 placement without the setting widens everything, as before
    plain = build_tiny().unet.half().requires_grad_(False)
    assert place_trainable_module(plain, "cpu", torch.float32) == 0
    assert {p.dtype for p in plain.parameters()} == {torch.float32}


def _run(cfg, run_dir, half: bool):
    comps = build_tiny()
    for module in comps.modules().values():  # a checkpoint stored in fp16, as most are
        module.half()
    trainer = Trainer(TrainConfig.from_dict({**cfg.to_dict(), "half_frozen_convs": half}), run_dir, comps=comps)
    result = trainer.run()
    return trainer, result


@pytest.mark.parametrize(
    "method,overrides",
    [("lora", dict(with_prior_preservation=True)), ("ti", dict(initializer_token="pattern", learning_rate=5e-3))],
)
def test_training_with_kept_convs_matches_widened_convs_to_the_bit(method, overrides, fabric_dir, tmp_path):
    cfg = tiny_config(fabric_dir, method=method, max_train_steps=3, **overrides)
    on, on_result = _run(cfg, tmp_path / "on", half=True)
    off, off_result = _run(cfg, tmp_path / "off", half=False)
    convs = [m for m in on.comps.unet.modules() if type(m) is nn.Conv2d]
    assert {m.weight.dtype for m in convs} == {torch.float16}
    assert all(isinstance(m.forward, types.MethodType) for m in convs)
    assert {m.weight.dtype for m in off.comps.unet.modules() if type(m) is nn.Conv2d} == {torch.float32}
    assert on.settings["half_frozen_convs"] == "on (set)"
    assert len(on_result.losses) == 3 and on_result.losses == off_result.losses
    assert_same_tensors(on.method.trainable_state(on.comps), off.method.trainable_state(off.comps))
    log = (tmp_path / "on" / "events.jsonl").read_text()
    assert "frozen conv weights kept in the checkpoint's 16-bit dtype" in log
