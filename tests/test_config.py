import pytest

from trainer.config import TrainConfig
from trainer.errors import DreamLoomError


def test_defaults_follow_the_tutorial():
    cfg = TrainConfig().validate()
    assert (cfg.rank, cfg.learning_rate, cfg.max_train_steps, cfg.num_class_images) == (4, 1e-4, 800, 100)
    assert cfg.prior_loss_weight == 1.0 and cfg.with_prior_preservation
    assert cfg.instance_prompt == "a sks african fabric pattern" and cfg.class_prompt == "a fabric pattern"
    assert cfg.resolution == 512 and isinstance(cfg.seed, int)
    assert cfg.alpha == 4.0 and cfg.lora_scale == 1.0


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("max_train_steps", 0, "max_train_steps"),
        ("rank", 0, "rank"),
        ("learning_rate", -1e-4, "learning_rate"),
        ("learning_rate", float("nan"), "learning_rate"),
        ("resolution", 500, "multiple of 8"),
        ("resolution", 32, "resolution"),
        ("alpha", 0.0, "alpha"),
        ("method", "dreambooth-full", "method"),
        ("mixed_precision", "fp8", "mixed_precision"),
        ("lr_scheduler", "warmup", "lr_scheduler"),
        ("class_sampler", "plms", "class_sampler"),
        ("num_vectors", 17, "num_vectors"),
        ("snr_gamma", -1.0, "snr_gamma"),
        ("noise_offset", 2.0, "noise_offset"),
        ("train_batch_size", 0, "train_batch_size"),
        ("gradient_accumulation_steps", 0, "gradient_accumulation_steps"),
        ("seed", -1, "seed"),
        ("lora_targets", [], "lora_targets"),
        ("output_name", "../../x", "output_name"),
        ("output_name", "/etc/passwd", "output_name"),
        ("output_name", "a\x00b", "output_name"),
        ("output_name", "CON", "output_name"),
        ("base_model", "", "base_model"),
    ],
)
def test_each_bad_field_gets_its_own_error(field, value, needle):
    cfg = TrainConfig(**{field: value})
    with pytest.raises(DreamLoomError) as info:
        cfg.validate()
    text = str(info.value)
    assert needle in text and field in text
    assert info.value.hint  # says how to fix it


def test_instance_prompt_must_contain_the_token():
    with pytest.raises(DreamLoomError, match="(?s)instance_prompt.*token 'sks'"):
        TrainConfig(instance_prompt="an african fabric pattern").validate()
    # A token that only appears inside another word does not count.
    with pytest.raises(DreamLoomError):
        TrainConfig(instance_prompt="a asks fabric").validate()


def test_prior_weight_without_class_images_is_refused():
    with pytest.raises(DreamLoomError, match="num_class_images"):
        TrainConfig(num_class_images=0).validate()
    TrainConfig(num_class_images=0, with_prior_preservation=False).validate()


def test_device_dependent_options():
    cfg = TrainConfig(use_8bit_adam=True).validate()
    with pytest.raises(DreamLoomError, match="8-bit AdamW.*cpu"):
        cfg.check_device("cpu")
    cfg.check_device("cuda")
    with pytest.raises(DreamLoomError, match="fp16"):
        TrainConfig(mixed_precision="fp16").validate().check_device("cpu")


def test_toml_round_trip_and_coercion(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[train]\nrank = 8\nalpha = 8\nlearning_rate = "2e-4"\nrandom_flip = "yes"\nlora_targets = ["to_q", "to_v"]\n'
    )
    cfg = TrainConfig.from_toml(path).validate()
    assert cfg.rank == 8 and cfg.alpha == 8.0 and cfg.learning_rate == 2e-4 and cfg.random_flip is True
    assert cfg.lora_targets == ["to_q", "to_v"]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_and_mistyped_settings(tmp_path):
    with pytest.raises(DreamLoomError, match="did you mean 'learning_rate'"):
        TrainConfig.from_dict({"learning_rte": 1e-4})
    with pytest.raises(DreamLoomError, match="rank = 'four'"):
        TrainConfig.from_dict({"rank": "four"})
    with pytest.raises(DreamLoomError, match="rank"):
        TrainConfig.from_dict({"rank": 2.5})
    bad = tmp_path / "bad.toml"
    bad.write_text("rank = = 4")
    with pytest.raises(DreamLoomError, match="not valid TOML"):
        TrainConfig.from_toml(bad)
    with pytest.raises(DreamLoomError, match="not found"):
        TrainConfig.from_toml(tmp_path / "missing.toml")


def test_cli_defaults_to_tiny_fabric_at_its_native_size(tmp_path):
    from trainer.cli import _config_from_args, build_parser

    parse = build_parser().parse_args
    cfg = _config_from_args(parse(["train", "--output-dir", str(tmp_path)]))
    assert cfg.base_model == "tiny-fabric" and cfg.resolution == 128
    cfg = _config_from_args(parse(["train", "--output-dir", str(tmp_path), "--base-model", "tiny"]))
    assert cfg.base_model == "tiny" and cfg.resolution == 64
    cfg = _config_from_args(parse(["train", "--output-dir", str(tmp_path), "--resolution", "96"]))
    assert cfg.resolution == 96  # an explicit size wins
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nbase_model = "/models/sd15.safetensors"\n')
    cfg = _config_from_args(parse(["train", "--output-dir", str(tmp_path), "--config", str(toml)]))
    assert cfg.base_model == "/models/sd15.safetensors" and cfg.resolution == 512
    toml.write_text("[train]\nrank = 8\n")  # a file that names no model gets the CLI's default model
    cfg = _config_from_args(parse(["train", "--output-dir", str(tmp_path), "--config", str(toml)]))
    assert cfg.base_model == "tiny-fabric" and cfg.resolution == 128 and cfg.rank == 8


def test_class_prompt_must_differ_from_the_instance_prompt_and_lack_the_token():
    with pytest.raises(DreamLoomError, match="(?s)class_prompt = 'A sks  african fabric pattern'.*same as") as info:
        TrainConfig(class_prompt="A sks  african fabric pattern").validate()
    assert "instance_prompt = 'a sks african fabric pattern'" in info.value.message
    assert "'an african fabric pattern'" in info.value.hint  # the instance prompt without the token
    with pytest.raises(DreamLoomError, match="class_prompt = 'a fabric pattern, SKS style'.*contains the token 'sks'"):
        TrainConfig(class_prompt="a fabric pattern, SKS style").validate()
    TrainConfig(class_prompt="a pattern of tasks").validate()  # the token inside another word is no token
    TrainConfig(class_prompt="a sks fabric", with_prior_preservation=False).validate()  # no class images
    TrainConfig(class_prompt="a sks fabric", prior_loss_weight=0.0).validate()
    TrainConfig(method="ti", class_prompt="a sks fabric").validate()  # TI trains no prior


def test_builtin_resolution_table_matches_the_models():
    from trainer.base_models.builtin import BUILTIN_RESOLUTION as of_the_models
    from trainer.config import BUILTIN_RESOLUTION

    assert BUILTIN_RESOLUTION == of_the_models


def test_identity_ignores_settings_at_their_defaults():
    """A run's identity (run folder, checkpoints, the CLI's finished-run check) is the settings not at their
    defaults, so an option a newer version adds leaves earlier runs resumable."""
    from trainer.config import config_identity
    from trainer.jobs.parent import job_id
    from trainer.training.checkpoint import train_id_for

    cfg = TrainConfig(instance_dir="imgs", rank=8)
    assert cfg.identity() == {"instance_dir": "imgs", "rank": 8}
    older = {k: v for k, v in cfg.to_dict().items() if k not in ("validation_every", "concepts")}  # before those
    assert config_identity(older) == cfg.identity()
    request = {"kind": "train", "config": cfg.to_dict()}
    assert job_id(request, {}) == job_id({"kind": "train", "config": older}, {})
    assert job_id(request, {}) != job_id({"kind": "train", "config": {**older, "rank": 4}}, {})
    assert train_id_for(cfg, "d", "m") != train_id_for(TrainConfig(instance_dir="imgs", rank=4), "d", "m")


@pytest.mark.parametrize(
    "instance_prompt, class_prompt, method, warned",
    [
        ("a sks african fabric pattern", "a fabric pattern", "lora", False),  # the tutorial
        ("a photo of sks dog", "a photo of a dog", "lora", False),
        ("a photo of sks dog", "a fabric pattern", "lora", True),  # the default class prompt left for a dog
        ("a photo of sks dog", "a fabric pattern", "full", True),
        ("a photo of sks dog", "a fabric pattern", "ti", False),  # no class images
    ],
)
def test_a_class_prompt_unrelated_to_the_subject_is_warned_about(instance_prompt, class_prompt, method, warned):
    cfg = TrainConfig(instance_dir="x", instance_prompt=instance_prompt, class_prompt=class_prompt, method=method)
    notes = cfg.notes()
    assert bool(notes) == warned
    if warned:
        assert "'a fabric pattern' shares no word with instance_prompt 'a photo of sks dog'" in notes[0]
        assert "perhaps 'a photo of dog'" in notes[0] and "--class-prompt" in notes[0]


def test_mask_from_alpha_without_masked_loss_is_warned_about():
    assert TrainConfig(instance_dir="x", mask_from_alpha=True, masked_loss=True).notes() == []
    (note,) = TrainConfig(instance_dir="x", mask_from_alpha=True).notes()
    assert "masked_loss is off, so no mask is used" in note and "--masked-loss true" in note


def test_config_files_that_cannot_be_read_are_named(tmp_path):
    with pytest.raises(DreamLoomError, match="is a folder"):
        TrainConfig.from_toml(tmp_path)
    utf16 = tmp_path / "utf16.toml"
    utf16.write_text("rank = 8\n", encoding="utf-16")
    with pytest.raises(DreamLoomError, match="is not UTF-8 text") as refused:
        TrainConfig.from_toml(utf16)
    assert "Save it as UTF-8" in refused.value.hint
    mixed = tmp_path / "mixed.toml"
    mixed.write_text("rank = 8\n[train]\nmax_train_steps = 10\n")
    with pytest.raises(DreamLoomError, match=r"both in a \[train\] table and outside it \(rank\)"):
        TrainConfig.from_toml(mixed)
    table = tmp_path / "table.toml"
    table.write_text("[train]\nrank = 8\n")
    assert TrainConfig.from_toml(table).rank == 8


def test_wrong_types_are_explained_in_words_and_none_means_the_default():
    with pytest.raises(DreamLoomError) as refused:
        TrainConfig.from_dict({"max_train_steps": "many"})
    assert "expected a whole number" in refused.value.message and "as a whole number" in refused.value.hint
    with pytest.raises(DreamLoomError, match="expected true, false or auto"):
        TrainConfig.from_dict({"gradient_checkpointing": "sometimes"})
    assert TrainConfig.from_dict({"checkpoints_keep": "none"}).checkpoints_keep is None
    assert TrainConfig.from_dict({"gradient_checkpointing": "None"}).gradient_checkpointing is None


def test_a_home_folder_tilde_in_a_config_file_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))  # what expanduser reads on Windows
    toml = tmp_path / "run.toml"
    toml.write_text('instance_dir = "~/photos"\nclass_dir = "~/class"\nvalidation_dir = "~/held-out"\n')
    cfg = TrainConfig.from_toml(toml).validate()
    assert [cfg.instance_dir, cfg.class_dir, cfg.validation_dir] == [
        str(tmp_path / "photos"),
        str(tmp_path / "class"),
        str(tmp_path / "held-out"),
    ]
    two = tmp_path / "two.toml"
    two.write_text(
        '[[concepts]]\ninstance_dir = "~/dog"\ninstance_prompt = "a sks dog"\nclass_dir = "~/dogs"\n'
        '[[concepts]]\ninstance_dir = "~/cat"\ninstance_prompt = "a zwx cat"\ntoken = "zwx"\n'
    )
    concepts = TrainConfig.from_toml(two).validate().concept_list()
    assert [c.instance_dir for c in concepts] == [str(tmp_path / "dog"), str(tmp_path / "cat")]
    assert concepts[0].class_dir == str(tmp_path / "dogs")
