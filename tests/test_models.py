import json
import struct

import pytest
import torch

from trainer.base_models.builtin import build_tiny
from trainer.base_models.detect import detect_family
from trainer.base_models.load import load_base_model
from trainer.errors import DreamLoomError
from trainer.files.safetensors_header import read_safetensors_header


def test_tiny_is_deterministic_and_small():
    a, b = build_tiny(), build_tiny()
    assert a.fingerprint == b.fingerprint
    for (k, va), (_, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(va, vb), k
    assert sum(p.numel() for p in a.unet.parameters()) < 2_000_000
    ids = a.tokenizer("a sks african fabric pattern").input_ids
    assert ids == [49406, 320, 48136, 4736, 10033, 7447, 49407]  # the real CLIP BPE
    attn = [n for n, _ in a.unet.named_modules() if n.endswith("attn1.to_q")]
    assert attn, "tiny UNet must have attention modules for LoRA"


def _header_file(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _fake_ckpt(tmp_path, keys: dict, name="m.safetensors"):
    header, offset = {}, 0
    for k, shape in keys.items():
        n = 2
        for s in shape:
            n *= s
        header[k] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return _header_file(tmp_path / name, header, b"\0" * offset)


SD15_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [4, 4],
}


@pytest.mark.parametrize(
    "keys,family",
    [
        (SD15_KEYS, "SD1.5"),
        ({**SD15_KEYS, "conditioner.embedders.1.model.ln_final.weight": [2]}, "SDXL"),
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
                "cond_stage_model.model.ln_final.weight": [2],
            },
            "SD2",
        ),
        ({**SD15_KEYS, "model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3]}, "SD1.5 inpainting"),
        ({"lora_unet_down_blocks_0.alpha": [1]}, "not a full checkpoint"),
    ],
)
def test_family_detection_and_refusal(tmp_path, keys, family):
    path = _fake_ckpt(tmp_path, keys)
    assert detect_family(read_safetensors_header(path)).startswith(family)
    if family != "SD1.5":
        # an incomplete SDXL file (no CLIP ViT-L here) is named and refused too, before any weight is read
        with pytest.raises(DreamLoomError, match="which DreamLoom cannot train") as info:
            load_base_model(str(path))
        assert family.split()[0] in str(info.value)
        assert "SD1.5" in info.value.hint and "SDXL base" in info.value.hint


def test_detect_family_names_what_diffusers_calls_sd15():
    """Why detect.py is ours: diffusers' model-type inference answers "v1" (SD1.5) for layouts it does not
    know, so a LoRA or a Flux file would be loaded as SD1.5; ours names them and the loader refuses them."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    for keys, ours in (
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": [1]}, "not a full checkpoint"),
        ({"double_blocks.0.img_attn.qkv.weight": [9, 3]}, "Flux"),
    ):
        assert infer_diffusers_model_type(dict.fromkeys(keys)) == "v1"
        assert detect_family({k: {"shape": v} for k, v in keys.items()}).startswith(ours)
    assert detect_family({k: {"shape": v} for k, v in SD15_KEYS.items()}) == "SD1.5"


def test_bad_model_files(tmp_path):
    with pytest.raises(DreamLoomError, match="not found"):
        load_base_model(str(tmp_path / "missing.safetensors"))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 pickle")
    with pytest.raises(DreamLoomError, match="pickle"):
        load_base_model(str(ckpt))
    huge = _header_file(tmp_path / "huge.safetensors", {})
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(DreamLoomError, match="corrupt or malicious safetensors header"):
        load_base_model(str(huge))
    full = _fake_ckpt(tmp_path, SD15_KEYS, "trunc.safetensors")
    full.write_bytes(full.read_bytes()[:-100])
    with pytest.raises(DreamLoomError, match="truncated"):
        load_base_model(str(full))
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(DreamLoomError, match="not a valid safetensors"):
        load_base_model(str(tmp_path / "short.safetensors"))
    garbage = _header_file(tmp_path / "garbage.safetensors", {})
    garbage.write_bytes(struct.pack("<Q", 5) + b"\xff\xfe{[x")
    with pytest.raises(DreamLoomError, match="unreadable"):
        load_base_model(str(garbage))


@pytest.mark.slow
def test_single_file_round_trip_tensor_by_tensor(sd15_parts, sd15_components):
    comps = sd15_components
    assert comps.kind == "single_file" and comps.fingerprint.startswith("sd15-")
    for source, module in (
        (sd15_parts["unet"], comps.unet),
        (sd15_parts["vae"], comps.vae),
        (sd15_parts["text"], comps.text_encoder),
    ):
        loaded = module.state_dict()
        assert set(source) == set(loaded)
        for key, tensor in source.items():
            assert torch.equal(loaded[key].to(torch.float16).reshape(tensor.shape), tensor), key


@pytest.mark.slow
def test_diffusers_folder_loads(sd15_components, tmp_path):
    from trainer.base_models.load import load_base_model

    tiny = build_tiny()
    folder = tmp_path / "tiny_diffusers"
    from trainer.inference.pipelines import make_pipeline

    make_pipeline(tiny).save_pretrained(folder)
    with pytest.raises(DreamLoomError, match="not an SD1.5 model"):
        load_base_model(str(folder))
    with pytest.raises(DreamLoomError, match="not a diffusers model folder"):
        load_base_model(str(tmp_path))


@pytest.mark.parametrize(
    "markers,prediction,zero_snr",
    [((), "epsilon", False), (("v_pred",), "v_prediction", False), (("v_pred", "ztsnr"), "v_prediction", True)],
)
def test_scheduler_follows_the_files_prediction_markers(markers, prediction, zero_snr):
    from diffusers import DDPMScheduler

    from trainer.base_models.sd15 import scheduler_config_for_file

    config = scheduler_config_for_file(
        {**{k: {"shape": [0]} for k in markers}, **{k: {"shape": v} for k, v in SD15_KEYS.items()}}
    )
    scheduler = DDPMScheduler.from_config(config)
    assert scheduler.config.prediction_type == prediction
    assert bool(scheduler.config.rescale_betas_zero_snr) == zero_snr
    assert (float(scheduler.alphas_cumprod[-1]) < 1e-6) == zero_snr  # the last step is pure noise


@pytest.mark.slow
def test_v_prediction_checkpoint_loads_as_v_prediction(sd15_parts, tmp_path):
    from trainer.formats.ldm_layout import write_ldm_checkpoint

    p = sd15_parts
    path = tmp_path / "v.safetensors"
    write_ldm_checkpoint(
        path, p["unet"], p["vae"], p["text"], p["unet_config"], p["vae_config"], extra={"v_pred": torch.tensor([])}
    )
    comps = load_base_model(str(path))
    assert comps.noise_scheduler().config.prediction_type == "v_prediction"


def test_prompts_are_cut_at_clips_77_positions_whatever_the_tokenizer_claims():
    from trainer.base_models.components import load_tokenizer
    from trainer.base_models.sd15 import SD15

    tokenizer = load_tokenizer()
    tokenizer.model_max_length = 8192  # as some diffusers folders' tokenizer_config.json say
    ids = SD15.tokenize(tokenizer, ["a sks african fabric pattern " * 40, "short"])
    assert ids.shape == (2, 77)


def test_text_encoder_files_load_across_the_text_model_level_change():
    """transformers 5.6 dropped CLIPTextModel's `text_model.` level; files written on either side load on both."""
    from trainer.base_models.components import match_text_model_level

    class Nested:
        def state_dict(self):
            return {"text_model.embeddings.token_embedding.weight": 0}

    class Flat:
        def state_dict(self):
            return {"embeddings.token_embedding.weight": 0}

    flat = {"embeddings.token_embedding.weight": 1}
    nested = {"text_model.embeddings.token_embedding.weight": 1}
    assert match_text_model_level(flat, Nested()) == nested and match_text_model_level(nested, Nested()) == nested
    assert match_text_model_level(nested, Flat()) == flat and match_text_model_level(flat, Flat()) == flat
