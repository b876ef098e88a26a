import io
import os

import numpy as np
import pytest
from PIL import Image

from trainer.data.images import (
    caption_token_count,
    crop_resize,
    image_set_from_arrays,
    list_image_files,
    load_image_folder,
    load_rgb,
    unsupported_image_files,
)
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


def test_decompression_bomb_is_refused_but_a_large_photo_loads(tmp_path, monkeypatch):
    """Pillow's limit scaled down: above twice it (a bomb) refused, between once and twice (as a 108-megapixel
    phone photo is against the real limit of 89) loaded."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    _png(tmp_path / "large.png", size=(120, 120))  # 14,400 pixels: Pillow only warns
    assert load_image_folder(tmp_path, 64).images[0].size == (120, 120)
    _png(tmp_path / "bomb.png", size=(300, 300))
    with pytest.raises(DreamLoomError, match="bomb") as refused:
        load_image_folder(tmp_path, 64)
    assert "downscale a photo of more than 179 megapixels" in str(refused.value.hint)


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


def test_unreadable_picture_types_are_named_in_a_warning(tmp_path):
    for i in range(3):
        _png(tmp_path / f"ok{i}.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "anim.GIF")
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (tmp_path / "logo.svg").write_text("<svg/>")
    (tmp_path / "pic.avif").write_bytes(b"\x00")
    (tmp_path / "scan.tif").write_bytes(b"II*\x00")
    (tmp_path / ".hidden.gif").write_bytes(b"")
    (tmp_path / "notes.md").write_text("not a picture")
    s = load_image_folder(tmp_path, 64)
    assert len(s) == 3
    assert [p.name for p in unsupported_image_files(tmp_path)] == [
        "anim.GIF",
        "logo.svg",
        "photo.heic",
        "pic.avif",
        "scan.tif",
    ]
    [warning] = [w for w in s.warnings if "does not read" in w]
    for name in ("anim.GIF", "photo.heic", "logo.svg", "pic.avif", "scan.tif", ".jpg", ".png", ".webp", "PNG or JPEG"):
        assert name in warning, name
    assert ".hidden.gif" not in warning and "notes.md" not in warning


def test_a_folder_of_only_unreadable_picture_types_says_so(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.gif")
    (tmp_path / "b.heic").write_bytes(b"\x00")
    with pytest.raises(DreamLoomError, match="No images DreamLoom can read.*a.gif, b.heic are picture types") as info:
        load_image_folder(tmp_path, 64)
    assert "PNG or JPEG" in info.value.hint and ".webp" in info.value.hint


def test_fewer_than_three_images_is_a_warning_not_an_error(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    s = load_image_folder(tmp_path, 64)
    assert len(s) == 2
    assert any("only 2 image(s)" in w and "at least 3" in w for w in s.warnings), s.warnings
    _png(tmp_path / "c.png")
    assert not any("only" in w for w in load_image_folder(tmp_path, 64).warnings)


def test_caption_that_is_not_utf8_is_read_with_a_warning(tmp_path):
    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_bytes(b"a sks \xff pattern")
    (tmp_path / "b.txt").write_bytes("\ufeffa sks caf\u00e9 pattern".encode("utf-8"))  # a BOM is fine
    s = load_image_folder(tmp_path, 64)
    assert s.captions == ["a sks \ufffd pattern", "a sks caf\u00e9 pattern", None]
    [warning] = [w for w in s.warnings if "UTF-8" in w]
    assert "caption a.txt" in warning and "offset 6" in warning and "replaced with U+FFFD" in warning


def test_caption_longer_than_clip_reads_warns_that_the_end_is_cut(tmp_path, monkeypatch):
    import trainer.data.images as images

    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text(" ".join(["sks kente fabric pattern"] * 25))  # 100 words
    (tmp_path / "b.txt").write_text("a sks fabric pattern")

    def no_tokenizer():
        raise AssertionError("the bounds decide these captions; the tokenizer is not loaded")

    monkeypatch.setattr(images, "_clip_tokenizer", no_tokenizer)
    s = load_image_folder(tmp_path, 64)
    [warning] = [w for w in s.warnings if "CLIP tokens" in w]
    assert "caption a.txt is at least 102 CLIP tokens" in warning and "77" in warning and "cuts off the end" in warning
    assert s.captions[0].endswith("pattern")  # the caption itself is kept whole; the trainer truncates


def test_caption_token_count_agrees_with_the_shipped_tokenizer():
    from trainer.data.images import _clip_tokenizer

    tokenizer = _clip_tokenizer()
    assert tokenizer is not None
    texts = [
        "a sks fabric pattern",
        "a photo of sks, woven 1920s kente strips!! on a hand_made loom",
        " ".join(["incomprehensibilities photographically"] * 20),  # few words, many tokens: tokenized
        " ".join(["woven"] * 74),  # 76 tokens: fits
        " ".join(["woven"] * 76),  # 78 tokens: cut
    ]
    for text in texts:
        real = len(tokenizer.tokenize(text)) + 2
        count, exact = caption_token_count(text)
        assert (count > 77) == (real > 77), text
        if exact:
            assert count == real, text


def test_captions_beside_the_images_are_named_when_not_used(tmp_path):
    for i in range(5):
        _png(tmp_path / f"img{i}.png", size=(64, 64))
    (tmp_path / "img0.txt").write_text("a sks dog on a beach")
    (tmp_path / "img3.txt").write_text("a sks dog in snow")
    unused = load_image_folder(tmp_path, 64, use_captions=False)
    assert any("2 caption file(s) (img0.txt, img3.txt) are not used" in n for n in unused.warnings)
    used = load_image_folder(tmp_path, 64, use_captions=True)
    assert not any("caption file(s)" in n for n in used.warnings) and used.captions[0] == "a sks dog on a beach"


def test_a_kohya_style_folder_points_at_its_subfolder(tmp_path):
    sub = tmp_path / "10_sks dog"
    sub.mkdir()
    _png(sub / "a.png", size=(64, 64))
    with pytest.raises(DreamLoomError) as refused:
        load_image_folder(tmp_path, 64)
    assert "Images in subfolders (10_sks dog" in refused.value.message and "(it is empty)" not in refused.value.message


def test_animated_pictures_are_named_as_trained_on_their_first_frame(tmp_path):
    for i in range(3):
        _png(tmp_path / f"still{i}.png", size=(64, 64))
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    red.save(tmp_path / "moving.webp", save_all=True, append_images=[blue], duration=100)
    red.save(tmp_path / "moving.png", save_all=True, append_images=[blue], duration=100)  # APNG
    red.save(tmp_path / "one.gif", save_all=True, duration=100)  # one frame: not animated
    red.save(tmp_path / "phone.jpg", "MPO", save_all=True, append_images=[blue])  # a JPEG with an MPF preview
    assert Image.open(tmp_path / "phone.jpg").n_frames == 2
    loaded = load_image_folder(tmp_path, 64)
    (note,) = [n for n in loaded.warnings if "animated" in n]
    assert note.startswith("2 animated picture(s) (moving.png, moving.webp): only the first frame"), note
    first = loaded.images[loaded.paths.index(str(tmp_path / "moving.webp"))]
    assert first.getpixel((32, 32))[0] > 200  # the red first frame
