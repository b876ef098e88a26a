import copy

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.formats.lora_export import kohya_state_dict
from trainer.training.loop import Trainer
from trainer.training.methods.lora import LoRAMethod


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 4, 8, 8), generator=g)
    t = torch.tensor([100, 700])
    enc = torch.randn((2, 77, unet.config.cross_attention_dim), generator=g)
    with torch.no_grad():
        return unet(x, t, enc).sample


@pytest.fixture
def trained(fabric_dir, tmp_path):
    from trainer.base_models.builtin import build_tiny

    cfg = tiny_config(fabric_dir, max_train_steps=5, rank=4, alpha=8, learning_rate=5e-3, with_prior_preservation=False)
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny())
    trainer.run()
    trainer.comps.unet.eval()
    return trainer


def test_diffusers_file_reproduces_the_trained_unet(trained):
    from trainer.base_models.builtin import build_tiny
    from trainer.inference.pipelines import make_pipeline

    expected = _unet_out(trained.comps.unet)
    fresh = build_tiny()
    base = _unet_out(fresh.unet)
    assert (expected - base).abs().max() > 1e-3  # the LoRA does something
    pipe = make_pipeline(fresh)
    result = trained.run_dir / "result"
    pipe.load_lora_weights(str(result), weight_name="pytorch_lora_weights.safetensors")
    got = _unet_out(pipe.unet)
    assert (got - expected).abs().max() < 1e-4


def test_kohya_file_metadata_and_diffusers_load(trained):
    from trainer.base_models.builtin import build_tiny
    from trainer.inference.pipelines import make_pipeline

    path = trained.run_dir / "result" / "sks_fabric.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 8.0
    assert meta["dreamloom.token"] == "sks" and meta["dreamloom.steps"] == "5"
    assert all(k.startswith("lora_unet_") for k in keys)
    sd = load_file(str(path))
    assert all(v.item() == 8.0 for k, v in sd.items() if k.endswith(".alpha"))
    # kohya format also loads in diffusers at the trained scale
    expected = _unet_out(trained.comps.unet)
    pipe = make_pipeline(build_tiny())
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    assert (_unet_out(pipe.unet) - expected).abs().max() < 1e-4


@pytest.mark.slow
def test_kohya_export_of_full_size_sd15_unet(sd15_components, fabric_dir):
    from peft.utils import get_peft_model_state_dict

    comps = copy.copy(sd15_components)
    comps.unet = copy.deepcopy(sd15_components.unet)
    cfg = tiny_config(fabric_dir, rank=4, alpha=8)
    LoRAMethod(cfg).setup(comps)
    # Give lora_B non-zero values so the scale is observable.
    g = torch.Generator().manual_seed(1)
    for name, p in comps.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.01
    sd = kohya_state_dict(get_peft_model_state_dict(comps.unet), None, cfg.alpha)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert len(modules) == 128
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(sd)
        assert sd[f"{m}.lora_down.weight"].shape[0] == 4
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in modules
    # alpha / rank reproduces the trained scale: W_eff - W = (alpha / r) * up @ down
    layer = comps.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    m = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    x = torch.randn(3, layer.in_features, generator=g)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    up, down, alpha = sd[f"{m}.lora_up.weight"], sd[f"{m}.lora_down.weight"], sd[f"{m}.alpha"].item()
    ours = x @ (alpha / down.shape[0] * up @ down).T
    assert torch.allclose(delta, ours, atol=1e-5)
