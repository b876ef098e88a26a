"""A cheaper forward for small LoRA linear layers on the CPU: one matmul with W + scale * B @ A.

PEFT's `lora.Linear` computes base(x) + scale * B(A(dropout(x))): five operators (and their backward) per layer per
call. On a CPU a small model's step is dominated by such per-operator costs, not by arithmetic: tiny-fabric's UNet
has 56 LoRA layers of at most 128 x 128, and building the adapted weight first (a rank-r addmm) and running one
linear took `bench --base-model tiny-fabric` (batch 1 + 1 prior) from 0.158-0.175 s/step to 0.141-0.150 on this
2-core machine (a bare UNet step with PEFT's layers: batch 1 98-113 ms -> 89-91 ms). The numbers match PEFT's to
float rounding (tests/test_merged_lora.py).

It costs a weight-sized tensor held for the backward and a weight-sized gradient matmul per layer: nothing at toy
widths, but for SD1.5 (attention projections of 320 x 320 to 1280 x 1280, 94 M weights in all) that is 376 MB
more per step and real arithmetic. So only layers of at most MERGE_MAX_WEIGHT weights get it, and only where
it computes what PEFT computes: fp32 on the CPU, no autocast, one active adapter, no dropout, no DoRA, no lora
bias. Everywhere else, GPUs included (where launch costs hide behind CUDA's asynchrony), PEFT's own forward runs.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

MERGE_MAX_WEIGHT = 256 * 256  # elements; toy widths (tiny-fabric: <= 128 x 128) and not SD1.5's (>= 320 x 320)


def _plain_adapter(layer) -> str | None:
    """The name of `layer`'s one active adapter when it is a plain low-rank update of a small enough linear layer
    (what the merged forward computes), else None. Dropout, DoRA, lora bias and widths are fixed once the adapter
    is made, so this is asked once per layer, not per call."""
    names = list(getattr(layer, "active_adapters", []))
    if len(names) != 1 or getattr(layer, "fan_in_fan_out", False):
        return None
    name, base = names[0], layer.get_base_layer()
    plain = (
        name in layer.lora_A
        and isinstance(layer.lora_dropout[name], nn.Identity)
        and not layer.use_dora.get(name, False)
        and not getattr(layer, "lora_bias", {}).get(name, False)
        and isinstance(base, nn.Linear)
        and base.weight.numel() <= MERGE_MAX_WEIGHT
    )
    return name if plain else None


def _merged_weight_forward(layer, x: torch.Tensor, *args, name: str, **kwargs) -> torch.Tensor:
    base = layer.get_base_layer()
    weight = base.weight
    if (
        args
        or kwargs  # PEFT's per-call adapter_names
        or layer.disable_adapters
        or layer.merged
        or layer.active_adapters != [name]
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or torch.is_autocast_enabled("cpu")
    ):
        return type(layer).forward(layer, x, *args, **kwargs)
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return F.linear(x, torch.addmm(weight, lora_b, lora_a, alpha=layer.scaling[name]), base.bias)


def use_merged_weight_forward(model: nn.Module) -> int:
    """Give every eligible PEFT LoRA linear layer in `model` the merged-weight forward (it falls back to PEFT's
    own wherever the call-time conditions above do not hold). Returns how many layers got it."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        name = _plain_adapter(module) if type(module) is LoraLinear else None
        if name is not None:
            module.forward = types.MethodType(functools.partial(_merged_weight_forward, name=name), module)
            count += 1
    return count
