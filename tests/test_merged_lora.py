"""The merged-weight LoRA forward (trainer/training/merged_lora.py): PEFT's numbers, fewer operators, and PEFT's own
forward wherever the merged one would not compute the same thing."""

import copy

import torch
from conftest import tiny_config
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from trainer.training.loop import Trainer
from trainer.training.merged_lora import use_merged_weight_forward


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(16, 16)
        self.to_out = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.to_out(torch.relu(self.to_q(x)))


def _adapted(dropout=0.0, use_dora=False):
    torch.manual_seed(0)
    model = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_out"], lora_dropout=dropout, use_dora=use_dora),
        Block(),
    )
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:  # PEFT starts B at zero; a trained adapter has a non-zero update
            nn.init.normal_(p, std=0.1)
    return model


def _output_and_grads(model, x):
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_merged_forward_gives_peft_outputs_and_gradients():
    peft_model = _adapted()
    merged = copy.deepcopy(peft_model)
    assert use_merged_weight_forward(merged) == 2
    x = torch.randn(3, 5, 16)
    out_peft, grads_peft = _output_and_grads(peft_model, x)
    out_merged, grads_merged = _output_and_grads(merged, x)
    torch.testing.assert_close(out_merged, out_peft, rtol=1e-5, atol=1e-6)
    assert grads_merged.keys() == grads_peft.keys() and len(grads_peft) == 4
    for name in grads_peft:
        torch.testing.assert_close(grads_merged[name], grads_peft[name], rtol=1e-4, atol=1e-6)
    # the scale is read at call time (diffusers' LoRA scale changes it between calls)
    for model in (peft_model, merged):
        model.to_q.scaling["default"] = 0.5
    torch.testing.assert_close(merged(x), peft_model(x), rtol=1e-5, atol=1e-6)


def test_merged_forward_steps_aside_where_it_would_differ():
    model = _adapted()
    reference = copy.deepcopy(model)
    use_merged_weight_forward(model)
    x = torch.randn(2, 16)
    # adapters switched off: the base layers alone, as PEFT gives
    for m in (model, reference):
        for layer in (m.to_q, m.to_out):
            layer.enable_adapters(False)
    torch.testing.assert_close(model(x), reference(x))
    plain = Block()
    base_weights = {k.replace("base_layer.", ""): v for k, v in reference.state_dict().items() if "lora" not in k}
    plain.load_state_dict(base_weights)
    torch.testing.assert_close(model(x), plain(x))
    for m in (model, reference):
        for layer in (m.to_q, m.to_out):
            layer.enable_adapters(True)
    # autocast: PEFT's forward (adding a small update to a bf16 weight would round it away)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x), reference(x))
    # layers whose update is not W + scale * B @ A keep PEFT's forward
    assert use_merged_weight_forward(_adapted(dropout=0.1)) == 0
    assert use_merged_weight_forward(_adapted(use_dora=True)) == 0


def test_real_model_widths_keep_peft_forward():
    """SD1.5's attention projections (320 x 320 and up): the merged weight would cost memory and arithmetic."""
    layers = nn.Sequential(nn.Linear(320, 320), nn.Linear(128, 128))
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["0", "1"]), layers)
    assert use_merged_weight_forward(model) == 1
    assert "forward" not in vars(model[0]) and "forward" in vars(model[1])


def test_lora_training_with_the_merged_forward_matches_peft(fabric_dir, tmp_path, monkeypatch):
    """The trainer uses it for UNet and text-encoder LoRA, and a run ends with PEFT's weights to float rounding."""
    from trainer.base_models.builtin import build_tiny
    from trainer.training.methods import lora

    calls = []
    monkeypatch.setattr(lora, "use_merged_weight_forward", lambda m: calls.append(use_merged_weight_forward(m)))
    cfg = tiny_config(fabric_dir, max_train_steps=5, train_text_encoder=True)

    def trained(name):
        trainer = Trainer(cfg, tmp_path / name, comps=build_tiny(), cache_root=tmp_path / "cache")
        trainer.run()
        return {k: v.clone() for k, v in trainer.method.trainable_state(trainer.comps).items()}

    merged = trained("merged")
    assert len(calls) == 2 and all(n > 0 for n in calls), calls  # the UNet's layers and the text encoder's
    monkeypatch.setattr(lora, "use_merged_weight_forward", lambda m: None)
    with_peft = trained("peft")
    assert merged.keys() == with_peft.keys()
    # AdamW turns a rounding-sized difference in a near-zero gradient into up to a step's update (lr): 1.6e-6 was
    # measured on an AMD EPYC against 1e-3 steps; a wrong merged weight would be off by whole updates
    for key in with_peft:
        torch.testing.assert_close(merged[key], with_peft[key], rtol=1e-4, atol=1e-5, msg=key)
    changed = [k for k in with_peft if "lora_B" in k and with_peft[k].abs().max() > 0]
    assert changed, "the LoRA did not train"


def test_merged_forward_leaves_other_devices_to_peft():
    """Off the CPU (GPUs; here the meta device stands in) PEFT's forward runs: the merged one is a CPU measure."""
    device = "meta"
    model = _adapted().to(device)
    use_merged_weight_forward(model)
    seen = []
    original = type(model.to_q).forward

    def spy(self, x, *args, **kwargs):
        seen.append(x.device.type)
        return original(self, x, *args, **kwargs)

    type(model.to_q).forward = spy
    try:
        model(torch.empty(2, 16, device=device))
    finally:
        type(model.to_q).forward = original
    assert seen == [device, device]
