"""The tiny-fabric base model: pretraining pieces, the file format and the shipped weights (issue 9)."""

import json

import numpy as np
import pytest
import torch

import trainer.lab.pretrain as P
from trainer.base_models.builtin import TINY_FABRIC_PATH, load_tiny_fabric
from trainer.base_models.load import load_base_model
from trainer.errors import DreamLoomError
from trainer.lab.corpus import describe


def test_caption_variants_cover_family_colours_and_class_prompt():
    sample = describe("zigzags", 3)
    full, family, colours, klass = P.caption_variants(sample)
    assert full == sample.caption and full.endswith("zigzag fabric pattern")
    assert family == "a zigzag fabric pattern"
    assert colours == f"a {sample.colors[0]} and {sample.colors[1]} fabric pattern"
    assert klass == "a fabric pattern"
    assert len(P.CAPTION_WEIGHTS) == 5  # the four variants and the empty caption


def test_tokenized_variants_end_with_the_empty_caption():
    from trainer.base_models.components import load_tokenizer

    tok = load_tokenizer()
    ids = P.tokenize_variants(tok, [describe("stripes", 0), describe("florals", 1)])
    assert ids.shape == (2, 5, 77)
    assert ids[0, 4, 0] == 49406 and ids[0, 4, 1] == 49407  # "" -> <start> <end>
    assert tok.decode(ids[1, 3], skip_special_tokens=True) == "a fabric pattern"


@pytest.mark.slow
def test_vae_reconstruction_loss_falls(tmp_path):
    images, _ = P.render_corpus(4)
    cfg = P.PretrainConfig(out=tmp_path, vae_steps=40, vae_batch=4, vae_crop=32, vae_lr=2e-3)
    _, losses = P.train_vae(images, cfg, log=lambda *_: None)
    assert np.mean(losses[-8:]) < 0.75 * np.mean(losses[:8])


@pytest.mark.slow
def test_denoiser_loss_falls_and_text_encoder_learns_the_captions(tmp_path):
    from trainer.base_models.components import load_tokenizer
    from trainer.base_models.sd15 import sd15_scheduler_config

    images, samples = P.render_corpus(4)
    torch.manual_seed(0)
    latents = torch.randn(len(images), 4, 8, 8) * 0.5 + torch.arange(len(images)).view(-1, 1, 1, 1) % 3
    ids = P.tokenize_variants(load_tokenizer(), samples)
    cfg = P.PretrainConfig(out=tmp_path, unet_steps=60, unet_batch=8, crop_steps=0, unet_lr=1e-3)
    unet, text_encoder, losses = P.train_denoiser(latents, ids, cfg, lambda *_: None, sd15_scheduler_config())
    assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:15])
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed + 1)  # the same draws as train_denoiser: the UNet first, then the text encoder
    UNet2DConditionModel(**P.FABRIC_UNET)
    fresh = CLIPTextModel(CLIPTextConfig(**P.FABRIC_TEXT))
    used = ids.unique()
    emb, emb0 = text_encoder.get_input_embeddings().weight, fresh.get_input_embeddings().weight
    moved = (emb[used] - emb0[used]).norm(dim=1) / emb0[used].norm(dim=1)
    assert moved.min() > 0.02  # every caption token was trained (weight decay alone moves a row 0.0024)
    unused = torch.tensor([40320])  # a token no caption contains: only weight decay touches its row
    torch.testing.assert_close(emb[unused], emb0[unused] * (1 - cfg.unet_lr * 1e-2) ** 60, rtol=2e-3, atol=1e-6)


def _micro_modules():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    return (
        AutoencoderKL(**P.FABRIC_VAE).eval(),
        UNet2DConditionModel(**P.FABRIC_UNET).eval(),
        CLIPTextModel(CLIPTextConfig(**P.FABRIC_TEXT)).eval(),
    )


def test_save_then_load_reproduces_the_modules_at_fp16_precision(tmp_path):
    vae, unet, te = _micro_modules()
    path = tmp_path / "m.safetensors"
    P.save_tiny_fabric(path, vae, unet, te, {"scaling_factor": 1.7})
    vae2, unet2, te2, meta = load_tiny_fabric(path)
    assert vae2.config.scaling_factor == pytest.approx(1.7)
    assert json.loads(meta["pretrain"])["scaling_factor"] == pytest.approx(1.7)
    for a, b in ((vae, vae2), (unet, unet2), (te, te2)):
        sa, sb = a.state_dict(), b.state_dict()
        for k, v in sa.items():
            if not k.endswith("position_ids"):
                torch.testing.assert_close(sb[k], v.half().float(), rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically


def test_loading_a_wrong_file_names_the_problem_and_the_fix(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(DreamLoomError, match="missing") as err:
        load_tiny_fabric(tmp_path / "absent.safetensors")
    assert "pretrain-tiny" in err.value.hint
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(DreamLoomError, match="not a tiny-fabric file"):
        load_tiny_fabric(other)
    vae, unet, te = _micro_modules()
    trunc = tmp_path / "partial.safetensors"
    P.save_tiny_fabric(trunc, vae, unet, te, {"scaling_factor": 1.0})
    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(str(trunc)).items() if not k.startswith("unet.conv_out")}
    from safetensors import safe_open

    with safe_open(str(trunc), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(trunc), metadata=meta)
    with pytest.raises(DreamLoomError, match="does not match"):
        load_tiny_fabric(trunc)


# --------------------------------------------------------------------------- the shipped weights
def test_shipped_tiny_fabric_fits_the_size_budget_and_loads_frozen():
    assert TINY_FABRIC_PATH.stat().st_size <= 20 * 1024 * 1024
    comps = load_base_model("tiny-fabric")
    assert comps.native_resolution == 128 and comps.kind == "tiny"
    assert comps.vae.config.block_out_channels == list(P.FABRIC_VAE["block_out_channels"])
    assert comps.text_encoder.config.vocab_size == len(comps.tokenizer) == 49408
    for module in comps.modules().values():
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert comps.fingerprint == load_base_model("tiny-fabric").fingerprint


def test_shipped_tiny_fabric_was_pretrained_within_the_cpu_budget():
    from safetensors import safe_open

    with safe_open(str(TINY_FABRIC_PATH), framework="pt") as f:
        info = json.loads(f.metadata()["pretrain"])
    assert info["unet_steps"] >= 1000 and info["vae_steps"] >= 500  # a real pretraining run, not a smoke run
    assert info["total_seconds"] <= 3900 and info["torch_threads"] <= 2


def _corpus_likeness(base_model, resolution):
    """(mean similarity of 6 class-prompt generations to 36 corpus images, their diversity)."""
    import trainer.lab.quality as q
    from trainer.inference.pipelines import generate, make_pipeline
    from trainer.lab.corpus import corpus, render

    pipe = make_pipeline(load_base_model(base_model))
    images = generate(pipe, ["a fabric pattern"] * 6, list(range(1, 7)), 12, 7.5, resolution, batch_size=6)
    refs = [q.features(render(f, 20_000 + i)[0]) for f, i in corpus(6)]
    feats = [q.features(im) for im in images]
    return q.mean_similarity_to(feats, refs)["combined"], q.diversity(feats)["combined"]


@pytest.mark.slow
def test_shipped_tiny_fabric_draws_corpus_like_varied_patterns():
    like, div = _corpus_likeness("tiny-fabric", 128)
    like_random, div_random = _corpus_likeness("tiny", 64)
    # Pretraining moved the model's pictures towards the corpus and made them vary with the seed;
    # the random-weight model draws the same coloured blur for every seed.
    assert like > like_random + 0.05, (like, like_random)
    assert div > div_random + 0.1, (div, div_random)
