"""SDXL in the nodes (stand-in for nodes/comfy.py; ComfyUI's real classes: tests/integration/test_sdxl_in_comfyui.py):
Load Checkpoint offers tiny-sdxl and tags what it loads with its family, SDXL checkpoint files get SDXL's native size
everywhere a size of 0 means "native", and a LoRA or embedding of the other family is refused naming both sides."""

import json
import struct

import pytest
import torch
from conftest import FakeClip, FakeModel, FakeVAE, pack_error, pack_module, pack_node
from safetensors.torch import save_file

TINY_FABRIC = "tiny-fabric (built-in 128 px fabric model)"
TINY_SDXL = "tiny-sdxl (built-in 64 px SDXL test model)"


_node, _mod, _error = pack_node, pack_module, pack_error


class FakeSDXLClip(FakeClip):
    """A CLIP whose SDXL tokenizers take embeddings clip_l `width_l` and clip_g `width_g` wide."""

    def __init__(self, width_l: int = 768, width_g: int = 1280):
        super().__init__(width_l + width_g)
        self.width_g = width_g
        self.tokenizer.clip_l = type("SDTokenizer", (), {"embedding_size": width_l, "embedding_key": "clip_l"})()
        self.tokenizer.clip_g = type("SDTokenizer", (), {"embedding_size": width_g, "embedding_key": "clip_g"})()

    def encode_from_tokens(self, tokens, return_pooled=False):
        return torch.zeros(1, 77, self.width), torch.zeros(1, self.width_g)


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    """An SDXL base checkpoint as DreamLoom reads it without loading weights: the real header (every key and shape
    of sd_xl_base_1.0 in the sgm layout, from meta-device models) over a sparse file of the full size (6.9 GB that
    take no disk)."""
    from helpers.sdxl_layout import sdxl_meta_models
    from trainer.formats.ldm_layout import to_sdxl_ldm_state_dict

    models = sdxl_meta_models()
    sds = {name: m.state_dict() for name, m in models.items()}
    unet_config, vae_config = dict(models["unet"].config), dict(models["vae"].config)
    sd = to_sdxl_ldm_state_dict(sds["unet"], sds["vae"], sds["text"], sds["text_2"], unet_config, vae_config)
    header, offset = {}, 0
    for key, value in sd.items():
        size = 2 * value.numel()
        header[key] = {"dtype": "F16", "shape": list(value.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("sdxl") / "sd_xl_base_1.0.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def test_loader_offers_tiny_sdxl_and_tags_it_sdxl(fake_comfy):
    runner, checkpoint = _mod("nodes.runner"), _mod("nodes.checkpoint")
    node = _node("DreamLoomLoadCheckpoint")
    combo, opts = node.INPUT_TYPES()["required"]["ckpt_name"]
    assert combo[-1] == TINY_SDXL == runner.BUILTIN_TINY_SDXL and opts["default"] == TINY_FABRIC
    assert "SDXL" in opts["tooltip"] and "SDXL" in node.DESCRIPTION
    for name in ("DreamLoomTrainLoRA", "DreamLoomTrainTextualInversion", "DreamLoomGenerateClassImages"):
        ckpt = _node(name).INPUT_TYPES()["required"]["ckpt_name"]
        assert TINY_SDXL in ckpt[0] and "SDXL" in ckpt[1]["tooltip"], name
    assert runner.resolve_checkpoint(TINY_SDXL) == "tiny-sdxl" and runner.native_resolution("tiny-sdxl") == 64

    model, clip, vae, base = node().load(TINY_SDXL)
    assert fake_comfy.loaded == ("builtin", "tiny-sdxl") and base == TINY_SDXL
    for obj in (model, clip, vae):
        assert checkpoint.base_of(obj) == {
            "label": TINY_SDXL,
            "base_model": "tiny-sdxl",
            "family": "SDXL",
            "native_resolution": 64,
        }


def test_an_sdxl_checkpoint_is_sdxl_at_1024_px_everywhere(fake_comfy, sdxl_file, fabric_dir):
    runner, checkpoint, training = _mod("nodes.runner"), _mod("nodes.checkpoint"), _mod("nodes.training")
    (fake_comfy.models / "checkpoints" / sdxl_file.name).symlink_to(sdxl_file)
    path = runner.resolve_checkpoint(sdxl_file.name)
    assert runner.model_family(path) == "SDXL" and runner.native_resolution(path) == 1024
    assert runner.model_fingerprint(path).startswith("sdxl-")
    model, clip, vae, base = _node("DreamLoomLoadCheckpoint")().load(sdxl_file.name)
    assert fake_comfy.loaded == ("file", path) and base == sdxl_file.name
    assert checkpoint.base_of(model)["family"] == "SDXL" and checkpoint.base_of(vae)["native_resolution"] == 1024
    # Empty Latent and SLERP Noise at SDXL's native 1024 px (8x: 128 x 128 latents)
    latent = _node("DreamLoomEmptyLatent")().build(vae, 0, 0, 1)[0]["samples"]
    assert latent.shape == (1, 4, 128, 128)
    _, noise_latent, n = _node("DreamLoomSlerpNoise")().build("1, 2", 2, "linear", 0, True, 0, 0, vae=vae)
    assert noise_latent["samples"].shape == (n, 4, 128, 128)
    # the training nodes train at 1024 when the images' resolution is 0 (native), on the SDXL file
    ((dataset, _),) = [_node("DreamLoomLoadTrainingImages")().load(str(fabric_dir), 0, "center", False, False)]
    cfg = training._config("lora", TINY_FABRIC, dataset, None, sdxl_file.name, max_train_steps=2)
    assert cfg.base_model == path and cfg.resolution == 1024
    cfg = training._config("ti", TINY_SDXL, dataset, None, None, placeholder_token="<x>", initializer_token="pattern")
    assert cfg.base_model == "tiny-sdxl" and cfg.resolution == 64


def _lora(path, modules: dict, metadata: dict | None = None):
    """A kohya LoRA file: {module: (in, out)}, rank 4."""
    tensors = {}
    for module, (fan_in, fan_out) in modules.items():
        tensors[f"{module}.lora_down.weight"] = torch.randn(4, fan_in)
        tensors[f"{module}.lora_up.weight"] = torch.randn(fan_out, 4)
        tensors[f"{module}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path), metadata=metadata or {})


SD15_MODULES = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (768, 640),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
}
SDXL_MODULES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (2048, 640),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
}


def test_a_lora_of_the_other_family_is_refused_before_anything_is_patched(fake_comfy, monkeypatch):
    checkpoint = _mod("nodes.checkpoint")
    loras = fake_comfy.models / "loras"
    # ours, with the metadata our exporter writes
    sd15_meta = {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora"}
    _lora(loras / "fabric.safetensors", SD15_MODULES, {**sd15_meta, "dreamloom.base_model": "tiny-fabric"})
    sdxl_meta = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    }
    _lora(loras / "xl.safetensors", SDXL_MODULES, {**sdxl_meta, "dreamloom.base_model": "tiny-sdxl"})
    # others' files without metadata: the family is in the modules (a second text encoder, the context width)
    _lora(loras / "plain15.safetensors", SD15_MODULES)
    _lora(loras / "plainxl.safetensors", {k: v for k, v in SDXL_MODULES.items() if "lora_te2_" not in k})
    sdxl_model, sdxl_clip = FakeModel(), FakeSDXLClip()
    checkpoint.tag_models(sdxl_model, sdxl_clip, None, TINY_SDXL, "tiny-sdxl")
    sd15_model, sd15_clip = FakeModel(), FakeClip(768)
    checkpoint.tag_models(sd15_model, sd15_clip, None, TINY_FABRIC, "tiny-fabric")
    loader = _node("DreamLoomLoadLoRA")()
    fake_comfy.key_map = {m: "w" for m in list(SD15_MODULES) + list(SDXL_MODULES)}  # would all "map"

    cases = [
        ("fabric.safetensors", sdxl_model, sdxl_clip, "trained on SD1.5 (tiny-fabric), applied to SDXL (tiny-sdxl)"),
        ("plain15.safetensors", sdxl_model, sdxl_clip, "trained on SD1.5 (its base model not named in the file)"),
        ("xl.safetensors", sd15_model, sd15_clip, "trained on SDXL (tiny-sdxl), applied to SD1.5 (tiny-fabric)"),
        ("plainxl.safetensors", sd15_model, sd15_clip, "trained on SDXL (its base model not named in the file)"),
    ]
    for name, model, clip, words in cases:
        with pytest.raises(_error()) as err:
            loader.load(model, clip, name, 1.0, 1.0)
        assert words in str(err.value) and name in str(err.value), str(err.value)
        assert "Load an SD" in err.value.hint and fake_comfy.applied is None
    # a MODEL and CLIP from core Load Checkpoint: the family comes from ComfyUI's classes
    monkeypatch.setattr(_mod("nodes.comfy"), "model_family", lambda model: "SDXL")
    with pytest.raises(_error(), match=r"trained on SD1.5 \(tiny-fabric\), applied to SDXL \(the connected model\)"):
        loader.load(FakeModel(), FakeSDXLClip(), "fabric.safetensors", 1.0, 1.0)
    monkeypatch.setattr(_mod("nodes.comfy"), "model_family", lambda model: None)
    with pytest.raises(_error(), match=r"applied to SDXL \(the connected model\)"):  # from the CLIP's encoders
        loader.load(FakeModel(), FakeSDXLClip(), "plain15.safetensors", 1.0, 1.0)
    # the same family goes on to ComfyUI's patching
    assert loader.load(sdxl_model, sdxl_clip, "xl.safetensors", 0.7, 1.0) == ("patched-model", "patched-clip")
    assert fake_comfy.applied[1] == 0.7


def _embedding(path, tensors: dict, base_model: str | None = None, arch: str | None = None):
    meta = {"dreamloom.format": "textual_inversion"}
    if base_model:
        meta["dreamloom.base_model"] = base_model
    if arch:
        meta["modelspec.architecture"] = arch
    save_file(tensors, str(path), metadata=meta)


def test_an_embedding_of_the_other_family_or_width_is_refused(fake_comfy):
    checkpoint = _mod("nodes.checkpoint")
    folder = fake_comfy.models / "embeddings"
    _embedding(folder / "sd15.safetensors", {"emb_params": torch.randn(2, 768)}, "/m/v1-5.safetensors",
               "stable-diffusion-v1/textual-inversion")  # fmt: skip
    _embedding(folder / "xl.safetensors", {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)},
               "/m/sd_xl_base_1.0.safetensors", "stable-diffusion-xl-v1-base/textual-inversion")  # fmt: skip
    _embedding(folder / "tinyxl.safetensors", {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32)}, "tiny-sdxl")
    save_file({"clip_g": torch.randn(1, 1280), "clip_l": torch.randn(1, 768)}, str(folder / "civitai_xl.safetensors"))
    sdxl, sd15, tiny_sdxl = FakeSDXLClip(), FakeClip(768), FakeSDXLClip(32, 32)
    checkpoint.tag_models(None, sdxl, None, "sd_xl_base_1.0.safetensors", "/m/sd_xl_base_1.0.safetensors")
    checkpoint.tag_models(None, tiny_sdxl, None, TINY_SDXL, "tiny-sdxl")
    batch = _node("DreamLoomPromptBatch")()

    def refused(clip, name):
        with pytest.raises(_error()) as err:
            batch.encode(clip, "a dress made of {s}", f"embedding:{name}")
        return str(err.value)

    text = refused(sdxl, "sd15")
    assert "embedding:sd15 was trained on SD1.5 (v1-5.safetensors), applied to SDXL (sd_xl_base_1.0" in text
    assert "vectors for one text encoder (emb_params, 768 wide), this CLIP takes clip_l 768 and clip_g 1280" in text
    assert "ComfyUI would use it for clip_l and ignore it for clip_g" in text
    text = refused(sd15, "xl")
    assert "embedding:xl was trained on SDXL (sd_xl_base_1.0.safetensors), applied to SD1.5 (the connected" in text
    assert "two text encoders (clip_l 768 and clip_g 1280 wide), this CLIP takes clip_l 768" in text
    assert "ComfyUI would use only its clip_l part and drop clip_g" in text
    text = refused(sd15, "civitai_xl")  # no metadata: SDXL by its two keys
    assert "was trained on SDXL (its base model not named in the file), applied to SD1.5" in text
    text = refused(sdxl, "tinyxl")  # the right family, the wrong size
    assert "trained on SDXL (tiny-sdxl), applied to SDXL (sd_xl_base_1.0.safetensors)" in text
    assert "ComfyUI would ignore the embedding" in text
    text = refused(tiny_sdxl, "sd15")
    assert "applied to SDXL (tiny-sdxl)" in text and "ComfyUI would ignore the embedding" in text
    # each fits its own CLIP
    for clip, name in ((sdxl, "xl"), (sdxl, "civitai_xl"), (tiny_sdxl, "tinyxl"), (sd15, "sd15")):
        cond, _, count = batch.encode(clip, "a dress made of {s}", f"embedding:{name}")
        assert count == 1 and cond[0][1]["pooled_output"] is not None


def test_size_tooltips_name_every_family(fake_comfy):
    for node, section, name in (
        ("DreamLoomEmptyLatent", "required", "width"),
        ("DreamLoomSlerpNoise", "required", "height"),
        ("DreamLoomLoadTrainingImages", "required", "resolution"),
        ("DreamLoomGenerateClassImages", "required", "resolution"),
    ):
        tooltip = _node(node).INPUT_TYPES()[section][name][1]["tooltip"]
        assert "1024 for SDXL" in tooltip and "512 for SD1.5" in tooltip and "tiny-sdxl" in tooltip, node
    assert "SDXL" in _node("DreamLoomEmptyLatent").DESCRIPTION and "SDXL" in _node("DreamLoomLoadLoRA").DESCRIPTION
    tag = _mod("nodes.checkpoint").tag_models
    vae = FakeVAE(8)
    tag(None, None, vae, TINY_SDXL, "tiny-sdxl")
    assert _node("DreamLoomEmptyLatent")().build(vae, 0, 0, 2)[0]["samples"].shape == (2, 4, 8, 8)


@pytest.mark.slow
def test_textual_inversion_node_trains_tiny_sdxl(fake_comfy, fabric_dir):
    """The training node on tiny-sdxl: an SDXL embedding (clip_l and clip_g) in the embeddings folder, which the
    checks accept on tiny-sdxl's CLIP and refuse on SD1.5's."""
    from safetensors.torch import load_file

    ((dataset, _),) = [_node("DreamLoomLoadTrainingImages")().load(str(fabric_dir), 0, "center", False, False)]
    out = _node("DreamLoomTrainTextualInversion")().train(
        TINY_FABRIC, dataset, "<sks-fabric>", "pattern", 5e-3, 2, 1, 0, "xl_ti", base_model=TINY_SDXL, unique_id="3"
    )
    name, token = out["result"][:2]
    saved = load_file(str(fake_comfy.models / "embeddings" / f"{name}.safetensors"))
    assert token == f"embedding:{name}" and {k: tuple(v.shape) for k, v in saved.items()} == {
        "clip_l": (1, 32),
        "clip_g": (1, 32),
    }
    batch = _node("DreamLoomPromptBatch")()
    clip = FakeSDXLClip(32, 32)
    _mod("nodes.checkpoint").tag_models(None, clip, None, TINY_SDXL, "tiny-sdxl")
    assert batch.encode(clip, "a dress made of {s}", token)[2] == 1
    with pytest.raises(_error(), match=r"trained on SDXL \(tiny-sdxl\), applied to SD1.5"):
        batch.encode(FakeClip(64), "a dress made of {s}", token)
