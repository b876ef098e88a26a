import copy

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.config import TrainConfig
from trainer.errors import DreamLoomError, StopRequested
from trainer.training.loop import Trainer
from trainer.training.methods.ti import OBJECT_TEMPLATES, STYLE_TEMPLATES, TextualInversionMethod


def ti_config(fabric_dir, **kw):
    base = dict(method="ti", learning_rate=5e-2, with_prior_preservation=False, max_train_steps=30)
    base.update(kw)
    return tiny_config(fabric_dir, **base)


def test_ti_default_learning_rate():
    assert TrainConfig(method="ti").validate().learning_rate == 5e-4
    assert TrainConfig(method="lora").validate().learning_rate == 1e-4


def test_ti_trains_only_the_new_rows(fabric_dir, tmp_path):
    from trainer.base_models.builtin import build_tiny

    base = build_tiny()
    comps = build_tiny()
    cfg = ti_config(fabric_dir, num_vectors=2)
    trainer = Trainer(cfg, tmp_path / "run", comps=comps)
    result = trainer.run()
    losses = [r["loss"] for r in result.losses]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, losses
    emb = trainer.comps.text_encoder.get_input_embeddings()
    # Every original row is bit-identical, the new rows moved away from the initializer.
    assert torch.equal(emb.base.weight, base.text_encoder.get_input_embeddings().weight)
    init_id = base.tokenizer.encode("pattern", add_special_tokens=False)[0]
    init = base.text_encoder.get_input_embeddings().weight[init_id]
    assert emb.new_rows.shape == (2, 64)
    assert all((emb.new_rows[i] - init).abs().max() > 1e-3 for i in range(2))
    # UNet and VAE untouched; the rest of the text encoder too.
    for a, b in ((trainer.comps.unet, base.unet), (trainer.comps.vae, base.vae)):
        for (k, va), (_, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
            assert torch.equal(va, vb), k
    te_base = {k: v for k, v in base.text_encoder.state_dict().items()}
    for k, v in trainer.comps.text_encoder.state_dict().items():
        if "token_embedding" in k:
            continue
        assert torch.equal(v, te_base[k]), k
    # Saved embedding == the in-memory rows, with our metadata.
    path = result.outputs["embedding"]
    saved = load_file(path)
    assert list(saved) == ["emb_params"] and saved["emb_params"].dtype == torch.float32
    assert torch.equal(saved["emb_params"], emb.new_rows.detach().float())
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["dreamloom.token"] == "<sks-fabric>" and meta["dreamloom.steps"] == "30"
    assert result.outputs["comfy_prompt"] == "embedding:sks_fabric"


def test_diffusers_load_textual_inversion_matches_trained_encoder(fabric_dir, tmp_path):
    from trainer.base_models.builtin import build_tiny
    from trainer.inference.pipelines import make_pipeline

    trainer = Trainer(ti_config(fabric_dir, num_vectors=2, max_train_steps=5), tmp_path / "run", comps=build_tiny())
    result = trainer.run()
    prompt = "a pattern in the style of <sks-fabric>"
    te = trainer.acc.unwrap_model(trainer.comps.text_encoder).eval()
    tok = trainer.comps.tokenizer
    expanded = prompt.replace("<sks-fabric>", trainer.method.phrase)
    with torch.no_grad():
        expected = te(tok(expanded, padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
    for key in ("embedding", "embedding_diffusers"):
        pipe = make_pipeline(build_tiny())
        pipe.load_textual_inversion(result.outputs[key], token="<sks-fabric>")
        converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
        ids = pipe.tokenizer(converted, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            got = pipe.text_encoder(ids)[0]
        assert torch.allclose(got, expected, atol=1e-5), key
        # and the token changes the encoding compared with the plain class words
        plain = pipe.tokenizer(
            "a pattern in the style of pattern", padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            assert not torch.allclose(pipe.text_encoder(plain)[0], got)


def test_every_template_is_used_for_every_image(fabric_dir):
    cfg = TrainConfig(method="ti").validate()
    m = TextualInversionMethod(cfg)
    m.n_images = 10
    from trainer.data.batches import stream_indices

    n_templates = len(STYLE_TEMPLATES)
    picks = stream_indices(1, 10, 0, 10 * n_templates)
    seen = {}
    for pos, (i, _) in enumerate(picks):
        seen.setdefault(i, set()).add(m.instance_prompt(i, None, pos))
    assert all(len(v) == n_templates for v in seen.values())
    assert (
        TextualInversionMethod(TrainConfig(method="ti", ti_templates="object").validate()).templates == OBJECT_TEMPLATES
    )
    cap = TextualInversionMethod(TrainConfig(method="ti", ti_templates="captions").validate())
    assert cap.instance_prompt(0, "red kente cloth", 0) == "<sks-fabric>, red kente cloth"
    assert cap.instance_prompt(0, "a <sks-fabric> scarf", 0) == "a <sks-fabric> scarf"


def test_placeholder_and_initializer_errors(tiny):
    with pytest.raises(DreamLoomError, match="already a word") as info:
        TextualInversionMethod(TrainConfig(method="ti", placeholder_token="pattern").validate()).setup(tiny)
    assert "<sks-fabric>" in info.value.hint
    with pytest.raises(DreamLoomError, match="is 3 tokens") as info:
        TextualInversionMethod(TrainConfig(method="ti", initializer_token="kentecloth").validate()).setup(tiny)
    assert "one common word" in info.value.hint
    with pytest.raises(DreamLoomError, match="placeholder_token"):
        TrainConfig(method="ti", placeholder_token="two words").validate()


def test_clamp_norm_keeps_rows_within_initializer_norm(fabric_dir, tmp_path):
    from trainer.base_models.builtin import build_tiny

    trainer = Trainer(
        ti_config(fabric_dir, clamp_norm=True, learning_rate=0.5, max_train_steps=5),
        tmp_path / "run",
        comps=build_tiny(),
    )
    trainer.run()
    rows = trainer.method.new_rows(trainer.comps)["text_encoder"]
    assert float(rows.detach().norm(dim=1).max()) <= trainer.method.init_norms["text_encoder"] * (1 + 1e-5)


def test_ti_resume_matches_uninterrupted(fabric_dir, tmp_path):
    from trainer.base_models.builtin import build_tiny

    cfg = ti_config(fabric_dir, max_train_steps=6)
    full = Trainer(cfg, tmp_path / "full", comps=build_tiny())
    full.run()
    n = {"calls": 0}

    def stop():
        n["calls"] += 1
        return n["calls"] == 2

    with pytest.raises(StopRequested):
        Trainer(cfg, tmp_path / "res", comps=build_tiny(), should_stop=stop).run()
    second = Trainer(cfg, tmp_path / "res", comps=build_tiny())
    assert second.run().resumed_from == 2
    assert torch.equal(
        second.method.trainable_state(second.comps)["ti.new_rows"],
        full.method.trainable_state(full.comps)["ti.new_rows"],
    )


@pytest.mark.slow
def test_full_size_embedding_has_comfyui_shape(sd15_components, tmp_path):
    from trainer.base_models.components import load_tokenizer

    comps = copy.copy(sd15_components)
    comps.text_encoder = copy.deepcopy(sd15_components.text_encoder)
    comps.tokenizer = load_tokenizer()
    cfg = TrainConfig(method="ti", num_vectors=3, output_name="fabric_ti").validate()
    m = TextualInversionMethod(cfg)
    m.setup(comps)
    out = m.export(comps, tmp_path, step=0)
    sd = load_file(out["embedding"])
    assert list(sd) == ["emb_params"] and tuple(sd["emb_params"].shape) == (3, 768)
    assert sd["emb_params"].dtype == torch.float32
    size = (tmp_path / "fabric_ti.safetensors").stat().st_size
    assert size < 16_000  # a few KB, as the tutorial promises


@pytest.mark.parametrize("method", ["ti", "lora"])
def test_bf16_keeps_frozen_modules_in_training_dtype(fabric_dir, tmp_path, method):
    from trainer.base_models.builtin import build_tiny

    cfg = tiny_config(
        fabric_dir, method=method, mixed_precision="bf16", max_train_steps=2, with_prior_preservation=False
    )
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny())
    result = trainer.run()
    assert all(r["loss"] == r["loss"] for r in result.losses)  # finite
    unet = trainer.comps.unet
    frozen = [p.dtype for p in unet.parameters() if not p.requires_grad]
    trainable = [p.dtype for g in trainer.optimizer.param_groups for p in g["params"]]
    assert set(frozen) == {torch.bfloat16} and set(trainable) == {torch.float32}


def test_multi_vector_sample_prompts_expand_once(fabric_dir, tmp_path):
    """The pipeline expands '<tok>' into '<tok> <tok>_1'; sample prompts must not be expanded before it."""
    from trainer.base_models.builtin import build_tiny
    from trainer.inference.pipelines import make_pipeline

    trainer = Trainer(ti_config(fabric_dir, num_vectors=2), tmp_path / "run", comps=build_tiny())
    trainer.set_up()
    pipe = make_pipeline(trainer.comps)
    for prompt in trainer.method.sample_prompts()[:-1]:  # the last one is the class prompt
        seen = pipe.maybe_convert_prompt(prompt, trainer.comps.tokenizer)
        assert seen.count("<sks-fabric>_1") == 1 and "<sks-fabric>_1_1" not in seen, seen
