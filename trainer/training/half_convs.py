"""Frozen convolution weights kept in the checkpoint's 16-bit dtype and cast to fp32 at each call (fp32 training).

Most checkpoints store fp16 (or bf16) weights. Training in fp32, as a CPU does, casts every frozen weight to fp32
once, doubling the model in memory, though the values are the same: fp16 and bf16 both widen to fp32 exactly. For
SD1.5's UNet the 3x3 and 1x1 convolutions are 589 M of its 860 M weights, so keeping them 16-bit and widening each
one only for the call that uses it (forward, and backward for the input's gradient) gives the same numbers in
1.1 GiB less. The price is one widening per conv per pass. Measured on a 2-core CPU (the trainer, full-size SD1.5
at 128 px, rank 4, batch 1, tuned allocator, 4 fresh processes alternating): peak RSS during the steps 4,024-4,027
-> 3,000-3,004 MiB, step +13% (at 512 px the convs do 16 times the arithmetic per weight, so the share is
smaller). Doing the same for the linear layers saved only 250-300 MiB in a first trial, for +8%: they stay fp32.

A plain `conv2d(x, weight.float())` would not do: autograd keeps the fp32 copy until the backward, and the peak is
where it was. `HalfWeightConv2d` keeps only the 16-bit weight and widens it again in the backward. Only frozen
weights qualify (no weight gradient is computed), and only under fp32 compute; layers that train, or that peft
wraps (add_fp32_adapter made those fp32), are left alone.
"""

from __future__ import annotations

import threading
import types

import torch
import torch.nn.functional as F
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


_scratch = threading.local()


def widened(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`, written into one reused buffer per thread, device and dtype (as large as the largest
    weight so far) instead of a fresh block per call: the widened copies come and go between the step's
    activations, and with the heap kept for them (cpu_malloc) fresh blocks of up to 118 MB each left it
    fragmented, about as large as the memory saved. Each copy is read only by the operator it is made for."""
    if weight.dtype == dtype:  # e.g. a model run in fp16 after training: nothing to widen
        return weight
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (weight.device, dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < weight.numel():
        buffers.pop(key, None)  # free the smaller one first
        buffer = buffers[key] = torch.empty(weight.numel(), dtype=dtype, device=weight.device)
    return buffer[: weight.numel()].view(weight.shape).copy_(weight)


def free_buffers() -> None:
    """Drop this thread's widening buffers (the next call makes a new one): at the end of a run."""
    _scratch.__dict__.pop("buffers", None)


class HalfWeightConv2d(torch.autograd.Function):
    """conv2d(x, weight.to(x.dtype), bias) saving the weight as stored for the backward, which returns the input's
    gradient only (the weight and bias are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, widened(weight, x.dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        (weight,) = ctx.saved_tensors
        shape, *conv = ctx.conv
        grad_in = torch.nn.grad.conv2d_input(shape, widened(weight, grad_out.dtype), grad_out, *conv)
        return (grad_in,) + (None,) * 6


def _half_weight_forward(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    if layer.padding_mode == "zeros":
        return HalfWeightConv2d.apply(x, layer.weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    padded = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
    return HalfWeightConv2d.apply(padded, layer.weight, bias, layer.stride, (0, 0), layer.dilation, layer.groups)


def qualifies(layer: nn.Module) -> bool:
    """A plain frozen Conv2d whose weight is stored in fp16 or bf16 (its own padding given as numbers)."""
    return (
        type(layer) is nn.Conv2d
        and layer.weight.dtype in HALF_DTYPES
        and not any(p.requires_grad for p in layer.parameters())
        and not isinstance(layer.padding, str)
    )


def keep_frozen_convs_half(module: nn.Module, device) -> list[nn.Parameter]:
    """Give every qualifying conv in `module` the widening forward, its weight copied to `device` as it is stored
    (a copy also on the CPU: a weight loaded from a safetensors file is a view of the file's mapping, which would
    stay resident and locked). Returns the weights so kept; the caller places the other parameters."""
    kept = []
    for layer in module.modules():
        if qualifies(layer):
            layer.weight.data = layer.weight.data.to(device, copy=True)
            layer.forward = types.MethodType(_half_weight_forward, layer)
            kept.append(layer.weight)
    return kept


def resolve_half_frozen_convs(requested: bool | None, device, compute_dtype: torch.dtype, torch_compile: bool):
    """(on, why): None means on for fp32 training on a CPU without torch.compile. Off whatever was asked when the
    compute dtype is not fp32: the frozen weights are then in fp16/bf16 anyway."""
    if compute_dtype != torch.float32:
        return False, f"frozen weights are {'bf16' if compute_dtype == torch.bfloat16 else 'fp16'} already"
    if requested is not None:
        return requested, "set"
    if torch.device(device).type != "cpu":
        return False, "auto: off on a GPU, where fp32 training is rare and speed comes first"
    if torch_compile:
        return False, "auto: off with torch_compile"
    return True, "auto: on for fp32 training on the CPU"
