"""The GPU proof: SD1.5-size training at 512 px on CUDA. Run `pytest -m cuda` on a machine with an NVIDIA GPU;
elsewhere every test here is skipped with that reason.

The model is a random-weight, full-size SD1.5 written in the original single-file layout and loaded through
the same offline path a user's checkpoint takes. Budgets are peak allocated CUDA memory of the whole run
(latent caching, training, export; no sample grids), for SD1.5 at 512 px, LoRA rank 4, batch 1 + 1 prior.
`tools/gpu_proof.sh` runs these, `doctor` and `bench` in one command.
"""

import os

import numpy as np
import pytest
import torch

from helpers.gpu_runs import GIB, fresh_gpu, run_config, train_with_peak, write_run_images
from trainer.training.precision import gpu_has_bf16

# cuBLAS is deterministic only with a fixed workspace; it must be set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU: run `pytest -m cuda` on one"),
]

BUDGET_GIB = {False: 6.0, True: 4.5}  # training peak without / with gradient checkpointing
CLASS_IMAGES_BUDGET_GIB = 4.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_run_images(tmp_path_factory.mktemp("cuda_data"), 512)


def _config(checkpoint, data, **overrides):
    return run_config(checkpoint, data, 512, **overrides)


def _lora_state(trainer):
    return {k: v.detach().float().cpu().clone() for k, v in trainer.method.trainable_state(trainer.comps).items()}


def _moved_fraction(trainer, prefix: str) -> float:
    ups = [v for k, v in _lora_state(trainer).items() if k.startswith(prefix) and "lora_B" in k]
    return sum(float(v.abs().max()) > 0 for v in ups) / max(len(ups), 1)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_512_trains_within_budget(sd15_checkpoint, data, tmp_path, precision, checkpointing):
    if precision == "bf16" and not gpu_has_bf16():
        pytest.skip("this GPU has no bf16")
    cfg = _config(sd15_checkpoint, data, mixed_precision=precision, gradient_checkpointing=checkpointing)
    trainer, result, peak = train_with_peak(cfg, tmp_path / "run")
    print(f"\n[cuda] LoRA {precision} checkpointing={checkpointing}: peak {peak:.2f} GiB")
    losses = [r["loss"] for r in result.losses]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    # B starts at zero, so a moved up-matrix is a trained module. On random weights some layers' fp16
    # gradients underflow in six steps, so most modules, not all, must have moved.
    moved = _moved_fraction(trainer, "unet.")
    print(f"[cuda] {moved:.0%} of the UNet's LoRA up-matrices moved")
    assert moved >= 0.5
    frozen = [p.dtype for p in trainer.comps.unet.parameters() if not p.requires_grad]
    assert set(frozen) == {torch.float16 if precision == "fp16" else torch.bfloat16}
    casts = [m.cast_input_dtype_enabled for m in trainer.comps.unet.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert casts and not any(casts)  # precision.place_modules: autocast casts the LoRA input itself
    assert peak < BUDGET_GIB[checkpointing], f"peak {peak:.2f} GiB"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_skipping_lora_input_casts_changes_nothing(precision):
    """Under autocast, peft's cast of a LoRA layer's input to fp32 is undone by autocast's cast back for the
    matrix product: skipping it (precision.place_modules on a GPU) gives the same output and LoRA gradients."""
    if precision == "bf16" and not gpu_has_bf16():
        pytest.skip("this GPU has no bf16")
    from trainer.base_models.builtin import build_tiny
    from trainer.config import TrainConfig
    from trainer.training.methods.lora import LoRAMethod
    from trainer.training.precision import WEIGHT_DTYPES, skip_lora_input_casts

    dtype = WEIGHT_DTYPES[precision]
    comps = build_tiny()
    torch.manual_seed(0)
    LoRAMethod(TrainConfig(base_model="tiny", instance_dir="x", rank=4, alpha=4.0)).setup(comps)
    unet = comps.unet
    for name, param in unet.named_parameters():
        param.data = param.data.to("cuda", torch.float32 if param.requires_grad else dtype)
        if "lora_B" in name:  # B starts at zero: give the LoRA path something to carry
            param.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, unet.config.in_channels, 16, 16), generator=g).cuda()
    context = torch.randn((2, 77, unet.config.cross_attention_dim), generator=g).to("cuda", dtype)
    t = torch.tensor([10, 500], device="cuda")
    layers = [m for m in unet.modules() if hasattr(m, "cast_input_dtype_enabled")]

    def run(cast: bool):
        for layer in layers:
            layer.cast_input_dtype_enabled = cast
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype):
            out = unet(x, t, context).sample
        out.float().square().mean().backward()
        return out.detach(), {n: p.grad.float() for n, p in unet.named_parameters() if p.requires_grad}

    out, grads = run(True)
    assert skip_lora_input_casts(unet) == len(layers) > 0
    out_skipped, grads_skipped = run(False)
    assert torch.equal(out, out_skipped)
    for name, grad in grads.items():  # the same sums, perhaps added in another order
        assert float((grad - grads_skipped[name]).norm()) <= 1e-2 * float(grad.norm()) + 1e-6, name


def test_to_device_copies_without_waiting_and_exactly():
    from trainer.inference.gpu_memory import to_device

    cpu = torch.randn((2, 4, 64, 64), generator=torch.Generator().manual_seed(0))
    on_gpu = to_device(cpu[[1, 0]], torch.device("cuda"))
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), cpu[[1, 0]])
    assert to_device(on_gpu, "cuda") is on_gpu
    assert to_device(cpu, "cpu") is cpu


def test_latent_cache_is_kept_in_host_memory_and_steps_get_cuda_rows():
    from trainer.base_models.builtin import build_tiny
    from trainer.data.caches import LatentSource
    from trainer.data.sample_set import fabric_image

    vae = build_tiny().vae.to("cuda")
    images = [fabric_image(i, 64) for i in range(2)]
    with torch.no_grad():  # cuBLAS keeps a workspace from its first call on: taken before the count starts
        vae.encode(torch.zeros((1, 3, 64, 64), device="cuda"))
    held_before = torch.cuda.memory_allocated()
    source = LatentSource(vae, images, 64, True, True, True, torch.device("cuda"), 1)
    assert {t.device.type for mean, std, _ in source.cached.values() for t in (mean, std)} == {"cpu"}
    assert torch.cuda.memory_allocated() == held_before  # nothing of the cache is left on the GPU
    eps = torch.randn((2, 4, 8, 8), device="cuda")
    latents = source.latents([(1, True), (0, False)], eps, [0, 1])
    mean, std, _ = source.cached[(1, (64, 64), True)]
    expected = (mean.cuda() + std.cuda() * eps[0]) * vae.config.scaling_factor
    assert latents.is_cuda and torch.allclose(latents[0], expected)


@pytest.mark.parametrize("home", ["cuda", "cpu"])  # class images and `generate` / a training run's sample grid
def test_frozen_text_encoders_wait_on_the_cpu_while_the_unet_runs(home):
    from trainer.base_models.builtin import build_tiny_sdxl
    from trainer.inference.pipelines import generate, make_pipeline

    comps = build_tiny_sdxl()
    pipe = make_pipeline(comps, "ddim")
    pipe.to("cuda")
    for encoder in comps.text_encoders().values():
        encoder.to(home)
    encoder_devices = []
    comps.unet.register_forward_pre_hook(
        lambda module, args: encoder_devices.append({e.device.type for e in comps.text_encoders().values()})
    )
    on_gpu = generate(pipe, ["a fabric pattern", "a red fabric"], [1, 2], 2, 4.0, 64, negative_prompt="blurry")
    assert encoder_devices and all(devices == {"cpu"} for devices in encoder_devices)
    assert {e.device.type for e in comps.text_encoders().values()} == {home}  # given back where they were
    pipe.to("cpu")
    on_cpu = generate(pipe, ["a fabric pattern", "a red fabric"], [1, 2], 2, 4.0, 64, negative_prompt="blurry")
    for a, b in zip(on_gpu, on_cpu):  # the same pictures as on the CPU, up to kernel rounding (and TF32)
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean() < 3


def test_generate_takes_at_most_2_images_a_call_at_1024_px():
    from trainer.base_models.builtin import build_tiny
    from trainer.inference.pipelines import generate, make_pipeline

    comps = build_tiny()
    pipe = make_pipeline(comps, "ddim")
    pipe.to("cuda")
    rows = []
    comps.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    batches = []
    generate(
        pipe, ["a fabric"] * 3, [1, 2, 3], 1, 4.0, 1024, batch_size=4, on_batch=lambda s, ims: batches.append(len(ims))
    )
    assert batches == [2, 1] and rows == [4, 2]  # with the unconditional rows


def test_resume_equals_uninterrupted_run(sd15_checkpoint, data, tmp_path):
    """Bit-identical only where every kernel is deterministic: the flash and memory-efficient attention backward
    passes are not (warn_only lets them run), so attention runs in the math kernel here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            cfg = _config(sd15_checkpoint, data)
            straight, _, _ = train_with_peak(cfg, tmp_path / "straight")
            reference = _lora_state(straight)
            del straight
            calls = {"n": 0}

            def stop_at_third_step():
                calls["n"] += 1
                return calls["n"] == 3

            from trainer.errors import StopRequested

            with pytest.raises(StopRequested):
                train_with_peak(cfg, tmp_path / "resumed", should_stop=stop_at_third_step)
            resumed, result, _ = train_with_peak(cfg, tmp_path / "resumed")
            assert result.resumed_from == 3
            state = _lora_state(resumed)
            assert state.keys() == reference.keys()
            worst = max(float((state[k] - reference[k]).abs().max()) for k in reference)
            assert worst == 0.0, f"largest difference {worst}"
    finally:
        torch.use_deterministic_algorithms(False)


def test_text_encoder_lora_trains(sd15_checkpoint, data, tmp_path):
    cfg = _config(sd15_checkpoint, data, train_text_encoder=True)
    trainer, result, peak = train_with_peak(cfg, tmp_path / "run")
    print(f"\n[cuda] LoRA + text encoder fp16 checkpointing: peak {peak:.2f} GiB")
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in result.losses])))
    moved = _moved_fraction(trainer, "text_encoder.")
    print(f"[cuda] {moved:.0%} of the text encoder's LoRA up-matrices moved")
    assert moved >= 0.5
    assert peak < BUDGET_GIB[True], f"peak {peak:.2f} GiB"


def test_textual_inversion_trains(sd15_checkpoint, data, tmp_path):
    cfg = _config(sd15_checkpoint, data, method="ti", learning_rate=5e-3, with_prior_preservation=False)
    trainer, result, peak = train_with_peak(cfg, tmp_path / "run")
    print(f"\n[cuda] TI fp16 checkpointing: peak {peak:.2f} GiB")
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in result.losses])))
    rows = trainer.method.new_rows(trainer.comps)["text_encoder"].detach().float()
    base = trainer.comps.text_encoder.get_input_embeddings().base.weight
    init = base[trainer.comps.tokenizer.convert_tokens_to_ids("pattern</w>")].float()
    assert float((rows[0] - init).abs().max()) > 0
    assert peak < BUDGET_GIB[True], f"peak {peak:.2f} GiB"


def test_torch_compile_trains(sd15_checkpoint, data, tmp_path):
    precision = "bf16" if gpu_has_bf16() else "fp16"
    cfg = _config(sd15_checkpoint, data, mixed_precision=precision, torch_compile=True)
    trainer, result, peak = train_with_peak(cfg, tmp_path / "run")
    print(f"\n[cuda] LoRA {precision} torch.compile: peak {peak:.2f} GiB")
    assert type(trainer.wrapped["unet"]).__name__ in ("OptimizedModule", "DistributedDataParallel")
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in result.losses])))
    assert _moved_fraction(trainer, "unet.") >= 0.5


@pytest.mark.parametrize("checkpointing", [False, True])
def test_cudnn_benchmark_trains_and_hands_back_what_its_search_took(sd15_checkpoint, data, tmp_path, checkpointing):
    """cudnn_benchmark: the same training, and once the first step at the run's one latent shape is done, what
    cuDNN's algorithm search took is handed back, so the run holds no more than the budget (its momentary peak,
    which depends on the free memory cuDNN finds, is printed for the note)."""
    before = torch.backends.cudnn.benchmark
    cfg = _config(sd15_checkpoint, data, cudnn_benchmark=True, gradient_checkpointing=checkpointing)
    trainer, result, peak = train_with_peak(cfg, tmp_path / "run")
    held = torch.cuda.memory_reserved() / GIB
    print(
        f"\n[cuda] LoRA fp16 checkpointing={checkpointing} cudnn.benchmark: peak {peak:.2f} GiB, held after {held:.2f}"
    )
    assert trainer.settings["cudnn_benchmark"] == "on (set)" and trainer.cudnn_benchmark.shapes_seen == {(2, 4, 64, 64)}
    assert torch.backends.cudnn.benchmark == before  # put back at the end of the run
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in result.losses])))
    assert _moved_fraction(trainer, "unet.") >= 0.5
    assert held < BUDGET_GIB[checkpointing], f"held {held:.2f} GiB"


def test_class_images_within_budget(sd15_checkpoint, tmp_path):
    from trainer.base_models.load import load_base_model
    from trainer.data.class_images import ClassImageSpec, generate_class_images

    comps = load_base_model(str(sd15_checkpoint))
    spec = ClassImageSpec(comps.fingerprint, "a fabric pattern", "", "dpmpp_2m", 2, 7.5, 512, 0)
    fresh_gpu()
    # fp16, as a fp16 training run makes them (data/class_images.py:prepare_class_images)
    paths = generate_class_images(
        comps, spec, 4, tmp_path / "class", batch_size=4, device=torch.device("cuda"), dtype=torch.float16
    )
    peak = torch.cuda.max_memory_allocated() / GIB
    print(f"\n[cuda] class images 4 x 512 px, batch 4, fp16: peak {peak:.2f} GiB")
    assert {p.dtype for p in comps.unet.parameters()} == {torch.float32}  # handed back as it was loaded
    assert len(paths) == 4 and all(p.exists() for p in paths)
    assert peak < CLASS_IMAGES_BUDGET_GIB, f"peak {peak:.2f} GiB"


def test_class_image_job_in_half_precision_within_budget(sd15_checkpoint, tmp_path):
    """The Generate Class Images node's job as the worker runs it for a ComfyUI user: the model loaded and run in
    the inference dtype (bf16 where the GPU has it, else fp16), within the class-image budget."""
    from trainer.events import Events
    from trainer.jobs.worker import _run
    from trainer.stop_signals import GracefulStop

    spec = dict(prompt="a fabric pattern", negative_prompt="", sampler="dpmpp_2m", steps=2, guidance=7.5)
    job = {"kind": "class_images", "base_model": str(sd15_checkpoint), "count": 4, "folder": str(tmp_path / "class"),
           "batch_size": 4, "spec": {**spec, "resolution": 512, "seed": 0}}  # fmt: skip
    fresh_gpu()
    outputs = _run(job, tmp_path, Events(tmp_path), GracefulStop())  # not entered: no signal handlers
    peak = torch.cuda.max_memory_allocated() / GIB
    print(f"\n[cuda] class-image job 4 x 512 px, batch 4: peak {peak:.2f} GiB")
    assert len(outputs["images"]) == 4
    assert peak < CLASS_IMAGES_BUDGET_GIB, f"peak {peak:.2f} GiB"


def test_defaults_without_settings_node(sd15_checkpoint, data, tmp_path):
    """What a ComfyUI user gets when no Training Settings node is connected: the config's defaults."""
    cfg = _config(sd15_checkpoint, data, mixed_precision="auto", gradient_checkpointing=None, max_train_steps=2)
    trainer, result, peak = train_with_peak(cfg, tmp_path / "run")
    settings = trainer.settings
    print(f"\n[cuda] auto settings: {settings}; peak {peak:.2f} GiB")
    expected = "bf16" if gpu_has_bf16() else "fp16"
    assert settings["mixed_precision"].startswith(expected)
    assert settings["tf32"] == ("on" if torch.cuda.get_device_capability()[0] >= 8 else "off")
    assert torch.backends.cuda.matmul.allow_tf32 == (settings["tf32"] == "on")
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in result.losses])))
    assert peak < BUDGET_GIB[settings["gradient_checkpointing"].startswith("on")], f"peak {peak:.2f} GiB"
    if torch.cuda.mem_get_info()[0] > 6 * 2**30:  # SD1.5 at 512 px fits: no phase is warned about
        assert "GPU memory:" not in (tmp_path / "run" / "events.jsonl").read_text()


def test_8bit_adam_trains(sd15_checkpoint, data, tmp_path):
    pytest.importorskip("bitsandbytes", reason="8-bit AdamW needs bitsandbytes (pip install bitsandbytes)")
    cfg = _config(sd15_checkpoint, data, use_8bit_adam=True)
    trainer, result, peak = train_with_peak(cfg, tmp_path / "run")
    print(f"\n[cuda] LoRA fp16 checkpointing 8-bit AdamW: peak {peak:.2f} GiB")
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert type(inner).__module__.startswith("bitsandbytes"), type(inner)
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in result.losses])))
    assert _moved_fraction(trainer, "unet.") >= 0.5
    assert peak < BUDGET_GIB[True], f"peak {peak:.2f} GiB"
