import numpy as np
import pytest
from PIL import Image

from trainer.data.class_images import ClassImageSpec, class_dir_for, generate_class_images
from trainer.errors import DreamLoomError


def _spec(tiny, **kw):
    base = dict(
        model_fingerprint=tiny.fingerprint,
        prompt="a fabric pattern",
        negative_prompt="",
        sampler="dpmpp_2m",
        steps=2,
        guidance=7.5,
        resolution=64,
        seed=3,
    )
    base.update(kw)
    return ClassImageSpec(**base)


def test_cache_key_covers_every_setting(tiny):
    a = _spec(tiny)
    keys = {a.key()}
    for change in (
        dict(prompt="a cloth"),
        dict(negative_prompt="blurry"),
        dict(sampler="ddim"),
        dict(steps=3),
        dict(guidance=5.0),
        dict(resolution=128),
        dict(seed=4),
        dict(model_fingerprint="other"),
    ):
        keys.add(_spec(tiny, **change).key())
    assert len(keys) == 9
    assert class_dir_for("/c", a) == class_dir_for("/c", _spec(tiny))


def test_partial_set_resumes_and_batching_does_not_change_images(tiny, tmp_path):
    spec = _spec(tiny)
    calls = {"n": 0}

    def stop_after_one_batch():
        calls["n"] += 1
        return calls["n"] > 1

    folder = tmp_path / "cls"
    with pytest.raises(InterruptedError):
        generate_class_images(tiny, spec, 6, folder, batch_size=2, should_stop=stop_after_one_batch)
    kept = sorted(p.name for p in folder.glob("class_*.png"))
    assert kept == ["class_00000.png", "class_00001.png"]
    first_bytes = (folder / "class_00000.png").read_bytes()
    paths = generate_class_images(tiny, spec, 6, folder, batch_size=4)
    assert len(paths) == 6 and all(p.exists() for p in paths)
    assert (folder / "class_00000.png").read_bytes() == first_bytes  # kept, not regenerated
    # A different batch size gives the same images: each depends only on (seed, index). Batched matrix
    # kernels may round differently per batch size, so pixels agree to within float rounding, not bit for bit.
    other = tmp_path / "other"
    generate_class_images(tiny, spec, 6, other, batch_size=3)
    pixels = [np.asarray(Image.open(folder / f"class_{i:05d}.png"), dtype=np.int16) for i in range(6)]
    for i in range(6):
        again = np.asarray(Image.open(other / f"class_{i:05d}.png"), dtype=np.int16)
        assert np.abs(again - pixels[i]).max() <= 2
        assert all(np.abs(again - pixels[j]).mean() > 10 for j in range(6) if j != i)  # and unlike the others
    # A finished set is reused without generating.
    mtime = (folder / "class_00005.png").stat().st_mtime_ns
    generate_class_images(tiny, spec, 6, folder)
    assert (folder / "class_00005.png").stat().st_mtime_ns == mtime


def test_folder_of_other_settings_is_refused(tiny, tmp_path):
    generate_class_images(tiny, _spec(tiny), 1, tmp_path / "c")
    with pytest.raises(DreamLoomError, match="different settings"):
        generate_class_images(tiny, _spec(tiny, prompt="a cloth"), 1, tmp_path / "c")


@pytest.mark.parametrize("text", ['{"photos": ["a.jpg"]}', "[1, 2]", "not json"])
def test_a_manifest_json_dreamloom_did_not_write_is_never_replaced(tiny, tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(DreamLoomError, match="was not written by DreamLoom"):
        generate_class_images(tiny, _spec(tiny), 2, tmp_path)
    assert (tmp_path / "manifest.json").read_text() == text and not list(tmp_path.glob("class_*.png"))


def test_making_class_images_in_bf16_gives_the_model_back_bit_for_bit(tiny, tmp_path):
    """On a GPU the set is made in the training dtype (bf16 on Ampere and newer). Casting the fp32 (or fp16) model
    there and back rounded it for good: a full fine-tune then started from, and exported, a bf16-rounded model."""
    import torch

    # buffers too: `module.to` replaces a buffer with a new tensor, where a parameter keeps its object
    tiny.text_encoder.register_buffer("probe", torch.linspace(0, 1, 7))
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in tiny.modules().items()}
    generate_class_images(
        tiny, _spec(tiny, steps=1), 1, tmp_path / "c", batch_size=1, device="cpu", dtype=torch.bfloat16
    )
    for name, module in tiny.modules().items():
        for key, value in module.state_dict().items():
            assert value.dtype == before[name][key].dtype and torch.equal(value, before[name][key]), f"{name}.{key}"
