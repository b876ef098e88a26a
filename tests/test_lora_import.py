import copy
import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from helpers.sd15_layout import sd15_kohya_unet_modules
from trainer.errors import DreamLoomError
from trainer.formats.lora_import import convert_state_dict, detect_format, load_lora_file


def _deltas(imported):
    """module -> effective weight delta (alpha / rank) * up @ down."""
    out = {}
    for m in imported.modules:
        down, up = imported.tensors[f"{m}.lora_down.weight"].float(), imported.tensors[f"{m}.lora_up.weight"].float()
        alpha = float(imported.tensors[f"{m}.alpha"])
        out[m] = alpha / down.shape[0] * up @ down
    return out


@pytest.mark.slow
def test_kohya_diffusers_and_raw_peft_map_to_the_same_modules_and_scale(sd15_components, tmp_path, fabric_dir):
    from peft.utils import get_peft_model_state_dict

    from trainer.formats.lora_export import save_diffusers, save_kohya
    from trainer.training.methods.lora import LoRAMethod

    comps = copy.copy(sd15_components)
    comps.unet = copy.deepcopy(sd15_components.unet)
    cfg = tiny_config(fabric_dir, rank=4, alpha=32.0)  # the tutorial's r=4, lora_alpha=32: scale 8
    method = LoRAMethod(cfg)
    method.setup(comps)
    g = torch.Generator().manual_seed(2)
    for name, p in comps.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.01
    peft_sd = get_peft_model_state_dict(comps.unet)

    kohya_path = save_kohya(tmp_path / "k" / "fabric.safetensors", comps, peft_sd, {}, cfg.alpha, {})
    (tmp_path / "d").mkdir()
    diffusers_path = save_diffusers(
        tmp_path / "d" / "pytorch_lora_weights.safetensors", comps, peft_sd, {}, method.lora_config(cfg.lora_targets)
    )
    # Raw PEFT as PeftModel.save_pretrained writes it (the tutorial's published format).
    peft_dir = tmp_path / "p"
    peft_dir.mkdir()
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in peft_sd.items()},
        str(peft_dir / "adapter_model.safetensors"),
    )
    (peft_dir / "adapter_config.json").write_text(
        json.dumps(
            {"r": 4, "lora_alpha": 32, "peft_type": "LORA", "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}
        )
    )
    imported = {
        fmt: load_lora_file(p)
        for fmt, p in (
            ("kohya", kohya_path),
            ("diffusers", diffusers_path),
            ("peft", peft_dir / "adapter_model.safetensors"),
        )
    }
    assert {v.source_format for v in imported.values()} == {"kohya", "diffusers", "peft"}
    sd15 = sd15_kohya_unet_modules()
    modules = {fmt: set(v.modules) for fmt, v in imported.items()}
    assert modules["kohya"] == modules["diffusers"] == modules["peft"]
    assert len(modules["kohya"]) == 128 and modules["kohya"] <= sd15
    ref = _deltas(imported["kohya"])
    for fmt in ("diffusers", "peft"):
        got = _deltas(imported[fmt])
        for m in ref:
            assert torch.allclose(got[m], ref[m], atol=1e-7), (fmt, m)
    # ... and that delta is what the trained PEFT layer adds (scale 8).
    layer = comps.unet.up_blocks[1].attentions[2].transformer_blocks[0].attn1.to_v
    m = "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_v"
    x = torch.randn(2, layer.in_features, generator=g)
    with torch.no_grad():
        assert torch.allclose(layer(x) - layer.base_layer(x), x @ ref[m].T, atol=1e-5)
    assert float(imported["peft"].tensors[f"{m}.alpha"]) == 32.0


def test_raw_peft_without_config_and_unknown_keys_are_errors(tmp_path):
    sd = {
        "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(
            4, 320
        ),
        "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(
            320, 4
        ),
    }
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(DreamLoomError, match="adapter_config.json"):
        load_lora_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True}))
    imp = load_lora_file(tmp_path / "adapter_model.safetensors")
    # rsLoRA: scale alpha/sqrt(r) = 4, so the kohya alpha is 16 (16 / 4 = 4).
    assert float(next(v for k, v in imp.tensors.items() if k.endswith(".alpha"))) == pytest.approx(16.0)
    bad = dict(sd)
    bad["base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"] = (
        torch.zeros(320)
    )
    with pytest.raises(DreamLoomError, match="cannot be mapped.*lora_magnitude_vector"):
        convert_state_dict(bad, adapter_config={"r": 4, "lora_alpha": 4})
    with pytest.raises(DreamLoomError, match="Unrecognised"):
        convert_state_dict({"weird.key": torch.zeros(1)})
    with pytest.raises(DreamLoomError, match="lacks its down or up"):
        convert_state_dict({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)})
    with pytest.raises(DreamLoomError, match="not found"):
        load_lora_file(tmp_path / "missing.safetensors")


def test_text_encoder_keys_and_old_processor_format():
    sd = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": torch.ones(2, 8),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": torch.ones(8, 2),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight": torch.ones(2, 8),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight": torch.ones(8, 2),
    }
    assert detect_format(sd) == "diffusers"
    imp = convert_state_dict(sd)
    assert set(imp.modules) == {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
    }
    assert all(float(imp.tensors[f"{m}.alpha"]) == 2.0 for m in imp.modules)  # no alpha stored: scale 1
    assert imp.notes


@pytest.mark.parametrize(
    "sd,needle",
    [
        (
            {
                "lora_unet_a.lora_down.weight": torch.zeros(2, 3),
                "lora_unet_a.lora_up.weight": torch.zeros(3, 2),
                "lora_unet_a.alpha": torch.zeros(2, 2),
            },
            "not a single number",
        ),  # found by the fuzzer
        (
            {
                "unet.x.lora_A.weight": torch.zeros(2, 3),
                "unet.x.lora_B.weight": torch.zeros(3, 2),
                "unet.x.alpha": torch.zeros(3),
            },
            "not a single number",
        ),
        ({"unet.x.lora_A.weight": torch.zeros(2, 3), "unet.x.lora_B.weight": torch.zeros(3, 5)}, "mismatched shapes"),
        (
            {
                "lora_unet_a.lora_down.weight": torch.zeros(2, 3),
                "lora_unet_a.lora_up.weight": torch.zeros(3, 2),
                "lora_unet_a.alpha": torch.tensor(float("nan")),
            },
            "alpha nan",
        ),
    ],
)
def test_malformed_modules_are_clear_errors(sd, needle):
    with pytest.raises(DreamLoomError, match=needle):
        convert_state_dict(sd)


@pytest.mark.parametrize("keys", [["emb_params"], ["clip_g", "clip_l"]])
def test_an_embedding_given_as_a_lora_is_named_as_an_embedding(keys):
    with pytest.raises(DreamLoomError) as refused:
        convert_state_dict({key: torch.zeros(2, 8) for key in keys})
    assert f"is a textual-inversion embedding (keys {', '.join(keys)}), not a LoRA" in refused.value.message
    assert "embedding:" in refused.value.hint and "--embedding" in refused.value.hint
