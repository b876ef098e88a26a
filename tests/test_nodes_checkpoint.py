"""Load Checkpoint (DreamLoom), Empty Latent, base_model links, and the errors for a LoRA or embedding that does
not fit the model it is applied to (stand-in for nodes/comfy.py; the real ComfyUI classes are tested in
tests/integration/test_builtin_in_comfyui.py)."""

import pytest
import torch
from conftest import FakeClip, FakeModel, FakeVAE, pack_error, pack_module, pack_node
from safetensors.torch import save_file

_node, _mod, _error = pack_node, pack_module, pack_error


def test_loader_offers_tiny_fabric_first_and_tags_what_it_loads(fake_comfy):
    runner, checkpoint = _mod("nodes.runner"), _mod("nodes.checkpoint")
    node = _node("DreamLoomLoadCheckpoint")
    combo, opts = node.INPUT_TYPES()["required"]["ckpt_name"]
    assert combo[0] == opts["default"] == runner.BUILTIN_TINY_FABRIC

    model, clip, vae, base = node().load(runner.BUILTIN_TINY_FABRIC)
    assert fake_comfy.loaded == ("builtin", "tiny-fabric") and base == runner.BUILTIN_TINY_FABRIC
    for obj in (model, clip, vae):
        assert checkpoint.base_of(obj) == {
            "label": runner.BUILTIN_TINY_FABRIC,
            "base_model": "tiny-fabric",
            "family": "SD1.5",
            "native_resolution": 128,
        }

    (fake_comfy.models / "checkpoints" / "mine.safetensors").write_bytes(b"x")
    model, clip, vae, base = node().load("mine.safetensors")
    assert fake_comfy.loaded == ("file", str(fake_comfy.models / "checkpoints" / "mine.safetensors"))
    assert checkpoint.base_of(vae)["native_resolution"] == 512 and base == "mine.safetensors"
    assert checkpoint.base_of(vae)["family"] is None  # not a safetensors file: nothing to compare a LoRA with
    with pytest.raises(_error(), match="not found"):
        node().load("gone.safetensors")


def test_empty_latent_and_slerp_noise_follow_the_vae(fake_comfy):
    checkpoint = _mod("nodes.checkpoint")
    tiny, sd15 = FakeVAE(4), FakeVAE(8)
    checkpoint.tag_models(None, None, tiny, "tiny-fabric", "tiny-fabric")
    empty = _node("DreamLoomEmptyLatent")()
    assert empty.build(tiny, 0, 0, 2)[0]["samples"].shape == (2, 4, 32, 32)  # native 128 px, 4x
    assert empty.build(sd15, 0, 0, 1)[0]["samples"].shape == (1, 4, 64, 64)  # 512 px, 8x
    assert empty.build(sd15, 512, 256, 1)[0]["samples"].shape == (1, 4, 32, 64)
    with pytest.raises(_error(), match="not a multiple of this VAE's scale factor 8"):
        empty.build(sd15, 516, 512, 1)
    _, latent, n = _node("DreamLoomSlerpNoise")().build("1, 2", 3, "linear", 0, True, 0, 0, vae=tiny)
    assert latent["samples"].shape == (n, 4, 32, 32)
    _, latent, n = _node("DreamLoomSlerpNoise")().build("1, 2", 3, "linear", 0, True, 0, 0)
    assert latent["samples"].shape == (n, 4, 64, 64)  # no VAE: SD1.5


def _kohya_lora(path, down_in: int, up_out: int, metadata: dict):
    module = "lora_unet_down_blocks_1_attentions_0_proj_in"
    save_file(
        {
            f"{module}.lora_down.weight": torch.randn(4, down_in),
            f"{module}.lora_up.weight": torch.randn(up_out, 4),
            f"{module}.alpha": torch.tensor(4.0),
        },
        str(path),
        metadata=metadata,
    )
    return module


def test_lora_for_another_model_is_an_error_naming_both(fake_comfy):
    checkpoint = _mod("nodes.checkpoint")
    meta = {"dreamloom.base_model": "tiny-fabric", "dreamloom.format": "kohya"}
    module = _kohya_lora(fake_comfy.models / "loras" / "small.safetensors", 64, 64, meta)
    key = "diffusion_model.input_blocks.4.1.proj_in.weight"
    model, clip = FakeModel({key: (640, 640, 1, 1)}), FakeClip(768)
    checkpoint.tag_models(model, clip, None, "v1-5-pruned-emaonly.safetensors", "/models/v1-5.safetensors")
    loader = _node("DreamLoomLoadLoRA")()

    fake_comfy.key_map = {module: key}
    with pytest.raises(_error()) as err:
        loader.load(model, clip, "small.safetensors", 1.0, 1.0)
    text = str(err.value)
    assert "trained on tiny-fabric" in text and "v1-5-pruned-emaonly.safetensors" in text
    assert "LoRA 64->64, layer 640->640" in text and fake_comfy.applied is None

    fake_comfy.key_map = {}  # a module the model does not have at all
    with pytest.raises(_error(), match=r"1 of 1 LoRA modules in small.safetensors \(trained on tiny-fabric\) have no"):
        loader.load(model, clip, "small.safetensors", 1.0, 1.0)

    _kohya_lora(fake_comfy.models / "loras" / "fits.safetensors", 640, 640, meta)
    fake_comfy.key_map = {module: key}
    assert loader.load(model, clip, "fits.safetensors", 0.5, 1.0) == ("patched-model", "patched-clip")
    assert fake_comfy.applied[1] == 0.5


def test_shape_mismatches_are_listed_per_module():
    mismatches = _mod("trainer.formats.lora_import").lora_shape_mismatches
    tensors = {"m.lora_down.weight": torch.zeros(4, 320, 3, 3), "m.lora_up.weight": torch.zeros(640, 4, 1, 1)}
    assert mismatches(tensors, ["m"], {"m": "w"}, {"w": (640, 320, 3, 3)}) == []
    assert mismatches(tensors, ["m"], {"m": "w"}, {"w": (1280, 640, 3, 3)}) == ["m: LoRA 320->640, layer 640->1280"]
    assert mismatches(tensors, ["m"], {}, {}) == []  # unmapped modules are reported by the caller


def test_prompt_batch_refuses_an_embedding_comfyui_would_ignore(fake_comfy):
    meta = {"dreamloom.format": "textual_inversion", "dreamloom.base_model": "tiny-fabric"}
    save_file({"emb_params": torch.randn(1, 64)}, str(fake_comfy.models / "embeddings" / "ti.safetensors"), meta)
    batch = _node("DreamLoomPromptBatch")()
    with pytest.raises(_error()) as err:
        batch.encode(FakeClip(768), "a dress made of {s}", "embedding:ti")
    text = str(err.value)
    assert "trained on SD1.5 (tiny-fabric), applied to SD1.5" in text and "(emb_params, 64 wide)" in text
    assert "this CLIP takes clip_l 768. ComfyUI would ignore the embedding." in text
    with pytest.raises(_error(), match="embedding:nope is not in ComfyUI's embeddings folder"):
        batch.encode(FakeClip(64), "a dress made of {s}", "embedding:nope")
    cond, labels, count = batch.encode(FakeClip(64), "dress: a dress made of {s}", "embedding:ti")
    assert count == 1 and cond[0][0].shape == (1, 77, 64)


def test_base_model_link_overrides_the_widget_and_size_0_is_native(fake_comfy, fabric_dir):
    runner, training = _mod("nodes.runner"), _mod("nodes.training")
    ((dataset, _),) = [_node("DreamLoomLoadTrainingImages")().load(str(fabric_dir), 0, "center", False, False)]
    assert dataset.resolution == 0
    cfg = training._config("ti", "not-there.safetensors", dataset, None, runner.BUILTIN_TINY_FABRIC,
                           placeholder_token="<x>", initializer_token="pattern")  # fmt: skip
    assert cfg.base_model == "tiny-fabric" and cfg.resolution == 128
    spec = training.TrainDreamBoothLoRA.INPUT_TYPES()["optional"]["base_model"]
    assert spec[0] == "DL_BASE_MODEL"
    assert "base_model" in _node("DreamLoomGenerateClassImages").INPUT_TYPES()["optional"]


def test_save_animation_tells_the_editor_how_to_show_each_format(fake_comfy):
    frames = torch.rand(4, 16, 16, 3)
    save = _node("DreamLoomSaveAnimation")()
    assert save.save(frames, 10.0, "gif", True, "dreamloom/a")["ui"]["animated"] == (False,)  # <img> plays a GIF
    out = save.save(frames, 10.0, "webp", True, "dreamloom/a")
    assert out["ui"]["animated"] == (True,) and out["ui"]["images"][0]["filename"].endswith(".webp")
