"""Captions as training prompts: the token where the user says, tag shuffle with kept tags, dropout."""

import pytest
from conftest import tiny_config

from trainer.config import TrainConfig
from trainer.data.captions import CaptionPolicy, with_token
from trainer.errors import DreamLoomError
from trainer.training.methods import make_method


def test_the_token_goes_where_the_caption_says_or_in_front():
    assert with_token("a photo of {token} on a beach", "sks") == "a photo of sks on a beach"
    assert with_token("a photo of a dog", "sks") == "sks, a photo of a dog"
    assert with_token("a photo of sks dog", "sks") == "a photo of sks dog"
    assert with_token("a sksy thing", "sks") == "sks, a sksy thing"  # a word, not a substring


def test_shuffle_keeps_the_first_tags_and_permutes_the_rest():
    policy = CaptionPolicy(shuffle=True, keep_tokens=2, seed=7)
    text = "sks, fabric, red, woven, strips, bold"
    orders = set()
    for position in range(50):
        tags = policy.vary(text, 0, position).split(", ")
        assert tags[:2] == ["sks", "fabric"] and sorted(tags[2:]) == sorted(["red", "woven", "strips", "bold"])
        orders.add(tuple(tags))
    assert len(orders) > 5


def test_prompts_are_a_pure_function_of_seed_image_and_position():
    a, b = CaptionPolicy(shuffle=True, seed=1), CaptionPolicy(shuffle=True, seed=2)
    text = "sks, a, b, c, d, e, f"
    assert [a.vary(text, 3, p) for p in range(20)] == [a.vary(text, 3, p) for p in range(20)]
    assert [a.vary(text, 3, p) for p in range(20)] != [b.vary(text, 3, p) for p in range(20)]
    assert [a.vary(text, 3, p) for p in range(20)] != [a.vary(text, 4, p) for p in range(20)]


def test_dropout_rate_is_honoured_on_average():
    policy = CaptionPolicy(dropout=0.25, seed=0)
    empty = sum(policy.vary("sks, red", i % 10, i) == "" for i in range(4000))
    assert 0.22 < empty / 4000 < 0.28
    assert CaptionPolicy().vary("sks, red, blue", 0, 0) == "sks, red, blue"  # off: unchanged


def test_lora_prompts_with_captions_carry_the_token_and_vary_when_asked(fabric_dir):
    cfg = TrainConfig(instance_dir=str(fabric_dir), use_captions=True, caption_shuffle=True).validate()
    method = make_method(cfg)
    method.n_images = 2
    captions = ["red, woven, strips, bold colours", "a {token} pattern, blue, zigzag"]
    for position in range(20):
        first = method.instance_prompt(0, captions[0], position)
        assert first.startswith("sks, ") and set(first.split(", ")) == {"sks", "red", "woven", "strips", "bold colours"}
        assert method.instance_prompt(1, captions[1], position).startswith("a sks pattern")
    assert method.prompts_to_cache(captions) is None  # they change per showing: encoded every step
    fixed = make_method(TrainConfig(instance_dir=str(fabric_dir), use_captions=True).validate())
    assert fixed.prompts_to_cache(captions) == sorted(
        ["sks, red, woven, strips, bold colours", "a sks pattern, blue, zigzag"]
    )


@pytest.mark.parametrize("setting", [{"caption_dropout": 1.0}, {"caption_dropout": -0.1}, {"caption_keep_tokens": -1}])
def test_bad_caption_settings_are_refused(setting):
    with pytest.raises(DreamLoomError, match=next(iter(setting))):
        TrainConfig(**setting).validate()


def test_a_run_with_shuffled_captions_and_dropout_trains(tiny, fabric_dir, tmp_path):
    from trainer.training.loop import Trainer

    data = tmp_path / "data"
    data.mkdir()
    for i, image in enumerate(sorted(fabric_dir.glob("*.png"))[:3]):
        (data / image.name).write_bytes(image.read_bytes())
        (data / f"{image.stem}.txt").write_text(f"woven strips, colour {i}, bold, fabric")
    cfg = tiny_config(
        data,
        max_train_steps=4,
        use_captions=True,
        caption_shuffle=True,
        caption_dropout=0.5,
        with_prior_preservation=False,
    )
    trainer = Trainer(cfg, tmp_path / "run", comps=tiny, cache_root=tmp_path / "cache")
    result = trainer.run()
    assert len(result.losses) == 4 and all(r["loss"] == r["loss"] for r in result.losses)
    assert trainer.offloaded == ["vae"]  # prompts vary, so the text encoder stays to encode them
    log = (tmp_path / "run" / "events.jsonl").read_text()
    assert "instance prompts (first images, first epoch): " in log and "sks" in log
