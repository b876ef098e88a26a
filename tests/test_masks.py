"""Masked loss: mask files and alpha masks, their checks, the weighted loss, and masks through the trainer."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from trainer.data.images import list_image_files, load_image_folder
from trainer.data.sample_set import fabric_image
from trainer.errors import DreamLoomError
from trainer.training.loop import Trainer
from trainer.training.loss import diffusion_loss


def _images(folder, n=3, size=(96, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        fabric_image(i, 128).crop((0, 0, *size)).save(folder / f"img_{i}.png")
    return folder


def _half_mask(size, keep="left"):
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    arr[:, : size[0] // 2] = 255
    return Image.fromarray(arr if keep == "left" else arr[:, ::-1].copy(), "L")


class _FixedPrediction(torch.nn.Module):
    """A 'UNet' whose prediction is a leaf tensor, so the loss's gradient per latent cell can be read."""

    def __init__(self, pred):
        super().__init__()
        self.pred = torch.nn.Parameter(pred)

    def forward(self, noisy, timesteps, hidden, **kwargs):
        return SimpleNamespace(sample=self.pred * 1.0)


def test_a_zero_mask_region_contributes_no_gradient(tiny):
    sched = tiny.noise_scheduler()
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn((3, 4, 8, 12), generator=g), torch.randn((3, 4, 8, 12), generator=g)
    t, hidden = torch.tensor([100, 500, 900]), torch.zeros((3, 77, 32))
    unet = _FixedPrediction(torch.randn((3, 4, 8, 12), generator=g))
    weights = torch.ones((2, 1, 8, 12))
    weights[0, :, :, 6:] = 0.0  # the right half of the first instance row is ignored
    loss, instance, prior = diffusion_loss(unet, sched, latents, noise, t, hidden, 2, instance_weights=weights)
    loss.backward()
    grad = unet.pred.grad
    assert torch.count_nonzero(grad[0, :, :, 6:]) == 0  # exactly no gradient where the mask is black
    assert torch.count_nonzero(grad[0, :, :, :6]) == grad[0, :, :, :6].numel()
    assert torch.count_nonzero(grad[2]) == grad[2].numel()  # the class row is never masked
    err = (unet.pred.detach() - noise) ** 2
    assert torch.allclose(instance, (err[0, :, :, :6].mean() + err[1].mean()) / 2, atol=1e-6)
    assert torch.allclose(prior, err[2].mean(), atol=1e-6)


def test_a_white_mask_equals_the_unmasked_loss(tiny):
    sched = tiny.noise_scheduler()
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn((4, 4, 8, 8), generator=g), torch.randn((4, 4, 8, 8), generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    hidden = torch.randn((4, 77, tiny.unet.config.cross_attention_dim), generator=g)
    with torch.no_grad():
        plain = diffusion_loss(tiny.unet, sched, latents, noise, t, hidden, 2, snr_gamma=5.0)
        white = diffusion_loss(
            tiny.unet, sched, latents, noise, t, hidden, 2, snr_gamma=5.0, instance_weights=torch.ones((2, 1, 8, 8))
        )
    for a, b in zip(plain, white):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_mask_files_are_read_and_not_trained_on(tmp_path):
    folder = _images(tmp_path / "set")
    _half_mask((96, 64)).save(folder / "img_0_mask.png")
    _half_mask((96, 64), keep="right").save(folder / "img_1-masklabel.png")  # OneTrainer's name
    assert [p.name for p in list_image_files(folder)] == ["img_0.png", "img_1.png", "img_2.png"]
    s = load_image_folder(folder, 64, masks=True)
    assert np.asarray(s.masks[0])[:, :48].min() == 255 and np.asarray(s.masks[0])[:, 48:].max() == 0
    assert np.asarray(s.masks[1])[:, :48].max() == 0
    assert s.masks[2] is None
    assert any("1 image(s) have no mask and train unmasked" in w and "img_2.png" in w for w in s.warnings)
    plain = load_image_folder(folder, 64)
    assert plain.masks is None and len(plain) == 3
    assert any("are not trained on; turn on masked_loss" in w for w in plain.warnings)
    assert s.fingerprint() != plain.fingerprint()


def test_mask_from_alpha(tmp_path):
    folder = tmp_path / "cutouts"
    folder.mkdir()
    for i in range(3):
        arr = np.zeros((64, 96, 4), dtype=np.uint8)
        arr[..., 0] = 200
        arr[:, :48, 3] = 255  # opaque left half: the subject
        Image.fromarray(arr, "RGBA").save(folder / f"cut_{i}.png")
    s = load_image_folder(folder, 64, masks=True, mask_from_alpha=True)
    mask = np.asarray(s.masks[0])
    assert mask[:, :48].min() == 255 and mask[:, 48:].max() == 0
    assert np.asarray(s.images[0])[:, 60].tolist()[0] == [255, 255, 255]  # the image: alpha over white, as before
    with pytest.raises(DreamLoomError, match="no image .* has a mask file or an alpha channel"):
        load_image_folder(_images(tmp_path / "opaque"), 64, masks=True, mask_from_alpha=True)


def test_bad_masks_are_refused_naming_the_files(tmp_path):
    folder = _images(tmp_path / "set")
    _half_mask((90, 60)).save(folder / "img_0_mask.png")
    Image.new("L", (96, 64), 0).save(folder / "img_1_mask.png")
    with pytest.raises(DreamLoomError) as info:
        load_image_folder(folder, 64, masks=True)
    message = str(info.value)
    assert "img_0_mask.png is 90x60 but its image img_0.png is 96x64" in message
    assert "img_1_mask.png is all black" in message
    with pytest.raises(DreamLoomError, match="masked_loss is on, but no image"):
        load_image_folder(_images(tmp_path / "none"), 64, masks=True)


def test_the_trainer_weights_the_loss_by_the_mask_at_latent_size(tmp_path, monkeypatch):
    import trainer.training.loop as loop_module
    from trainer.base_models.builtin import build_tiny

    folder = _images(tmp_path / "set", size=(96, 64))
    for i in range(3):
        _half_mask((96, 64)).save(folder / f"img_{i}_mask.png")
    seen = []
    real = loop_module.diffusion_loss

    def spy(*args, **kwargs):
        seen.append((args[2].shape, kwargs["instance_weights"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "diffusion_loss", spy)
    cfg = tiny_config(
        folder,
        resolution=80,
        bucket_step=16,
        masked_loss=True,
        unmasked_weight=0.1,
        random_flip=True,
        max_train_steps=4,
        with_prior_preservation=False,
    )
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny())
    result = trainer.run()
    assert len(seen) == 4 and all(np.isfinite(r["loss"]) for r in result.losses)
    flips = []
    for k, (shape, weights) in enumerate(seen):
        assert shape == (1, 4, 8, 12) and weights.shape == (1, 1, 8, 12)
        _, [(index, flip)] = trainer.layout.instance_batch(cfg.seed, trainer.entries, trainer.buckets.bucket_of, k)
        row = weights[0, 0]
        learn, ignore = (row[:, 6:], row[:, :6]) if flip else (row[:, :6], row[:, 6:])
        assert torch.all(learn == 1.0) and torch.allclose(ignore, torch.full_like(ignore, 0.1))  # the floor
        flips.append(flip)
    assert set(flips) == {False, True}  # the mask is mirrored with its image


def test_load_training_images_takes_a_mask_input(fake_comfy):
    from conftest import pack_error, pack_node

    node = pack_node("DreamLoomLoadTrainingImages")()
    images = torch.rand((3, 48, 64, 3))
    mask = torch.zeros((3, 48, 64))
    mask[:, :, :32] = 1.0  # ComfyUI's MASK: 1 = learn (the mask editor paints 1)
    ds, _ = node.load("ignored", 64, "center", False, False, images=images, mask=mask)
    assert ds.masked_loss and ds.aspect_buckets and not ds.mask_from_alpha
    loaded = load_image_folder(ds.folder, 64, masks=True)
    assert len(loaded) == 3 and all(m is not None for m in loaded.masks)
    arr = np.asarray(loaded.masks[2])
    assert arr[:, :32].min() == 255 and arr[:, 32:].max() == 0
    one_for_all, _ = node.load("ignored", 64, "center", False, False, images=images, mask=mask[:1])
    assert one_for_all.folder == ds.folder  # the same masks: the same content-addressed folder
    plain, _ = node.load("ignored", 64, "center", False, False, False, "off", images=images)
    assert not plain.masked_loss and not plain.aspect_buckets and plain.folder != ds.folder
    Err = pack_error()
    with pytest.raises(Err, match="mask is 32x24 pixels .* but the images are 64x48"):
        node.load("ignored", 64, "center", False, False, images=images, mask=torch.ones((3, 24, 32)))
    with pytest.raises(Err, match="2 masks for 3 images"):
        node.load("ignored", 64, "center", False, False, images=images, mask=torch.ones((2, 48, 64)))
    with pytest.raises(Err, match="no IMAGE batch"):
        node.load("dreamloom_fabric", 64, "center", False, False, mask=mask)
