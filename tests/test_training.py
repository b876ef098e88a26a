import json

import pytest
import torch
from conftest import assert_loss_falls, assert_same_tensors, run_whole_and_resumed, tiny_config

from trainer.data.batches import stream_indices
from trainer.errors import DreamLoomError
from trainer.training.loop import Trainer
from trainer.training.loss import diffusion_loss
from trainer.training.methods.lora import LoRAMethod


def _random_batch(comps, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((n, 4, 8, 8), generator=g)
    noise = torch.randn((n, 4, 8, 8), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    enc = torch.randn((n, 77, comps.unet.config.cross_attention_dim), generator=g)
    return latents, noise, t, enc


def test_prior_preservation_concat_equals_two_pass_reference(tiny):
    import torch.nn.functional as F

    sched = tiny.noise_scheduler()
    lat, noise, t, enc = _random_batch(tiny, 4)
    with torch.no_grad():
        loss, inst, prior = diffusion_loss(tiny.unet, sched, lat, noise, t, enc, n_instance=2, prior_weight=0.7)
        # Reference: two separate UNet passes, like the tutorial's script, on the same tensors.
        ref_parts = []
        for rows in (slice(0, 2), slice(2, 4)):
            noisy = sched.add_noise(lat[rows], noise[rows], t[rows])
            pred = tiny.unet(noisy, t[rows], enc[rows]).sample
            ref_parts.append(F.mse_loss(pred, noise[rows]))
    assert torch.allclose(inst, ref_parts[0], atol=1e-6)
    assert torch.allclose(prior, ref_parts[1], atol=1e-6)
    assert torch.allclose(loss, ref_parts[0] + 0.7 * ref_parts[1], atol=1e-6)


def test_min_snr_weighting_changes_loss_but_not_at_gamma_infinity(tiny):
    sched = tiny.noise_scheduler()
    lat, noise, _, enc = _random_batch(tiny, 2)
    t = torch.tensor([10, 900])  # high SNR at t=10, so gamma=5 must clip it
    with torch.no_grad():
        plain = diffusion_loss(tiny.unet, sched, lat, noise, t, enc, 2)[0]
        huge = diffusion_loss(tiny.unet, sched, lat, noise, t, enc, 2, snr_gamma=1e9)[0]
        five = diffusion_loss(tiny.unet, sched, lat, noise, t, enc, 2, snr_gamma=5.0)[0]
    assert torch.allclose(plain, huge, rtol=1e-5)
    assert not torch.allclose(plain, five)


def test_loss_falls_on_a_fixed_batch_and_only_lora_changes(tiny, fabric_dir):
    cfg = tiny_config(fabric_dir, rank=8, alpha=8)
    method = LoRAMethod(cfg)
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    method.setup(tiny)
    tiny.unet.train()
    lora_before = {k: v.clone() for k, v in tiny.unet.state_dict().items() if "lora_" in k}
    params = [p for p in tiny.unet.parameters() if p.requires_grad]
    assert params and all(n.count("lora_") for n, p in tiny.unet.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=3e-3)
    sched = tiny.noise_scheduler()
    assert_loss_falls(tiny.unet, sched, _random_batch(tiny, 4, seed=3), opt, 50)
    after = tiny.unet.state_dict()
    changed = {k for k in lora_before if not torch.equal(after[k], lora_before[k])}
    for key, value in before.items():
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        current = after.get(key, after.get(peft_key))
        assert torch.equal(current, value), f"frozen weight {key} changed"
    assert changed == set(lora_before)  # every LoRA tensor moved


def test_stream_indices_cover_each_epoch_once():
    picks = stream_indices(7, 10, 0, 30)
    for epoch in range(3):
        assert sorted(i for i, _ in picks[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert stream_indices(7, 10, 5, 3) == picks[5:8]
    assert stream_indices(8, 10, 0, 10) != picks[:10]


def _lora(result_trainer):
    return {k: v.clone() for k, v in result_trainer.method.trainable_state(result_trainer.comps).items()}


def test_trainer_writes_outputs_and_freezes_base(tiny, fabric_dir, tmp_path):
    from trainer.base_models.builtin import build_tiny

    base = build_tiny()
    cfg = tiny_config(fabric_dir, max_train_steps=6, sample_every=3, checkpoint_every=3)
    trainer = Trainer(cfg, tmp_path / "run", comps=tiny, cache_root=tmp_path / "cache")
    result = trainer.run()
    run = tmp_path / "run"
    for name in (
        "job.json",
        "loss.csv",
        "loss.png",
        "events.jsonl",
        "result/sks_fabric.safetensors",
        "result/pytorch_lora_weights.safetensors",
        "samples/step_00000.png",
        "samples/step_00003.png",
        "samples/step_00006.png",
    ):
        assert (run / name).exists(), name
    assert [r["step"] for r in result.losses] == list(range(1, 7))
    assert all("prior_loss" in r for r in result.losses)
    # VAE and text encoder untouched; UNet base weights untouched.
    for a, b in ((tiny.vae, base.vae), (tiny.text_encoder, base.text_encoder)):
        for (ka, va), (_, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
            assert torch.equal(va, vb), ka
    base_sd = base.unet.state_dict()
    for k, v in tiny.unet.state_dict().items():
        if "lora_" in k:
            continue
        assert torch.equal(v, base_sd[k.replace(".base_layer", "")]), k
    events = (run / "events.jsonl").read_text().splitlines()
    assert '"event": "done"' in events[-1]
    samples = [json.loads(e) for e in events if '"event": "sample"' in e]
    assert [e["step"] for e in samples] == [0, 3, 6] and all(e["seconds"] >= 0 for e in samples)  # cost in the log


def test_sample_every_0_makes_no_samples_at_all(tiny, fabric_dir, tmp_path):
    cfg = tiny_config(fabric_dir, max_train_steps=2, sample_every=0, with_prior_preservation=False)
    Trainer(cfg, tmp_path / "run", comps=tiny, cache_root=tmp_path / "cache").run()
    assert not list((tmp_path / "run").glob("samples/*.png"))
    assert '"event": "sample"' not in (tmp_path / "run" / "events.jsonl").read_text()


def test_resume_matches_uninterrupted_run(fabric_dir, tmp_path):
    from trainer.base_models.builtin import build_tiny

    cfg = tiny_config(
        fabric_dir, max_train_steps=8, checkpoint_every=0, random_flip=True, gradient_accumulation_steps=2
    )

    def make_trainer(run_dir, **kwargs):
        return Trainer(cfg, run_dir, comps=build_tiny(), cache_root=tmp_path / "cache", **kwargs)

    whole, resumed, result = run_whole_and_resumed(make_trainer, tmp_path, 3)
    assert_same_tensors(_lora(resumed), _lora(whole))
    assert [r["step"] for r in result.losses] == list(range(1, 9))


def test_checkpoint_of_another_run_is_refused(fabric_dir, tmp_path):
    from trainer.base_models.builtin import build_tiny

    cfg = tiny_config(fabric_dir, max_train_steps=2, with_prior_preservation=False)
    Trainer(cfg, tmp_path / "run", comps=build_tiny()).run()
    other = tiny_config(fabric_dir, max_train_steps=2, with_prior_preservation=False, rank=8, alpha=8)
    with pytest.raises(DreamLoomError, match="different run"):
        Trainer(other, tmp_path / "run", comps=build_tiny()).run()


def test_nan_loss_stops_with_a_clear_error(fabric_dir, tmp_path, monkeypatch):
    import trainer.training.loop as train_mod
    from trainer.base_models.builtin import build_tiny

    real = train_mod.diffusion_loss

    def poisoned(*args, **kwargs):
        loss, inst, prior = real(*args, **kwargs)
        return loss * float("nan"), inst, prior

    monkeypatch.setattr(train_mod, "diffusion_loss", poisoned)
    cfg = tiny_config(fabric_dir, max_train_steps=3, with_prior_preservation=False)
    with pytest.raises(DreamLoomError, match="loss became nan at step 1") as info:
        Trainer(cfg, tmp_path / "run", comps=build_tiny()).run()
    assert "learning_rate" in info.value.hint
    assert not (tmp_path / "run" / "result").exists()


@pytest.mark.slow
def test_torch_compile_option_trains_and_exports(fabric_dir, tmp_path):
    from safetensors.torch import load_file

    from trainer.base_models.builtin import build_tiny

    cfg = tiny_config(fabric_dir, max_train_steps=3, with_prior_preservation=False, torch_compile=True)
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny())
    result = trainer.run()
    assert type(trainer.wrapped["unet"]).__name__ == "OptimizedModule"  # compiled for the steps
    assert type(trainer.comps.unet).__name__ == "UNet2DConditionModel"  # samples and export use the plain module
    saved = load_file(result.outputs["lora"])
    state = trainer.method.trainable_state(trainer.comps)
    down = next(k for k in saved if k.endswith("lora_down.weight"))
    assert len(state) == 2 * sum(k.endswith(".alpha") for k in saved) and all(
        torch.isfinite(v).all() for v in state.values()
    )
    assert saved[down].abs().sum() > 0


def test_mixed_precision_keeps_trainable_initial_values_exact(fabric_dir, tmp_path):
    """Frozen weights go to the training dtype; LoRA weights stay the exact fp32 values they were created
    with (a whole-module cast and back, as diffusers' cast_training_params pairs with, would round them).
    bf16 here; tests/test_cuda.py checks fp16's frozen dtype on a GPU."""
    from trainer.base_models.builtin import build_tiny

    reference = Trainer(tiny_config(fabric_dir, with_prior_preservation=False), tmp_path / "fp32", comps=build_tiny())
    reference.set_up()
    expected = {n: p.detach().clone() for n, p in reference.comps.unet.named_parameters() if p.requires_grad}
    cfg = tiny_config(fabric_dir, with_prior_preservation=False, mixed_precision="bf16")
    mixed = Trainer(cfg, tmp_path / "bf16", comps=build_tiny())
    mixed.set_up()
    mixed.place_on_device()
    assert {p.dtype for p in mixed.comps.text_encoder.parameters()} == {torch.bfloat16}
    mixed.build_caches()  # the UNet is placed once the latents are cached
    params = dict(mixed.comps.unet.named_parameters())
    assert expected and all(params[n].dtype == torch.float32 and torch.equal(params[n], v) for n, v in expected.items())
    assert {p.dtype for p in mixed.comps.unet.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_accumulation_syncs_through_the_wrapped_modules(fabric_dir, tmp_path, monkeypatch):
    """accelerate skips the gradient all-reduce of micro-batches only for the (DDP-)wrapped modules it
    prepared; handing it the plain modules made every micro-batch synchronise."""
    from accelerate import Accelerator

    from trainer.base_models.builtin import build_tiny

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    real_prepare, real_accumulate, seen = Accelerator.prepare, Accelerator.accumulate, []

    def prepare(self, *objects):
        return tuple(Wrapper(o) if isinstance(o, torch.nn.Module) else o for o in real_prepare(self, *objects))

    def accumulate(self, *models):
        seen.append(models)
        return real_accumulate(self, *models)

    monkeypatch.setattr(Accelerator, "prepare", prepare)
    monkeypatch.setattr(Accelerator, "accumulate", accumulate)
    cfg = tiny_config(fabric_dir, with_prior_preservation=False, max_train_steps=2, gradient_accumulation_steps=2)
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny())
    trainer.run()
    assert len(seen) == 4 and all(len(models) == 1 and isinstance(models[0], Wrapper) for models in seen)
    assert seen[0][0] is trainer.wrapped["unet"] and seen[0][0].module is trainer.comps.unet


def test_trained_modules_are_in_train_mode_with_checkpointing(fabric_dir, tmp_path):
    """transformers checkpoints a text encoder only in train mode; CLIP has no dropout, so outputs are equal."""
    from trainer.base_models.builtin import build_tiny

    cfg = tiny_config(fabric_dir, with_prior_preservation=False, train_text_encoder=True, gradient_checkpointing=True)
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny())
    trainer.set_up()
    te = trainer.comps.text_encoder
    assert te.training and trainer.comps.unet.training
    assert any(getattr(m, "gradient_checkpointing", False) for m in te.modules())
    ids = trainer.comps.family.tokenize(trainer.comps.tokenizer, ["a sks african fabric pattern"])
    with torch.no_grad():
        in_train_mode = te(ids)[0]
        te.eval()
        assert torch.equal(te(ids)[0], in_train_mode)


def test_lora_setup_does_not_need_the_models_own_add_adapter(fabric_dir, tmp_path, monkeypatch):
    """transformers 5.24 refuses its add_adapter with any peft older than 0.22 (none was out yet): pip paired them on
    a fresh install and every text-encoder LoRA stopped at set-up. peft injects the adapters itself."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from trainer.base_models.builtin import build_tiny

    def refuse(self, *args, **kwargs):
        raise ValueError("The version of PEFT you are using is not compatible, please use a version >= 0.22.0")

    monkeypatch.setattr(CLIPTextModel, "add_adapter", refuse)
    monkeypatch.setattr(UNet2DConditionModel, "add_adapter", refuse)
    cfg = tiny_config(fabric_dir, with_prior_preservation=False, train_text_encoder=True, max_train_steps=2)
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny())
    trainer.set_up()
    for module in (trainer.comps.unet, trainer.comps.text_encoder):
        trainable = [name for name, p in module.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in name for name in trainable)
        assert module.peft_config["default"].r == cfg.rank  # what saving and resuming read


def test_the_lr_schedule_waits_on_steps_the_grad_scaler_skipped(fabric_dir, tmp_path, monkeypatch):
    """In fp16 the GradScaler skips a step whose gradients overflow (the first few, while it finds its scale); the
    LR schedule must not advance over steps that changed nothing (accelerate's own scheduler wrapper waits too), nor
    the method's hook (a full fine-tune's EMA would average an unchanged model in as a step)."""
    from accelerate.optimizer import AcceleratedOptimizer

    from trainer.base_models.builtin import build_tiny
    from trainer.training.methods import METHODS

    skipped_at = {2, 3}
    steps = iter(range(1, 100))
    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(lambda self: next(steps) in skipped_at))
    cfg = tiny_config(fabric_dir, with_prior_preservation=False, max_train_steps=5, lr_scheduler="linear")
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny())
    hooked = []
    lora_method = METHODS[cfg.method]
    monkeypatch.setattr(
        lora_method, "after_optimizer_step", lambda self, comps: hooked.append(trainer.lr_scheduler.last_epoch)
    )
    trainer.run()
    assert trainer.lr_scheduler.last_epoch == 3  # 5 steps, 2 skipped
    assert hooked == [1, 2, 3]  # after steps 1, 4 and 5, each once the schedule has moved
    lr_by_step = [row["lr"] for row in trainer.loss_log.rows]
    linear = [cfg.learning_rate * (5 - done) / 5 for done in (0, 1, 1, 1, 2)]  # held over steps 2 and 3
    assert lr_by_step == pytest.approx(linear)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_finite_at_zero_terminal_snr(prediction):
    from diffusers import DDPMScheduler

    from trainer.base_models.sd15 import sd15_scheduler_config
    from trainer.training.loss import min_snr_weights

    config = {**sd15_scheduler_config(), "rescale_betas_zero_snr": True, "prediction_type": prediction}
    scheduler = DDPMScheduler.from_config(config)
    t = torch.tensor([0, 500, 999])
    weights = min_snr_weights(scheduler, t, 5.0)
    assert torch.isfinite(weights).all()
    assert float(weights[-1]) == (1.0 if prediction == "epsilon" else 0.0)  # SNR 0: the weights' limits


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_noisy_input_is_made_in_fp32_for_bf16_training(prediction):
    """diffusers' add_noise works in its inputs' dtype: in bf16, sqrt(1 - alphas_cumprod) rounds to 0 at timesteps 0
    and 1 (the UNet got a clean latent and was asked for the noise) and is off by over 5% at a dozen more."""
    from diffusers import DDPMScheduler

    from trainer.base_models.sd15 import sd15_scheduler_config
    from trainer.training.loss import noisy_latents_and_target

    scheduler = DDPMScheduler.from_config({**sd15_scheduler_config(), "prediction_type": prediction})
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn((40, 4, 8, 8), generator=g), torch.randn((40, 4, 8, 8), generator=g)
    t = torch.arange(40)
    noisy, target = noisy_latents_and_target(scheduler, latents.bfloat16(), noise.bfloat16(), t)
    assert noisy.dtype == torch.bfloat16 and target.dtype == torch.float32
    exact = scheduler.add_noise(latents.bfloat16().double(), noise.bfloat16().double(), t)
    added = (noisy.double() - latents.bfloat16().double()).flatten(1).norm(dim=1)
    wanted = (exact - latents.bfloat16().double()).flatten(1).norm(dim=1)
    assert ((added / wanted - 1).abs() < 0.05).all()  # within bf16's rounding of the sum at every timestep
    if prediction == "v_prediction":
        velocity = scheduler.get_velocity(latents.bfloat16().double(), noise.bfloat16().double(), t)
        torch.testing.assert_close(target.double(), velocity, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(target, noise.bfloat16().float())


def test_prediction_type_setting_trains_a_v_prediction_model(fabric_dir, tmp_path):
    from trainer.base_models.builtin import build_tiny

    runs = {}
    for prediction in ("auto", "v_prediction"):
        cfg = tiny_config(fabric_dir, with_prior_preservation=False, max_train_steps=2, prediction_type=prediction)
        trainer = Trainer(cfg, tmp_path / prediction, comps=build_tiny())
        result = trainer.run()
        runs[prediction] = (trainer.noise_scheduler.config.prediction_type, [r["loss"] for r in result.losses])
    assert runs["auto"][0] == "epsilon" and runs["v_prediction"][0] == "v_prediction"
    assert all(torch.isfinite(torch.tensor(runs["v_prediction"][1])))
    assert runs["auto"][1] != runs["v_prediction"][1]  # another target: the velocity, not the noise


def test_cudnn_benchmark_is_cuda_only_searches_once_per_shape_and_is_put_back(monkeypatch):
    from trainer.training.precision import CudnnBenchmark

    before = torch.backends.cudnn.benchmark
    asked_on_cpu = CudnnBenchmark(True, "cpu")
    assert not asked_on_cpu.on and "only on CUDA" in asked_on_cpu.why and torch.backends.cudnn.benchmark == before
    assert CudnnBenchmark(False, "cpu").why == "default"
    released = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(1))  # counted, not run
    on = CudnnBenchmark(True, "cuda")  # the device's type is all it reads
    try:
        assert on.on and torch.backends.cudnn.benchmark
        for shape in [(2, 4, 64, 64), (2, 4, 64, 64), (2, 4, 48, 80), (2, 4, 64, 64), (2, 4, 48, 80)]:
            on.after_step(shape)
        assert len(released) == 2  # after the first step at each new shape, when the search ran
    finally:
        on.restore()
    assert torch.backends.cudnn.benchmark == before


@pytest.mark.parametrize("targets, missing", [(["to_q", "to_kk"], "'to_kk' names"), (["foo"], "'foo' names")])
def test_lora_targets_that_name_no_layer_are_refused(tiny, targets, missing):
    """A typo in lora_targets trained fewer layers without a word (or, when nothing matched, ended in peft's
    traceback); now it is refused, naming it and the UNet's layer names."""
    from trainer.config import TrainConfig

    cfg = TrainConfig(base_model="tiny", instance_dir="x", lora_targets=targets)
    with pytest.raises(DreamLoomError) as refused:
        LoRAMethod(cfg).setup(tiny)
    assert missing in refused.value.message and "to_out.0" in refused.value.hint and "net.2" in refused.value.hint
    assert not any("lora_" in name for name, _ in tiny.unet.named_parameters())  # refused before any adapter


def test_a_bitsandbytes_that_fails_to_start_is_a_clear_error(monkeypatch):
    """Old or mismatched bitsandbytes builds (Windows especially) fail with their own errors, not ImportError."""
    import sys
    import types

    from trainer.config import TrainConfig
    from trainer.training.precision import make_optimizer

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA Setup failed despite GPU being available")

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=broken)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(DreamLoomError, match="bitsandbytes does not work here .RuntimeError: CUDA Setup failed") as err:
        make_optimizer(TrainConfig(use_8bit_adam=True), [{"params": params}])
    assert "turn use_8bit_adam off" in err.value.hint


@pytest.mark.parametrize("class_dir", [None, "given"])
def test_a_gpu_run_warns_before_it_starts_of_phases_predicted_not_to_fit(monkeypatch, tmp_path, class_dir):
    """SDXL at 1024 px on an 8 GB card (7.5 GiB free): the set-up's log warns of the sample grids and, unless a class
    folder is given, of making the class images. A CPU stands in for the GPU's side: the device and its free memory
    are what an 8 GB card reports."""
    from types import SimpleNamespace

    from trainer.events import Events
    from trainer.training import loop

    cfg = tiny_config(tmp_path, resolution=1024, mixed_precision="bf16", sample_every=100)
    trainer = Trainer(cfg, tmp_path / "run", class_dir=tmp_path / class_dir if class_dir else None)
    trainer.acc = SimpleNamespace(device=torch.device("cuda"), is_main_process=True)
    trainer.comps = SimpleNamespace(kind="file", family=SimpleNamespace(name="SDXL"))
    (tmp_path / "run").mkdir(exist_ok=True)
    trainer.events = Events(tmp_path / "run")
    monkeypatch.setattr(loop, "free_cuda_bytes", lambda device: int(7.5 * 2**30))
    trainer._warn_phases_that_may_not_fit("bf16", checkpointing=True)
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    warnings = [e["message"] for e in events if e.get("level") == "warning"]
    assert any(w.startswith("GPU memory: the sample grids need about 7.8 GiB") for w in warnings), warnings
    assert any("making class images" in w for w in warnings) == (class_dir is None)
    assert not any("training steps" in w for w in warnings)  # with checkpointing the steps fit
