"""A CPU run parks the VAE and a frozen text encoder on disk while the steps run (training/parking.py)."""

import pytest
import torch
from conftest import tiny_config

from trainer.errors import StopRequested
from trainer.training.loop import Trainer
from trainer.training.parking import ParkedModules


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_park_and_restore_keep_the_parameter_objects_and_values(tiny, tmp_path):
    before = _weights(tiny.vae)
    params = list(tiny.vae.parameters())
    parking = ParkedModules(tmp_path / "parked.safetensors", {"vae": tiny.vae})
    parking.park()
    assert all(p.numel() == 0 for p in tiny.vae.parameters()) and (tmp_path / "parked.safetensors").exists()
    parking.restore()
    parking.park()  # parking again reuses the file
    parking.close()
    assert list(tiny.vae.parameters()) == params  # the same objects: references held elsewhere stay valid
    after = _weights(tiny.vae)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not list(tmp_path.iterdir())


def test_steps_run_without_the_vae_and_text_encoder_in_memory(tiny, fabric_dir, tmp_path):
    vae_before, te_before = _weights(tiny.vae), _weights(tiny.text_encoder)
    seen = []

    def look():  # called once per step, between steps
        seen.append(sum(p.numel() for m in (tiny.vae, tiny.text_encoder) for p in m.parameters()))
        return False

    cfg = tiny_config(fabric_dir, max_train_steps=4, sample_every=2, with_prior_preservation=True)
    run = tmp_path / "run"
    result = Trainer(cfg, run, comps=tiny, cache_root=tmp_path / "cache", should_stop=look).run()
    assert seen[-4:] == [0] * 4  # parked at every step (the first look comes during set-up)
    # the grids at steps 0, 2 and 4 had them back, and the run ends with them whole and unchanged
    assert [p.rsplit("/", 1)[-1] for p in result.outputs["samples"]] == [f"step_{s:05d}.png" for s in (0, 2, 4)]
    for before, module in ((vae_before, tiny.vae), (te_before, tiny.text_encoder)):
        after = _weights(module)
        assert all(torch.equal(after[k], before[k]) for k in before)
    assert not list(run.glob(".parked-weights*"))


def test_a_stopped_run_hands_its_components_back_whole(tiny, fabric_dir, tmp_path):
    before = _weights(tiny.text_encoder)
    cfg = tiny_config(fabric_dir, max_train_steps=4, with_prior_preservation=False)
    trainer = Trainer(cfg, tmp_path / "run", comps=tiny, cache_root=tmp_path / "cache", should_stop=lambda: True)
    with pytest.raises(StopRequested):
        trainer.run()
    after = _weights(tiny.text_encoder)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not list((tmp_path / "run").glob(".parked-weights*"))


def test_a_trained_text_encoder_is_not_parked(tiny, fabric_dir, tmp_path):
    seen = []
    cfg = tiny_config(fabric_dir, max_train_steps=2, train_text_encoder=True, with_prior_preservation=False)

    def look():
        seen.append(min(p.numel() for p in tiny.text_encoder.parameters()))
        return False

    Trainer(cfg, tmp_path / "run", comps=tiny, cache_root=tmp_path / "cache", should_stop=look).run()
    assert all(n > 0 for n in seen) and len(seen) == 2
