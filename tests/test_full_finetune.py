"""The full DreamBooth fine-tune (method "full"): what trains, resume, EMA, the disk check, the exported file."""

import pytest
import torch
from conftest import assert_loss_falls, assert_same_tensors, run_whole_and_resumed, tiny_config

from trainer.base_models.builtin import build_tiny
from trainer.base_models.load import family_of, load_base_model
from trainer.base_models.native import native_resolution
from trainer.config import TrainConfig
from trainer.errors import DreamLoomError
from trainer.training.loop import Trainer
from trainer.training.loss import diffusion_loss
from trainer.training.methods.full import FullFineTuneMethod, ParameterEMA


def full_config(fabric_dir, **overrides):
    base = dict(method="full", learning_rate=1e-4, with_prior_preservation=False, max_train_steps=3)
    base.update(overrides)
    return tiny_config(fabric_dir, **base)


def _snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module) -> set:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def _trained_state(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.method.trainable_state(trainer.comps).items()}


def test_defaults_follow_the_paper_and_the_colab():
    full = TrainConfig(method="full").validate()
    assert (full.learning_rate, full.text_encoder_lr, full.checkpoints_keep) == (5e-6, 1e-6, 1)
    lora = TrainConfig().validate()
    assert (lora.learning_rate, lora.text_encoder_lr, lora.checkpoints_keep) == (1e-4, 5e-5, 2)
    assert TrainConfig(method="full", checkpoints_keep=3).validate().checkpoints_keep == 3
    assert TrainConfig.from_dict({"method": "full", "checkpoints_keep": "4"}).validate().checkpoints_keep == 4
    with pytest.raises(DreamLoomError, match="full fine-tune only"):
        TrainConfig(use_ema=True).validate()
    with pytest.raises(DreamLoomError, match="export_precision"):
        TrainConfig(method="full", export_precision="fp8").validate()
    with pytest.raises(DreamLoomError, match="must contain the token"):
        TrainConfig(method="full", instance_prompt="a fabric pattern").validate()


def test_loss_falls_on_a_fixed_batch_and_the_whole_unet_changes(fabric_dir):
    tiny = build_tiny()
    method = FullFineTuneMethod(full_config(fabric_dir).validate())
    unet_before, vae_before, text_before = _snapshot(tiny.unet), _snapshot(tiny.vae), _snapshot(tiny.text_encoder)
    method.setup(tiny)
    tiny.unet.train()
    (group,) = method.param_groups(tiny)
    assert len(group["params"]) == len(list(tiny.unet.parameters()))
    opt = torch.optim.AdamW(group["params"], lr=1e-3)
    g = torch.Generator().manual_seed(3)
    lat, noise = torch.randn((4, 4, 8, 8), generator=g), torch.randn((4, 4, 8, 8), generator=g)
    t, enc = torch.randint(0, 1000, (4,), generator=g), torch.randn((4, 77, 64), generator=g)
    assert_loss_falls(tiny.unet, tiny.noise_scheduler(), (lat, noise, t, enc), opt, 30)
    params = {k for k, _ in tiny.unet.named_parameters()}
    assert _changed(unet_before, tiny.unet) == params  # every UNet weight moved, not only attention
    assert not _changed(vae_before, tiny.vae) and not _changed(text_before, tiny.text_encoder)


def test_prior_preservation_loss_and_gradients_equal_the_two_pass_reference(fabric_dir):
    """One UNet pass over instance + class rows gives the loss, and the gradient of every weight, of the paper's
    two separate passes: L = L_instance + lambda * L_prior."""
    import torch.nn.functional as F

    tiny = build_tiny()
    FullFineTuneMethod(full_config(fabric_dir).validate()).setup(tiny)
    sched = tiny.noise_scheduler()
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn((4, 4, 8, 8), generator=g), torch.randn((4, 4, 8, 8), generator=g)
    t, enc = torch.randint(0, 1000, (4,), generator=g), torch.randn((4, 77, 64), generator=g)
    loss, inst, prior = diffusion_loss(tiny.unet, sched, lat, noise, t, enc, n_instance=2, prior_weight=0.7)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tiny.unet.named_parameters()}
    tiny.unet.zero_grad()
    parts = []
    for rows in (slice(0, 2), slice(2, 4)):
        noisy = sched.add_noise(lat[rows], noise[rows], t[rows])
        parts.append(F.mse_loss(tiny.unet(noisy, t[rows], enc[rows]).sample, noise[rows]))
    reference = parts[0] + 0.7 * parts[1]
    reference.backward()
    assert torch.allclose(inst, parts[0], atol=1e-6) and torch.allclose(prior, parts[1], atol=1e-6)
    assert torch.allclose(loss, reference, atol=1e-6)
    worst = max(float((grads[n] - p.grad).abs().max()) for n, p in tiny.unet.named_parameters())
    assert worst < 1e-5


@pytest.mark.parametrize("text_encoder", [False, True])
def test_run_trains_the_unet_and_the_text_encoder_only_when_asked(fabric_dir, tmp_path, text_encoder):
    base = build_tiny()
    cfg = full_config(fabric_dir, train_text_encoder=text_encoder, gradient_checkpointing=True)
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny(), cache_root=tmp_path / "cache")
    trainer.run()
    comps = trainer.comps
    assert _changed(_snapshot(base.unet), comps.unet)
    assert not _changed(_snapshot(base.vae), comps.vae)
    text_changed = _changed(_snapshot(base.text_encoder), comps.text_encoder)
    assert bool(text_changed) == text_encoder
    if text_encoder:  # its own learning rate, and checkpointed as the UNet is
        groups = trainer.optimizer.optimizer.param_groups
        assert [g["lr"] for g in groups] == [cfg.learning_rate, cfg.text_encoder_lr]
        assert any(getattr(m, "gradient_checkpointing", False) for m in comps.text_encoder.modules())


def test_bf16_keeps_every_trained_weight_fp32(fabric_dir, tmp_path):
    cfg = full_config(fabric_dir, mixed_precision="bf16", train_text_encoder=False)
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny())
    trainer.set_up()
    trainer.place_on_device()
    trainer.build_caches()
    assert {p.dtype for p in trainer.comps.unet.parameters()} == {torch.float32}  # master weights
    assert {p.dtype for p in trainer.comps.text_encoder.parameters()} == {torch.bfloat16}  # frozen


def test_resume_with_ema_equals_the_uninterrupted_run(fabric_dir, tmp_path):
    cfg = full_config(
        fabric_dir,
        max_train_steps=6,
        use_ema=True,
        ema_decay=0.9,
        train_text_encoder=True,
        random_flip=True,
        gradient_accumulation_steps=2,
        with_prior_preservation=True,
    )

    def make_trainer(run_dir, **kwargs):
        return Trainer(cfg, run_dir, comps=build_tiny(), cache_root=tmp_path / "cache", **kwargs)

    whole, resumed, _ = run_whole_and_resumed(make_trainer, tmp_path, 2)
    got = _trained_state(resumed)
    assert any(k.startswith("ema.text_encoder.") for k in got)
    assert_same_tensors(got, _trained_state(whole))
    # only the newest checkpoint is kept by default
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step_00006"]


def test_ema_averages_the_trajectory_and_is_what_is_exported(fabric_dir, tmp_path):
    p = torch.nn.Parameter(torch.zeros(3))
    ema = ParameterEMA({"w": p}, decay=0.5)
    expected = torch.zeros(3)
    for step in range(1, 5):
        p.data.fill_(float(step))
        ema.update({"w": p})
        decay = min(0.5, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * step
        assert torch.allclose(ema.shadow["w"], expected)

    cfg = full_config(fabric_dir, use_ema=True, ema_decay=0.5, export_precision="fp32", max_train_steps=4)
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny())
    result = trainer.run()
    loaded = load_base_model(result.outputs["checkpoint"])
    shadow = trainer.method.ema.shadow
    raw = dict(trainer.comps.unet.named_parameters())
    for name, value in loaded.unet.named_parameters():
        assert torch.equal(value, shadow[f"unet.{name}"]), name
    assert any(not torch.equal(shadow[f"unet.{n}"], raw[n]) for n in raw)  # the average is not the last weights


def test_export_round_trip_through_our_loader(fabric_dir, tmp_path):
    cfg = full_config(fabric_dir, train_text_encoder=True, export_precision="fp32", output_name="sks_full")
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny())
    result = trainer.run()
    path = result.outputs["checkpoint"]
    assert path.endswith("result/sks_full.safetensors")
    loaded = load_base_model(path)
    assert (family_of(path).name, native_resolution(path), loaded.builtin) == ("SD1.5", 64, "tiny")
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(trainer.comps, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (name, key)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert meta["dreamloom.base_fingerprint"] == build_tiny().fingerprint and meta["dreamloom.token"] == "sks"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["dreamloom.steps"] == "3"
    assert dtypes == {"F32"}
    # the default fp16 export: the same weights, rounded
    half = tmp_path / "half"
    trainer.method.cfg.export_precision = "fp16"
    half.mkdir()
    fp16 = load_base_model(trainer.method.export(trainer.comps, half, 3)["checkpoint"])
    for key, value in trainer.comps.unet.state_dict().items():
        assert torch.equal(fp16.unet.state_dict()[key], value.half().float()), key


def test_tiny_sdxl_full_fine_tune_exports_both_text_encoders(fabric_dir, tmp_path):
    from trainer.base_models.builtin import build_tiny_sdxl

    cfg = full_config(fabric_dir, base_model="tiny-sdxl", train_text_encoder=True, export_precision="fp32")
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny_sdxl())
    result = trainer.run()
    loaded = load_base_model(result.outputs["checkpoint"])
    assert loaded.family.name == "SDXL" and loaded.builtin == "tiny-sdxl"
    base = build_tiny_sdxl()
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert _changed(_snapshot(getattr(base, name)), getattr(loaded, name)), name  # trained and written
        for key, value in getattr(trainer.comps, name).state_dict().items():
            assert torch.equal(getattr(loaded, name).state_dict()[key], value), (name, key)


def test_a_disk_without_room_refuses_the_run_before_it_starts(fabric_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import trainer.training.loop as loop

    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    cfg = full_config(fabric_dir)
    with pytest.raises(DreamLoomError, match="Not enough disk space") as info:
        Trainer(cfg, tmp_path / "run", comps=build_tiny()).run()
    assert "checkpoints_keep" in info.value.hint and not (tmp_path / "run" / "checkpoints").exists()
    # the estimate: fp32 weights + AdamW's two moments per trained weight, 2 checkpoints at once, an fp16 result
    method = FullFineTuneMethod(cfg.validate())
    tiny = build_tiny()
    unet = sum(p.numel() for p in tiny.unet.parameters())
    every = sum(p.numel() for m in tiny.modules().values() for p in m.parameters())
    assert method.disk_estimate(tiny) == {"checkpoint": 12 * unet, "checkpoints": 24 * unet, "result": 2 * every}
    monkeypatch.setattr(loop.shutil, "disk_usage", real)
    Trainer(cfg, tmp_path / "run2", comps=build_tiny()).run()
    assert "disk: this run needs about" in (tmp_path / "run2" / "events.jsonl").read_text()


def test_a_checkpoint_that_does_not_fit_is_refused(fabric_dir):
    def method_on_tiny(**overrides):
        method, comps = FullFineTuneMethod(full_config(fabric_dir, **overrides).validate()), build_tiny()
        method.setup(comps)
        return method, comps

    plain, comps = method_on_tiny()
    state = plain.trainable_state(comps)
    with_ema, other = method_on_tiny(use_ema=True)
    with pytest.raises(DreamLoomError, match="EMA weights do not fit"):
        with_ema.load_trainable_state(other, state)
    with_text, other = method_on_tiny(train_text_encoder=True)
    with pytest.raises(DreamLoomError, match="does not fit this full fine-tune"):
        with_text.load_trainable_state(other, state)


def test_node_publishes_into_checkpoints_without_overwriting(fake_comfy, fabric_dir):
    from conftest import pack_module, pack_node

    (dataset, _) = pack_node("DreamLoomLoadTrainingImages")().load(str(fabric_dir), 64, "center", False, False)
    node = pack_node("DreamLoomTrainFull")
    spec = node.INPUT_TYPES()["required"]
    assert spec["learning_rate"][1]["default"] == 5e-6 and spec["text_encoder_lr"][1]["default"] == 1e-6

    def train(seed):  # positional, in INPUT_TYPES' order: a renamed or moved widget fails here
        return node().train(
            "tiny (built-in test model)",
            "a sks african fabric pattern",
            "sks",
            "a fabric pattern",
            False,  # prior preservation off: the node test is about publishing
            1.0,
            2,
            False,
            1e-6,
            False,
            1e-4,
            2,
            seed,
            0,
            "node_full",
            dataset,
            unique_id="5",
        )["result"]

    folder = fake_comfy.models / "checkpoints"
    (folder / "node_full.safetensors").write_bytes(b"someone else's checkpoint")
    name, loss_plot, _ = train(1)
    assert name == "node_full_v2.safetensors" and loss_plot.ndim == 4  # a new name beside the file that was there
    assert (folder / "node_full.safetensors").read_bytes() == b"someone else's checkpoint"
    assert name in fake_comfy.filename_list("checkpoints")
    # Load Checkpoint (DreamLoom) builds it as the built-in model it was trained from, tagged with its family and size
    runner, checkpoint = pack_module("nodes.runner"), pack_module("nodes.checkpoint")
    model, clip, vae, label = pack_node("DreamLoomLoadCheckpoint")().load(runner.BUILTIN_TINY_FABRIC, ckpt_path=name)
    assert fake_comfy.loaded == ("builtin", str(folder / name)) and label == name
    assert checkpoint.base_of(vae)["family"] == "SD1.5" and checkpoint.base_of(vae)["native_resolution"] == 64


def test_doctor_predicts_the_full_fine_tune_per_option():
    from trainer.lab.doctor import FAMILY_SIZES, GIB, predict_memory

    def peak(**kw):
        settings = dict(method="full", resolution=512, precision="fp16", checkpointing=True)
        settings.update(kw)
        return predict_memory(**settings).peak

    # SD1.5, fp16, gradient checkpointing, 8-bit AdamW, batch 1 + 1 prior: the Colab's ~10 GB on a T4
    assert 9.5 < peak(use_8bit_adam=True) < 11.0
    unet = FAMILY_SIZES["SD1.5"].unet
    assert peak() - peak(use_8bit_adam=True) == pytest.approx(unet * 6 / GIB)  # 8 -> 2 bytes of moments
    assert peak(use_ema=True) - peak() == pytest.approx(unet * 4 / GIB)
    assert peak(checkpointing=False) > peak() and peak(train_text_encoder=True) > peak()
    assert peak(resolution=768) > peak() > peak(resolution=384)
    # a full fine-tune needs several times a LoRA's memory, and SDXL several times SD1.5's
    assert peak() > 3 * predict_memory("lora", 512, precision="fp16", checkpointing=True).peak
    assert peak(family="SDXL", resolution=1024) > 2.5 * peak()
    assert predict_memory("full", 512, precision="fp16").class_images is not None  # prior preservation by default


def test_doctor_report_recommends_8bit_adam_for_a_full_fine_tune(monkeypatch):
    from test_doctor import fake_gpu

    from trainer.lab.doctor import doctor

    fake_gpu(monkeypatch, free_gib=14.0)
    report = " ".join(doctor(method="full", mixed_precision="fp16", gradient_checkpointing="true").split())
    assert "full fine-tune of the UNet, AdamW" in report and "predicted" in report
    assert "does not fit: try use_8bit_adam true (predicted 10.19 GiB)" in report
    fits = " ".join(
        doctor(method="full", mixed_precision="fp16", gradient_checkpointing="true", use_8bit_adam=True).split()
    )
    assert "8-bit AdamW" in fits and "fits with" in fits


@pytest.mark.slow
def test_full_size_sd15_fine_tune_is_one_file_that_loads_back_tensor_by_tensor(sd15_parts, sd15_checkpoint, tmp_path):
    """A fine-tuned full-size SD1.5 (random weights) written in the original layout, fp16: our loader (diffusers'
    single-file path, as for any user's checkpoint) gives back the trained UNet rounded to fp16 and the base
    model's VAE and text encoder (sd15_parts: the base's fp16 weights). About 11 GB of memory at its peak."""
    from helpers.full_finetune import finetune_sd15
    from helpers.random_weights import same_bits
    from trainer.base_models.components import text_model_path
    from trainer.base_models.load import model_fingerprint
    from trainer.files.safetensors_header import read_safetensors_header

    path, tuned = finetune_sd15(sd15_checkpoint, tmp_path)
    header = read_safetensors_header(path)
    meta = header.pop("__metadata__")
    base_header = read_safetensors_header(sd15_checkpoint)
    base_header.pop("__metadata__", None)
    assert set(header) == set(base_header)  # the original layout's keys, none missing and none extra
    assert {v["dtype"] for v in header.values()} == {"F16"} and meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["dreamloom.base_fingerprint"] == model_fingerprint(str(sd15_checkpoint))
    expected = {k: v.half() for k, v in tuned.unet.state_dict().items()}
    del tuned
    loaded = load_base_model(str(path))
    assert loaded.family.name == "SD1.5"
    got = loaded.unet.state_dict()
    assert got.keys() == expected.keys()
    moved = 0
    for key, value in expected.items():
        assert got[key].dtype == torch.float32 and same_bits(got[key].half(), value), key
        moved += not same_bits(value, sd15_parts["unet"][key])
    assert moved == len(expected)  # every UNet tensor was trained and written
    vae = loaded.vae.state_dict()
    assert all(same_bits(vae[k].half(), v) for k, v in sd15_parts["vae"].items())
    text = {text_model_path(k): v for k, v in loaded.text_encoder.state_dict().items()}
    assert all(same_bits(text[text_model_path(k)].half(), v) for k, v in sd15_parts["text"].items() if k in text)
    assert sum(text_model_path(k) in text for k in sd15_parts["text"]) >= len(sd15_parts["text"]) - 1  # position_ids
