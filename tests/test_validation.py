"""Validation loss: held-out images measured at fixed noise and timesteps (training/validation.py)."""

import shutil

import pytest
import torch
from conftest import tiny_config

from trainer.data.images import load_image_folder
from trainer.errors import DreamLoomError, StopRequested
from trainer.pictures.plots import read_loss_csv
from trainer.training.loop import Trainer
from trainer.training.validation import hold_out


def _validation(rows):
    return {r["step"]: r["validation_loss"] for r in rows if "validation_loss" in r}


def _run(cfg, run_dir, tmp_path, **kwargs):
    from trainer.base_models.builtin import build_tiny

    return Trainer(cfg, run_dir, comps=build_tiny(), cache_root=tmp_path / "cache", **kwargs)


def test_hold_out_is_a_seeded_disjoint_pick(fabric_dir):
    images = load_image_folder(fabric_dir, 64)
    train, held = hold_out(images, 2, seed=5)
    again_train, again_held = hold_out(images, 2, seed=5)
    assert len(train) == len(images) - 2 and len(held) == 2
    assert held.paths == again_held.paths and train.paths == again_train.paths
    assert set(train.paths).isdisjoint(held.paths) and set(train.paths) | set(held.paths) == set(images.paths)
    assert hold_out(images, 2, seed=6)[1].paths != held.paths or hold_out(images, 2, seed=7)[1].paths != held.paths
    with pytest.raises(DreamLoomError, match="leaving none to train on"):
        hold_out(images, len(images), seed=5)


def test_validation_loss_is_deterministic_across_runs_and_resume(fabric_dir, tmp_path):
    cfg = tiny_config(
        fabric_dir, max_train_steps=6, validation_images=2, validation_every=2, with_prior_preservation=False
    )
    first = _run(cfg, tmp_path / "a", tmp_path).run()
    second = _run(cfg, tmp_path / "b", tmp_path).run()
    expected = _validation(first.losses)
    assert sorted(expected) == [2, 4, 6]
    assert len(set(expected.values())) == 3  # it moves as the LoRA trains
    assert _validation(second.losses) == expected

    calls = {"n": 0}

    def stop_after_3():
        calls["n"] += 1
        return calls["n"] == 3

    with pytest.raises(StopRequested):
        _run(cfg, tmp_path / "c", tmp_path, should_stop=stop_after_3).run()
    resumed = _run(cfg, tmp_path / "c", tmp_path).run()
    assert resumed.resumed_from == 3
    got = _validation(resumed.losses)
    assert {s: got[s] for s in (4, 6)} == {s: expected[s] for s in (4, 6)}  # measured after the resume: exact
    assert got == pytest.approx(expected, rel=1e-5)  # step 2 comes back from loss.csv (6 significant digits)
    assert _validation(read_loss_csv(tmp_path / "c" / "loss.csv")) == pytest.approx(expected, rel=1e-5)
    events = (tmp_path / "a" / "events.jsonl").read_text()
    assert events.count('"event": "validation"') == 3
    assert "validation: 2 held-out image(s)" in (tmp_path / "a" / "events.jsonl").read_text()


def test_held_out_images_are_not_trained_on(fabric_dir, tmp_path):
    cfg = tiny_config(fabric_dir, max_train_steps=1, validation_images=3, with_prior_preservation=False)
    trainer = _run(cfg, tmp_path / "run", tmp_path)
    trainer.run()
    held = set(trainer.validation_set.paths)
    assert len(held) == 3 and held.isdisjoint(trainer.instance.paths) and len(trainer.instance) == 7
    # the run's identity is the whole folder, as the CLI's finished-run check computes it
    assert trainer.dataset_fingerprint == load_image_folder(fabric_dir, 64).fingerprint()


def test_a_validation_folder_does_not_change_training(fabric_dir, tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    shutil.copy(sorted(fabric_dir.glob("*.png"))[0], held / "extra.png")
    plain_cfg = tiny_config(fabric_dir, max_train_steps=4, with_prior_preservation=False)
    plain = _run(plain_cfg, tmp_path / "plain", tmp_path)
    plain_losses = [r["loss"] for r in plain.run().losses]
    cfg = tiny_config(
        fabric_dir, max_train_steps=4, with_prior_preservation=False, validation_dir=str(held), validation_every=1
    )
    checked = _run(cfg, tmp_path / "checked", tmp_path)
    rows = checked.run().losses
    assert [r["loss"] for r in rows] == plain_losses  # the training RNG is untouched
    assert sorted(_validation(rows)) == [1, 2, 3, 4]
    plain_state = {k: v for k, v in plain.comps.unet.state_dict().items() if "lora_" in k}
    for k, v in checked.comps.unet.state_dict().items():
        if "lora_" in k:
            assert torch.equal(v, plain_state[k]), k


def test_textual_inversion_measures_with_its_trained_rows(fabric_dir, tmp_path):
    cfg = tiny_config(
        fabric_dir, method="ti", max_train_steps=4, validation_images=1, validation_every=2, learning_rate=5e-2
    )
    trainer = _run(cfg, tmp_path / "run", tmp_path)
    values = _validation(trainer.run().losses)
    assert sorted(values) == [2, 4] and values[2] != values[4]
    assert trainer.validation.prompts[0].startswith(trainer.method.templates[0].format("")[:5])


def test_tiny_sdxl_measures_with_size_ids(fabric_dir, tmp_path):
    from trainer.base_models.builtin import build_tiny_sdxl

    cfg = tiny_config(
        fabric_dir, base_model="tiny-sdxl", max_train_steps=2, validation_images=1, validation_every=1,
        with_prior_preservation=False,
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny_sdxl(), cache_root=tmp_path / "cache")
    values = _validation(trainer.run().losses)
    assert sorted(values) == [1, 2] and all(v > 0 for v in values.values())
    # the fabric images are 128 px squares trained at 64: original 128x128, no crop, target 64x64
    assert trainer.validation.samples[0].size_ids.tolist() == [128, 128, 0, 0, 64, 64]


def test_training_settings_node_sets_validation(fake_comfy, fabric_dir):
    from conftest import pack_module, pack_node

    defaults = {
        k: v[1].get("default", v[0][0] if isinstance(v[0], list) else None)
        for k, v in pack_node("DreamLoomTrainingSettings").INPUT_TYPES()["required"].items()
    }
    settings = pack_node("DreamLoomTrainingSettings")().build(**{**defaults, "validation_images": 2})[0]
    ((dataset, _),) = [pack_node("DreamLoomLoadTrainingImages")().load(str(fabric_dir), 64, "center", False, False)]
    runner, training = pack_module("nodes.runner"), pack_module("nodes.training")
    cfg = training._config("lora", runner.BUILTIN_TINY_FABRIC, dataset, settings)
    assert cfg.validation_images == 2 and cfg.validation_every == 50
