import io
import os

import numpy as np
import pytest
from PIL import Image

from trainer.data.images import crop_resize, image_set_from_arrays, list_image_files, load_image_folder, load_rgb
from trainer.errors import DreamLoomError


def _png(path, size=(96, 80), color=(200, 30, 40), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return path


def test_folder_with_any_letter_case_and_captions(tmp_path):
    _png(tmp_path / "a.PNG")
    Image.new("RGB", (90, 90), "blue").save(tmp_path / "b.JpEg", format="JPEG")
    Image.new("RGB", (90, 90), "green").save(tmp_path / "c.webp", format="WEBP")
    (tmp_path / "a.txt").write_text("a sks pattern on silk\n")
    (tmp_path / "notes.md").write_text("ignored")
    files = list_image_files(tmp_path)
    assert [p.name for p in files] == ["a.PNG", "b.JpEg", "c.webp"]  # each once
    s = load_image_folder(tmp_path, 64)
    assert len(s) == 3 and s.captions == ["a sks pattern on silk", None, None]
    assert all(im.mode == "RGB" for im in s.images)


def test_empty_folder_and_only_text_files(tmp_path):
    with pytest.raises(DreamLoomError, match="No images.*empty"):
        load_image_folder(tmp_path, 64)
    (tmp_path / "caption.txt").write_text("x")
    with pytest.raises(DreamLoomError, match="found only: caption.txt") as info:
        load_image_folder(tmp_path, 64)
    assert "jpg" in info.value.hint
    with pytest.raises(DreamLoomError, match="not found"):
        load_image_folder(tmp_path / "nope", 64)


def test_every_bad_file_is_listed_with_its_reason(tmp_path):
    _png(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), "red").save(buf, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _png(tmp_path / "tiny.png", size=(1, 1))
    (tmp_path / "text.jpg").write_text("not an image at all")
    with pytest.raises(DreamLoomError) as info:
        load_image_folder(tmp_path, 64)
    msg = str(info.value)
    assert "4 of 5 images" in msg
    for name in ("corrupt.png", "truncated.jpg", "tiny.png", "text.jpg"):
        assert name in msg
    assert "good.png" not in msg
    assert "1x1" in msg


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    _png(tmp_path / "bomb.png", size=(300, 300))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(DreamLoomError, match="bomb"):
        load_image_folder(tmp_path, 64)


@pytest.mark.parametrize("mode", ["L", "I;16", "CMYK", "P-transparent", "RGBA", "LA", "1"])
def test_unusual_modes_convert_to_rgb(tmp_path, mode):
    path = tmp_path / ("img.tif" if mode == "CMYK" else "img.png")
    if mode == "I;16":
        arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
        Image.fromarray(arr).save(path)  # uint16 -> mode I;16
    elif mode == "CMYK":
        path = tmp_path / "img.jpg"
        Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(path, format="JPEG")
    elif mode == "P-transparent":
        im = Image.new("P", (64, 64), 1)
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        im.info["transparency"] = 1
        im.save(path, transparency=1)
    else:
        Image.new(mode, (64, 64)).save(path)
    s = load_image_folder(tmp_path, 64)
    im = s.images[0]
    assert im.mode == "RGB" and im.size == (64, 64)
    arr = np.asarray(im)
    if mode == "I;16":
        assert arr.max() > 200 and arr.min() < 10  # 16-bit range scaled, not clipped
    if mode == "CMYK":
        assert arr[..., 0].mean() > 200 and arr[..., 1].mean() < 60  # cyan-free: red
    if mode == "P-transparent":
        assert arr.min() == 255  # transparent pixels over white


def test_exif_orientation_is_respected(tmp_path):
    im = Image.new("RGB", (100, 50), "red")
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "rot.jpg").size == (50, 100)


def test_mixed_sizes_unicode_names_and_small_image_warning(tmp_path):
    _png(tmp_path / "stoff mit äöü 布.png", size=(300, 200))
    _png(tmp_path / "klein.png", size=(40, 40))
    s = load_image_folder(tmp_path, 64)
    assert len(s) == 2
    assert any("klein.png" in w and "smaller than the training resolution" in w for w in s.warnings)
    assert {crop_resize(im, 64).size for im in s.images} == {(64, 64)}


def test_symlink_outside_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _png(outside / "secret.png")
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "ok.png")
    os.symlink(outside / "secret.png", data / "link.png")
    with pytest.raises(DreamLoomError, match="link.png.*outside"):
        load_image_folder(data, 64)


def test_random_crop_and_batch_arrays():
    import random

    im = Image.fromarray(np.arange(200 * 100 * 3, dtype=np.uint8).reshape(100, 200, 3))
    a = crop_resize(im, 64, center=False, rng=random.Random(1))
    b = crop_resize(im, 64, center=False, rng=random.Random(2))
    assert a.size == (64, 64) and np.asarray(a).tobytes() != np.asarray(b).tobytes()
    s = image_set_from_arrays(np.random.rand(3, 32, 48, 3).astype(np.float32))
    assert len(s) == 3 and s.images[0].size == (48, 32)
    with pytest.raises(DreamLoomError):
        image_set_from_arrays(np.zeros((0, 8, 8, 3)))
