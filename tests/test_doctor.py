"""`python -m trainer doctor`: the report, the memory model against the measured H100 peaks, the loader's errors,
and that it reads no weights."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import trainer
from trainer.errors import DreamLoomError
from trainer.lab import doctor as doctor_mod
from trainer.lab.doctor import doctor, predict_memory, predict_ram

ROOT = Path(__file__).resolve().parents[1]

SD15_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
    "first_stage_model.encoder.conv_in.weight": [128, 3, 3, 3],
}
SDXL_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
    "conditioner.embedders.1.model.ln_final.weight": [1280],
}


def header_only_checkpoint(path: Path, keys: dict) -> Path:
    """A safetensors file whose header names full-size tensors but holds none of their data: reading the header
    works, loading the weights would fail."""
    header = {k: {"dtype": "F16", "shape": shape, "data_offsets": [0, 0]} for k, shape in keys.items()}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if hasattr(torch.backends, "mps"):
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_report_names_versions_and_cpu(cpu_only):
    report = doctor()
    for name in ("Python", "torch", "diffusers", "peft", "accelerate", "transformers", "safetensors", "bitsandbytes"):
        assert f"\n  {name} " in report, name
    for dist in ("diffusers", "peft", "accelerate", "transformers", "safetensors"):
        assert metadata.version(dist) in report, dist
    assert torch.__version__ in report
    assert f"DreamLoom     {trainer.__version__}" in report
    assert "CPU: " in report and " cores, " in report and "GiB RAM" in report
    assert "mixed_precision         no (auto: fp32 on the CPU)" in report
    assert "gradient_checkpointing  off" in report and "TF32                    off" in report
    assert "(predicted, +-25%, on a GPU" in report
    assert "fp16       on " in report and "bf16       off" in report and "fp32 (no)" in report
    assert "about" in report and "in RAM" in report  # the CPU note
    assert "mixed_precision fp16 or bf16" in report  # the hint
    # an SD1.5 checkpoint is fp16, so fp32 training on the CPU keeps its frozen convs so: 1.1 GiB less
    assert "half_frozen_convs       on (auto: on for fp32 training on the CPU)" in report
    assert "fp32 (frozen convs in fp16)" in " ".join(report.split())
    full = doctor(method="full")
    assert "half_frozen_convs       off (a full fine-tune trains the convs)" in full
    ram = {half: predict_ram("lora", 512, 1, False, "no", False, half_convs=half) for half in (False, True)}
    assert ram[False] - ram[True] == pytest.approx(589.0e6 * 2 / 2**30)


def test_half_frozen_convs_is_off_for_a_fp32_checkpoint_and_on_a_gpu(cpu_only, monkeypatch):
    assert "half_frozen_convs       off (the checkpoint stores fp32 weights)" in doctor(base_model="tiny-fabric")
    fake_gpu(monkeypatch, free_gib=40.0)
    assert "half_frozen_convs       off (frozen weights are bf16 already)" in doctor(
        mixed_precision="bf16", gradient_checkpointing="false"
    )
    assert "half_frozen_convs       off (auto: off on a GPU" in doctor(
        mixed_precision="no", gradient_checkpointing="false"
    )


def test_builtin_model_needs_well_under_a_gigabyte(cpu_only):
    report = doctor(base_model="tiny-fabric")
    assert "128 px" in report and "well under 1 GB" in report
    assert "Peak GPU memory" not in report


# The runs tests/test_cuda.py measured on an H100 (torch 2.11), SD1.5 at 512 px, LoRA rank 4, batch 1 + 1 prior.
MEASURED = [
    (dict(method="lora", precision="fp16", checkpointing=False), 3.87),
    (dict(method="lora", precision="fp16", checkpointing=True), 3.11),
    (dict(method="lora", precision="bf16", checkpointing=False), 3.87),
    (dict(method="lora", precision="bf16", checkpointing=True), 2.95),
    (dict(method="lora", precision="fp16", checkpointing=True, train_text_encoder=True), 3.11),
    (dict(method="ti", precision="fp16", checkpointing=True), 3.10),
]


@pytest.mark.parametrize("settings,measured", MEASURED)
def test_prediction_reproduces_measured_runs(settings, measured):
    # The measured runs had their class images already, so their peak is training or sampling; their text encoders
    # stayed on the GPU while the UNet sampled.
    prior = settings["method"] == "lora"
    pred = predict_memory(resolution=512, batch_size=1, prior=prior, text_encoders_leave=False, **settings)
    peak = max(pred.training, pred.samples)
    assert abs(peak - measured) / measured < 0.10, (settings, peak, measured)


def test_prediction_reproduces_class_images():
    pred = predict_memory(method="lora", resolution=512, precision="fp16", text_encoders_leave=False)
    assert abs(pred.class_images - 2.67) / 2.67 < 0.10
    assert predict_memory(method="ti").class_images is None


@pytest.mark.parametrize("precision", ["fp16", "bf16", "no"])
@pytest.mark.parametrize("method", ["lora", "ti"])
def test_prediction_grows_and_shrinks_the_right_way(precision, method):
    def predict(**kw):
        settings = dict(method=method, resolution=512, batch_size=1, precision=precision, checkpointing=False)
        settings.update(kw)
        return predict_memory(**settings)

    def peak(**kw):
        return predict(**kw).peak

    assert peak(resolution=384) < peak(resolution=512) < peak(resolution=768) < peak(resolution=1024)
    assert peak(batch_size=1) < peak(batch_size=2) < peak(batch_size=4)
    for res in (512, 768):
        for batch in (1, 2):
            on, off = (
                predict(checkpointing=True, resolution=res, batch_size=batch),
                predict(resolution=res, batch_size=batch),
            )
            assert on.training < off.training
            # The peak can be the sample grid, which checkpointing does not touch (TI, 1 row, 512 px).
            assert on.peak < off.peak or on.peak == off.peak == on.samples
    assert predict(checkpointing=True, batch_size=2).peak < predict(batch_size=2).peak
    if precision != "no":
        for ckpt in (False, True):
            assert peak(checkpointing=ckpt) < peak(checkpointing=ckpt, precision="no")


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04\x95not really a pickle")
    with pytest.raises(DreamLoomError, match="pickle-based checkpoint") as err:
        doctor(base_model=str(path))
    assert ".safetensors" in err.value.hint


def test_missing_model_is_refused(tmp_path):
    with pytest.raises(DreamLoomError, match="Base model not found: .*nothing.safetensors"):
        doctor(base_model=str(tmp_path / "nothing.safetensors"))


def test_other_family_is_refused(tmp_path):
    refiner = {
        "model.diffusion_model.input_blocks.0.0.weight": [384, 4, 3, 3],
        "conditioner.embedders.0.model.ln_final.weight": [1280],
    }
    path = header_only_checkpoint(tmp_path / "refiner.safetensors", refiner)
    with pytest.raises(DreamLoomError, match="SDXL refiner.*which DreamLoom cannot train") as err:
        doctor(base_model=str(path))
    assert "train on the SDXL base checkpoint" in err.value.hint


def test_bad_settings_are_refused():
    with pytest.raises(DreamLoomError, match="resolution"):
        doctor(resolution=500)
    with pytest.raises(DreamLoomError, match="gradient_checkpointing"):
        doctor(gradient_checkpointing="maybe")


def fake_gpu(monkeypatch, free_gib: float, bf16: bool = True):
    device = doctor_mod._Device("cuda", ["CUDA GPU: a test card"], free_gib=free_gib, bf16=bf16, capability=(8, 6))
    monkeypatch.setattr(doctor_mod, "_device", lambda: device)


def test_verdict_on_a_roomy_gpu(monkeypatch):
    fake_gpu(monkeypatch, free_gib=40.0)
    report = doctor(mixed_precision="bf16", gradient_checkpointing="false")
    flat = " ".join(report.split())
    assert "TF32                    on (Ampere or newer)" in report
    assert "bf16       off                 3.87" in report and "<- chosen" in report
    assert "fits with 35.4 GiB to spare." in flat


def test_verdict_suggests_the_first_change_that_fits(monkeypatch):
    fake_gpu(monkeypatch, free_gib=4.5)
    report = " ".join(doctor(mixed_precision="fp16", gradient_checkpointing="false").split())
    assert "does not fit: try gradient_checkpointing true (predicted 2.87 GiB)" in report
    report = " ".join(doctor(mixed_precision="no", gradient_checkpointing="false").split())
    assert "does not fit: try mixed_precision bf16 + gradient_checkpointing true" in report
    fake_gpu(monkeypatch, free_gib=4.5, bf16=False)
    report = " ".join(doctor(mixed_precision="no", gradient_checkpointing="true", resolution=768).split())
    assert "does not fit: try mixed_precision fp16 + resolution 704 (predicted" in report
    assert "no bf16 on this GPU" in report
    fake_gpu(monkeypatch, free_gib=3.0)
    report = " ".join(doctor(mixed_precision="fp16", gradient_checkpointing="true").split())
    assert "does not fit: try resolution 256 (predicted 2.16 GiB)" in report
    fake_gpu(monkeypatch, free_gib=2.5)
    report = " ".join(doctor(mixed_precision="fp16", gradient_checkpointing="true").split())
    assert "does not fit: even the smallest settings do not fit" in report


@pytest.mark.parametrize(
    "free_gib, family_args, on",
    [
        (7.0, {}, False),  # an 8 GB card: SD1.5 LoRA batch 1 + prior fits without (3.87 GiB measured on an H100)
        (5.0, {}, True),
        (15.0, {"base_model": "sdxl", "batch_size": 2}, True),  # a 16 GB card: SDXL batch 2 + prior needs it
        (15.0, {"base_model": "sd15", "batch_size": 6}, True),  # the old rule (on below 12 GiB free) left it off
        (22.0, {"base_model": "sd15", "batch_size": 4}, False),
    ],
)
def test_auto_checkpointing_is_on_when_the_steps_would_not_fit_without_it(monkeypatch, free_gib, family_args, on):
    fake_gpu(monkeypatch, free_gib=free_gib)
    report = " ".join(doctor(mixed_precision="bf16", **family_args).split())
    assert f"gradient_checkpointing {'on' if on else 'off'} (auto: the steps need about" in report
    assert f"{free_gib:.1f} GiB free)" in report


def test_auto_checkpointing_rules_outside_the_memory_model():
    from trainer.training.precision import resolve_gradient_checkpointing

    assert resolve_gradient_checkpointing(True, "cpu") == (True, "set")
    assert resolve_gradient_checkpointing(None, "cpu")[0] is False
    assert resolve_gradient_checkpointing(None, "cuda", None, free_gib=2.0) == (
        False,
        "auto: a built-in model needs well under 1 GB",
    )


PROBE = """
import atexit, json, os, sys
import torch

built = [0]
_init = torch.nn.Module.__init__


def _counting_init(self, *args, **kwargs):
    built[0] += 1
    _init(self, *args, **kwargs)


torch.nn.Module.__init__ = _counting_init


@atexit.register
def _report():
    heavy = [m for m in ("diffusers", "transformers", "peft") if m in sys.modules]
    with open(os.environ["DOCTOR_PROBE"], "w") as fh:
        json.dump({"modules_built": built[0], "imported": heavy}, fh)
"""


def test_cli_doctor_reads_no_weights(tmp_path):
    """`python -m trainer doctor` on a checkpoint that has a header but no tensor data (loading it would fail):
    exit 0, the table, and no torch module constructed nor diffusers/transformers/peft imported."""
    checkpoint = header_only_checkpoint(tmp_path / "v1-5-header-only.safetensors", SD15_KEYS)
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=str(probe_dir), DOCTOR_PROBE=str(tmp_path / "probe.json"))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "doctor", "--base-model", str(checkpoint), "--resolution", "768"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "v1-5-header-only.safetensors: SD1.5, single file" in out
    assert "768 px, batch 1 + 1 prior image = 2 UNet rows" in out
    assert "precision  checkpointing   training  samples  class img      peak" in out
    assert out.count(" GiB") >= 6 and "(predicted" in out
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe == {"modules_built": 0, "imported": []}


# tests/test_cuda_sdxl.py on an H100 (torch 2.11): SDXL at 1024 px, LoRA rank 4, batch 1 + 1 prior, checkpointing.
SDXL_MEASURED = [
    (dict(precision="bf16", phase="training"), 6.36),
    (dict(precision="fp16", phase="training"), 6.36),
    (dict(precision="bf16", phase="whole run"), 8.45),  # with 2 class images and 2 sample grids
    (dict(precision="fp16", phase="whole run"), 8.61),
]


@pytest.mark.parametrize("settings,measured", SDXL_MEASURED)
def test_sdxl_prediction_reproduces_measured_runs_and_fits_a_12gb_card(settings, measured):
    precision = settings["precision"]
    pred = predict_memory(family="SDXL", precision=precision, checkpointing=True, text_encoders_leave=False)
    predicted = pred.training if settings["phase"] == "training" else pred.peak
    assert abs(predicted - measured) / measured < 0.05, (settings, predicted, measured)
    assert pred.peak + doctor_mod.CONTEXT_GIB < 11.2  # a 12 GB card (about 11.2 GiB usable)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_frozen_text_encoders_off_the_gpu_while_sampling_save_their_weights_at_the_peak(precision):
    """SDXL's text encoders (1.5 GiB in 16 bits) no longer sit beside the UNet's sampling activations: the sample
    grids and class images of a whole SDXL run need that much less, which takes it from 12 GB cards to 10 GB ones.
    Where the text encoder trains, nothing changes."""
    text = doctor_mod.FAMILY_SIZES["SDXL"].text_encoders * 2 / doctor_mod.GIB
    settings = dict(family="SDXL", precision=precision, checkpointing=True)
    before, after = predict_memory(**settings, text_encoders_leave=False), predict_memory(**settings)
    assert before.samples - after.samples == pytest.approx(text)
    assert before.class_images - after.class_images == pytest.approx(text)
    assert after.training == before.training and after.peak == after.samples
    assert after.peak + doctor_mod.CONTEXT_GIB < 9.3  # a 10 GB card (about 9.3 GiB usable)
    trains_text = dict(settings, train_text_encoder=True)
    assert predict_memory(**trains_text).samples == predict_memory(**trains_text, text_encoders_leave=False).samples


def test_sdxl_checkpoint_is_described_and_sized_as_sdxl(cpu_only, tmp_path):
    from helpers.sdxl_layout import sdxl_configs, sdxl_meta_models
    from trainer.formats.ldm_layout import to_sdxl_ldm_state_dict

    cfg, models = sdxl_configs(), sdxl_meta_models()
    parts = {name: m.state_dict() for name, m in models.items()}
    layout = to_sdxl_ldm_state_dict(
        parts["unet"], parts["vae"], parts["text"], parts["text_2"], cfg["unet"], cfg["vae"], logit_scale=None
    )
    path = header_only_checkpoint(tmp_path / "sd_xl_base.safetensors", {k: list(v.shape) for k, v in layout.items()})
    report = doctor(base_model=str(path))
    assert "SDXL, single file" in report and "1024 px" in report and "of an SDXL run" in report
    assert "1024 px" in doctor(base_model="sdxl") and "the SDXL architecture" in doctor(base_model="sdxl")


def test_phases_that_may_not_fit_are_warned_before_the_run_with_what_avoids_them():
    """SDXL at 1024 px on an 8 GB card (about 7.5 GiB free): the steps fit with checkpointing, but the sample grids
    and the class images are predicted not to; the run says so before it starts, not with an error mid-run."""
    from trainer.training.memory import phase_warnings

    run = dict(method="lora", resolution=1024, batch_size=1, precision="bf16", prior=True, family="SDXL")
    notes = phase_warnings(7.5, run, checkpointing=True, sample_grids=True, class_images=True)
    assert len(notes) == 2
    assert notes[0].startswith("the sample grids need about 7.8 GiB (predicted, +-25%, the CUDA context included)")
    assert "the GPU has 7.5 GiB free: set sample_every 0" in notes[0]
    assert notes[1].startswith("making class images needs about 7.7 GiB") and "class_dir" in notes[1]
    assert len(phase_warnings(7.5, run, True, sample_grids=False, class_images=True)) == 1  # no grids: one less
    assert len(phase_warnings(7.5, run, True, sample_grids=True, class_images=False)) == 1  # class_dir given
    steps = phase_warnings(7.5, run, checkpointing=False, sample_grids=False, class_images=False)[0]
    assert steps.startswith("the training steps need about 11.4 GiB") and "gradient_checkpointing on" in steps
    assert phase_warnings(9.3, run, checkpointing=True, sample_grids=True, class_images=True) == []  # a 10 GB card
    assert phase_warnings(2.0, None, False, sample_grids=True, class_images=True) == []  # a built-in model
