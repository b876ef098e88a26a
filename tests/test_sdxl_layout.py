"""SDXL's original (sgm) single-file layout, checked against diffusers' own converters; kohya's SDXL UNet module
names; which family a checkpoint is. Tiny models carry weights; the full-size ones live on the meta device."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer.base_models.components import text_model_path
from trainer.base_models.detect import detect_family
from trainer.formats import ldm_layout as ldm

TE1, TE2, POOLED = 32, 48, 16  # tiny widths; diffusers tells the two CLIPs apart by width, so they differ

TINY_UNET = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + POOLED,
    cross_attention_dim=TE1 + TE2,
    norm_num_groups=8,
    sample_size=16,
)
TINY_VAE = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=4,
    sample_size=32,
)


def _clip_config(width, layers, act, projection):
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def _randomised(module, seed):
    """Every parameter random (norms too), so that a swapped tensor cannot pass as equal."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_sdxl():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    te1_cfg = _clip_config(TE1, 2, "quick_gelu", TE1)
    te2_cfg = _clip_config(TE2, 3, "gelu", POOLED)
    te1, te2 = CLIPTextModel(te1_cfg), CLIPTextModelWithProjection(te2_cfg)
    sds = {name: _randomised(m, i) for i, (name, m) in enumerate(dict(unet=unet, vae=vae, te1=te1, te2=te2).items())}
    return {
        **sds,
        "unet_config": dict(unet.config),
        "vae_config": dict(vae.config),
        "te1_config": te1_cfg,
        "te2_config": te2_cfg,
        "ldm": ldm.to_sdxl_ldm_state_dict(
            sds["unet"], sds["vae"], sds["te1"], sds["te2"], dict(unet.config), dict(vae.config)
        ),
    }


def _assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def test_layout_prefixes_and_the_open_clip_extras(tiny_sdxl):
    sd = tiny_sdxl["ldm"]
    prefixes = {k.split(".")[0] if not k.startswith("conditioner.") else ".".join(k.split(".")[:4]) for k in sd}
    assert prefixes == {
        "model",
        "first_stage_model",
        "conditioner.embedders.0.transformer",
        "conditioner.embedders.1.model",
    }
    assert all(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in sd if "embedders.0" in k)
    assert torch.equal(
        sd["model.diffusion_model.label_emb.0.0.weight"], tiny_sdxl["unet"]["add_embedding.linear_1.weight"]
    )
    oc = "conditioner.embedders.1.model."
    assert sd[oc + "logit_scale"].shape == () and sd[oc + "logit_scale"].item() == pytest.approx(4.6052, abs=1e-4)
    assert sd[oc + "text_projection"].shape == (TE2, POOLED)  # [width, projection], used as x @ text_projection
    assert torch.equal(sd[oc + "text_projection"], tiny_sdxl["te2"]["text_projection.weight"].T)
    assert sd[oc + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * TE2, TE2)
    # SDXL's first level has no attention; its first attention sits in input_blocks.4 (depth 2 there)
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in sd)
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in sd
    # upsamplers after an attention block take slot 2, the plain up block (last) has none
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in sd
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in sd


def test_unet_vae_match_diffusers_converters(tiny_sdxl):
    sd = tiny_sdxl["ldm"]
    _assert_same(sfu.convert_ldm_unet_checkpoint(sd, tiny_sdxl["unet_config"]), tiny_sdxl["unet"])
    _assert_same(sfu.convert_ldm_vae_checkpoint(sd, tiny_sdxl["vae_config"]), tiny_sdxl["vae"])


def test_text_encoders_match_diffusers_converters(tiny_sdxl):
    sd = tiny_sdxl["ldm"]
    want1 = {text_model_path(k): v for k, v in tiny_sdxl["te1"].items()}
    _assert_same(sfu.convert_ldm_clip_checkpoint(sd), want1)
    te2 = CLIPTextModelWithProjection(tiny_sdxl["te2_config"])
    got2 = sfu.convert_open_clip_checkpoint(te2, sd, prefix="conditioner.embedders.1.model.")
    _assert_same(got2, tiny_sdxl["te2"])


def test_from_single_file_loads_what_we_write(tiny_sdxl, tmp_path):
    """diffusers' own single-file loaders (model detection, config, conversion) on a file written by us."""
    t = tiny_sdxl
    path = tmp_path / "tiny_sdxl.safetensors"
    ldm.write_sdxl_checkpoint(
        path, t["unet"], t["vae"], t["te1"], t["te2"], t["unet_config"], t["vae_config"], metadata={"a": "b"}
    )
    _assert_same(load_file(path), {k: v.contiguous() for k, v in t["ldm"].items()})

    UNet2DConditionModel.from_config(t["unet_config"]).save_config(tmp_path / "unet")
    AutoencoderKL.from_config(t["vae_config"]).save_config(tmp_path / "vae")
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(tmp_path / "unet"), local_files_only=True)
    _assert_same(unet.state_dict(), t["unet"])
    vae = AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "vae"), local_files_only=True)
    _assert_same(vae.state_dict(), t["vae"])

    checkpoint = load_file(path)
    for cls, cfg, want in (
        (CLIPTextModel, t["te1_config"], t["te1"]),
        (CLIPTextModelWithProjection, t["te2_config"], t["te2"]),
    ):
        cfg.save_pretrained(tmp_path / cls.__name__)
        model = sfu.create_diffusers_clip_model_from_ldm(
            cls, checkpoint, config=str(tmp_path / cls.__name__), local_files_only=True
        )
        state = model.state_dict()
        _assert_same({k: state[k] for k in want}, want)


def test_round_trips_are_exact(tiny_sdxl):
    t = tiny_sdxl
    back = ldm.from_sdxl_ldm_state_dict(t["ldm"], t["unet_config"], t["vae_config"])
    _assert_same(back["unet"], t["unet"])
    _assert_same(back["vae"], t["vae"])
    _assert_same(back["text"], {text_model_path(k): v for k, v in t["te1"].items()})
    _assert_same(back["text_2"], t["te2"])
    oc = ldm.open_clip_from_hf(t["te2"])
    _assert_same(ldm.hf_from_open_clip(oc), t["te2"])
    _assert_same(ldm.open_clip_from_hf(ldm.hf_from_open_clip(oc)), oc)
    # without `text_model.` (a flattened CLIPTextModelWithProjection), and without logit_scale
    flat = {k.removeprefix("text_model."): v for k, v in t["te2"].items()}
    assert ldm.open_clip_from_hf(flat, logit_scale=None).keys() == oc.keys() - {"logit_scale"}
    parts = ldm.split_sdxl_state_dict({**t["ldm"], "v_pred": torch.zeros(0)})
    assert sum(len(p) for p in parts.values()) == len(t["ldm"])
    assert parts["text_2"]["positional_embedding"].shape == (77, TE2)


def test_open_clip_attention_is_the_same_computation(tiny_sdxl):
    """The fused in_proj is q, k, v in that order: torch's MultiheadAttention (OpenCLIP's) on our weights gives
    what the Hugging Face layer gives."""
    sd = ldm.open_clip_from_hf(tiny_sdxl["te2"])
    mha = torch.nn.MultiheadAttention(TE2, 4, batch_first=True)
    mha.load_state_dict({k.removeprefix("transformer.resblocks.1.attn."): v for k, v in sd.items() if ".1.attn." in k})
    te2 = CLIPTextModelWithProjection(tiny_sdxl["te2_config"])
    te2.load_state_dict(tiny_sdxl["te2"], strict=False)
    x = torch.randn(2, 5, TE2)
    with torch.no_grad():
        want = te2.text_model.encoder.layers[1].self_attn(x)[0]
        got = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _linear_and_conv(unet):
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _assert_bijection(unet, config):
    names = _linear_and_conv(unet)
    paths = [ldm.unet_module_to_ldm(n, config) for n in names]
    assert len(set(paths)) == len(names)
    assert [ldm.ldm_module_to_unet(p, config) for p in paths] == names
    table = ldm.kohya_ldm_unet_table(names, config)
    assert len(table) == len(names) and sorted(table.values()) == sorted(names)
    # every parameter key too, both ways
    keys = list(unet.state_dict())
    assert [ldm.ldm_key_to_unet(k, config) for k in ldm.unet_to_ldm(dict.fromkeys(keys), config)] == keys
    return table


def test_kohya_names_are_a_bijection_on_the_tiny_unet(tiny_sdxl):
    unet = UNet2DConditionModel(**TINY_UNET)
    _assert_bijection(unet, tiny_sdxl["unet_config"])


@pytest.fixture(scope="module")
def full():
    from helpers.sdxl_layout import sdxl_configs, sdxl_meta_models

    cfg = sdxl_configs()
    return {"configs": cfg, "models": sdxl_meta_models(cfg)}


def test_kohya_names_on_full_size_sdxl(full):
    from helpers.sdxl_layout import sdxl_kohya_unet_modules

    cfg = full["configs"]["unet"]
    table = _assert_bijection(full["models"]["unet"], cfg)
    assert set(table) == sdxl_kohya_unet_modules()
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert ldm.kohya_ldm_unet_name(q, cfg) == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    for module, path in {
        q: "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        "mid_block.attentions.0.transformer_blocks.3.attn2.to_v": "middle_block.1.transformer_blocks.3.attn2.to_v",
        "up_blocks.0.attentions.0.proj_in": "output_blocks.0.1.proj_in",
        "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2": "output_blocks.1.1.transformer_blocks.0.ff.net.2",
        "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_v": "output_blocks.5.1.transformer_blocks.1.attn2.to_v",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "add_embedding.linear_1": "label_emb.0.0",
        "up_blocks.2.resnets.0.conv_shortcut": "output_blocks.6.0.skip_connection",
    }.items():
        assert ldm.unet_module_to_ldm(module, cfg) == path
        assert table["lora_unet_" + path.replace(".", "_")] == module
    # sd-scripts' default SDXL LoRA ("create LoRA for U-Net: 722 modules"): the Linear layers of the transformers
    attention = {n for n in table.values() if ".attentions." in n}
    assert len(attention) == 722


def test_full_size_shapes_are_what_diffusers_converters_expect(full):
    """Mapping only, on the meta device: every full-size tensor lands where diffusers' converters take it from."""
    cfg, models = full["configs"], full["models"]
    sds = {name: m.state_dict() for name, m in models.items()}
    sd = ldm.to_sdxl_ldm_state_dict(sds["unet"], sds["vae"], sds["text"], sds["text_2"], cfg["unet"], cfg["vae"])
    unet = sfu.convert_ldm_unet_checkpoint(sd, cfg["unet"])
    assert sorted(unet) == sorted(sds["unet"])
    for k, v in sds["unet"].items():
        assert unet[k] is v, k
    vae = sfu.convert_ldm_vae_checkpoint(sd, cfg["vae"])
    assert {k: tuple(v.shape) for k, v in vae.items()} == {k: tuple(v.shape) for k, v in sds["vae"].items()}
    te2 = sfu.convert_open_clip_checkpoint(models["text_2"], sd, prefix=ldm.SDXL_TEXT_2_PREFIX)
    assert {k: tuple(v.shape) for k, v in te2.items()} == {k: tuple(v.shape) for k, v in sds["text_2"].items()}
    assert sfu.infer_diffusers_model_type(sd) == "xl_base"
    # the real sd_xl_base_1.0 names and shapes
    for key, shape in {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert len([k for k in sd if k.startswith("model.diffusion_model.")]) == 1680
    assert len(sd) == 2514  # UNet 1680, VAE 248, CLIP-L 196 (no position_ids buffer), OpenCLIP bigG 390


# ---------------------------------------------------------------- detect_family on realistic headers


def _header(sd: dict) -> dict:
    return {k: {"dtype": "F16", "shape": list(v.shape)} for k, v in sd.items()}


@pytest.fixture(scope="module")
def sdxl_header(full):
    cfg, models = full["configs"], full["models"]
    sds = {name: m.state_dict() for name, m in models.items()}
    return _header(
        ldm.to_sdxl_ldm_state_dict(sds["unet"], sds["vae"], sds["text"], sds["text_2"], cfg["unet"], cfg["vae"])
    )


def _meta_unet_header(config: dict) -> dict:
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return _header({ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(unet.state_dict(), config).items()})


REFINER_UNET = {  # stabilityai/stable-diffusion-xl-refiner-1.0's UNet
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
    "use_linear_projection": True,
    "sample_size": 128,
}


def test_detect_sdxl_base_inpainting_and_edit_variants(sdxl_header):
    assert detect_family(sdxl_header) == "SDXL"
    assert detect_family({**sdxl_header, "__metadata__": {"modelspec.title": "x"}}) == "SDXL"
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert detect_family({**sdxl_header, key: {"shape": [320, 9, 3, 3]}}) == "SDXL inpainting"
    assert detect_family({**sdxl_header, key: {"shape": [320, 8, 3, 3]}}).startswith(
        "an SDXL variant with 8 input channels"
    )
    assert detect_family({**sdxl_header, "edm_mean": {"shape": [1, 4, 1, 1]}}).startswith("Playground v2.5")


def test_detect_sdxl_refiner(full):
    from trainer.formats.ldm_layout import SDXL_REFINER_TEXT_PREFIX, open_clip_from_hf

    cfg, models = full["configs"], full["models"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(REFINER_UNET)
    sd = {ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(unet.state_dict(), REFINER_UNET).items()}
    sd.update({ldm.VAE_PREFIX + k: v for k, v in ldm.vae_to_ldm(models["vae"].state_dict(), cfg["vae"]).items()})
    text = open_clip_from_hf(models["text_2"].state_dict())
    sd.update({SDXL_REFINER_TEXT_PREFIX + k: v for k, v in text.items()})
    assert sfu.infer_diffusers_model_type(sd) == "xl_refiner"
    header = _header(sd)
    assert detect_family(header) == "SDXL refiner"
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert detect_family({**header, key: {"shape": [384, 9, 3, 3]}}) == "SDXL refiner inpainting"
    # SD2's OpenCLIP-H (1024 wide) in the sgm layout is not a refiner
    sd2ish = {**header, SDXL_REFINER_TEXT_PREFIX + "ln_final.weight": {"shape": [1024]}}
    assert "1024-wide OpenCLIP" in detect_family(sd2ish)


def test_detect_non_standard_sdxl_unets(sdxl_header, full):
    base = {k: v for k, v in sdxl_header.items() if not k.startswith(ldm.UNET_PREFIX)}
    ssd = dict(full["configs"]["unet"], transformer_layers_per_block=[1, 2, 4])  # SSD-1B-like: shallower level 3
    name = detect_family({**base, **_meta_unet_header(ssd)})
    assert name.startswith("an SDXL variant with a non-standard UNet (")
    assert "0,0,0,2,2,0,4,4 / 4 / 4,4,4,2,2,2,0,0,0" in name and "SDXL has 0,0,0,2,2,0,10,10 / 10 /" in name
    vega = dict(full["configs"]["unet"], transformer_layers_per_block=[1, 1, 2])
    assert detect_family({**base, **_meta_unet_header(vega)}).startswith("an SDXL variant with a non-standard UNet (")
    wide = dict(full["configs"]["unet"], block_out_channels=[384, 768, 1536])
    assert detect_family({**base, **_meta_unet_header(wide)}) == "an SDXL variant with 384 base channels"
    narrow_ctx = dict(full["configs"]["unet"], cross_attention_dim=1280)
    assert (
        detect_family({**base, **_meta_unet_header(narrow_ctx)}) == "an SDXL variant with 1280-wide text conditioning"
    )


def test_detect_incomplete_sdxl_files(sdxl_header):
    def without(prefix):
        return {k: v for k, v in sdxl_header.items() if not k.startswith(prefix)}

    assert detect_family(without("conditioner.embedders.0.")).startswith("SDXL without its CLIP ViT-L")
    assert detect_family(without("conditioner.embedders.1.")).startswith("SDXL without its OpenCLIP ViT-bigG")
    assert detect_family(without("model.diffusion_model.")) == "SDXL without a UNet"
    assert detect_family(without("conditioner.")) == "SDXL without text encoders (a lone UNet)"


def test_detect_leaves_sd15_and_sd2_as_they_were(sd15_meta_header):
    assert detect_family(sd15_meta_header) == "SD1.5"
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert detect_family({**sd15_meta_header, key: {"shape": [320, 9, 3, 3]}}) == "SD1.5 inpainting"
    no_text = {k: v for k, v in sd15_meta_header.items() if not k.startswith("cond_stage_model.")}
    assert detect_family(no_text) == "SD1.5 without a text encoder"
    sd2 = {**no_text, "cond_stage_model.model.ln_final.weight": {"shape": [1024]}}
    assert detect_family(sd2) == "SD2"
    assert detect_family({"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": {"shape": []}}).startswith(
        "not a full checkpoint"
    )


@pytest.fixture(scope="module")
def sd15_meta_header():
    from helpers.sd15_layout import SD15_CONFIG_DIR

    unet_cfg = UNet2DConditionModel.load_config(str(SD15_CONFIG_DIR / "unet"))
    vae_cfg = AutoencoderKL.load_config(str(SD15_CONFIG_DIR / "vae"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SD15_CONFIG_DIR / "text_encoder")))
    return _header(ldm.to_ldm_state_dict(unet.state_dict(), vae.state_dict(), te.state_dict(), unet_cfg, vae_cfg))
