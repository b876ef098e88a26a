"""A base model is loaded for training in the dtype its files store (fp16 for most checkpoints), never upcast on the
host first, and training from it gives to the bit what loading it in fp32 gave: the class images, the frozen
weights, the LoRA adapters' and the embedding's initial values, and every step after."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import assert_same_tensors, tiny_config
from safetensors.torch import save_file

from trainer.base_models.builtin import build_tiny_sdxl
from trainer.base_models.load import stored_dtype
from trainer.base_models.sdxl import SDXL
from trainer.errors import DreamLoomError
from trainer.training import loop
from trainer.training.loop import Trainer


@pytest.fixture(scope="module")
def fp16_sdxl_folder(tmp_path_factory):
    """tiny-sdxl saved as a diffusers folder in fp16, as SDXL checkpoints are published."""
    comps = build_tiny_sdxl()
    folder = tmp_path_factory.mktemp("xl16") / "tiny-sdxl-fp16"
    SDXL.pipeline(comps, comps.noise_scheduler()).to(torch.float16).save_pretrained(folder)
    return folder


def test_stored_dtype_is_read_from_the_headers(fp16_sdxl_folder, tmp_path):
    assert stored_dtype(str(fp16_sdxl_folder)) == torch.float16
    assert stored_dtype("tiny-sdxl") == stored_dtype("tiny") == torch.float32
    files = {
        "bf16": {"a": torch.zeros(2, dtype=torch.bfloat16), "steps": torch.zeros(1, dtype=torch.int64)},
        "mixed": {"unet": torch.zeros(2, dtype=torch.float16), "vae": torch.zeros(2)},
        "fp32": {"a": torch.zeros(2)},
    }
    for name, tensors in files.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    assert stored_dtype(str(tmp_path / "bf16.safetensors")) == torch.bfloat16  # integer tensors do not count
    assert stored_dtype(str(tmp_path / "mixed.safetensors")) == torch.float32  # fp16 UNet + fp32 VAE: fp32, exact
    assert stored_dtype(str(tmp_path / "fp32.safetensors")) == torch.float32
    # A folder holding both an fp32 file and its fp16 variant: from_pretrained reads the fp32 one.
    folder = tmp_path / "variants"
    (folder / "unet").mkdir(parents=True)
    save_file(files["fp32"], str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file(
        {"a": torch.zeros(2, dtype=torch.float16)}, str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    )
    assert stored_dtype(str(folder)) == torch.float32
    (tmp_path / "model.ckpt").write_bytes(b"pickle")  # refused as load_base_model refuses it, before any header read
    with pytest.raises(DreamLoomError, match="pickle-based checkpoint"):
        stored_dtype(str(tmp_path / "model.ckpt"))


def _train(cfg, run_dir, cache_root, monkeypatch, load_as=None):
    """Train from cfg.base_model; `load_as` forces the load dtype (None: the trainer's own choice). Returns the
    trainer, the dtypes the loaded model's weights had and the trained state."""
    loaded = {}
    load = loop.load_base_model

    def spy(spec, dtype=None, **kwargs):
        comps = load(spec, dtype=load_as or dtype, **kwargs)
        loaded["dtypes"] = {p.dtype for m in comps.modules().values() for p in m.parameters()}
        return comps

    monkeypatch.setattr(loop, "load_base_model", spy)
    trainer = Trainer(cfg, run_dir, cache_root=cache_root)
    trainer.run()
    return trainer, loaded["dtypes"], trainer.method.trainable_state(trainer.comps)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,overrides",
    [
        ("lora", dict(train_text_encoder=True)),
        ("lora", dict(mixed_precision="bf16")),
        ("ti", dict(initializer_token="pattern", num_vectors=2, learning_rate=5e-3)),
        ("full", dict(train_text_encoder=False, with_prior_preservation=False)),
    ],
)
def test_training_loads_a_fp16_model_in_fp16_and_matches_loading_it_in_fp32(
    method, overrides, fp16_sdxl_folder, fabric_dir, tmp_path, monkeypatch
):
    cfg = tiny_config(fabric_dir, base_model=str(fp16_sdxl_folder), method=method, max_train_steps=3, **overrides)
    half, half_dtypes, half_state = _train(cfg, tmp_path / "half", tmp_path / "c1", monkeypatch)
    _, full_dtypes, full_state = _train(cfg, tmp_path / "full", tmp_path / "c2", monkeypatch, load_as=torch.float32)
    assert half_dtypes == {torch.float16} and full_dtypes == {torch.float32}
    assert_same_tensors(half_state, full_state)
    # Trained weights are fp32 master weights; on the CPU the frozen ones are fp32 too (bf16 when asked for), but
    # for the frozen convs, which fp32 training keeps as the file stores them (half_frozen_convs, auto: on).
    bf16 = overrides.get("mixed_precision") == "bf16"
    trained = {
        p.dtype for m in half.method.trainable_modules(half.comps).values() for p in m.parameters() if p.requires_grad
    }
    assert trained == {torch.float32}
    convs = [m for m in half.comps.unet.modules() if type(m) is torch.nn.Conv2d]
    kept = {id(m.weight) for m in convs if m.weight.dtype == torch.float16}
    assert bool(kept) == (not bf16 and method != "full")
    frozen = [p for p in half.comps.unet.parameters() if not p.requires_grad and id(p) not in kept]
    assert {p.dtype for p in frozen} <= ({torch.bfloat16} if bf16 else {torch.float32})


SET_UP_PEAK = """
import sys
sys.path.insert(0, "tests")
from conftest import tiny_config
from trainer.training.loop import Trainer
cfg = tiny_config(sys.argv[2], base_model=sys.argv[1], resolution=128, with_prior_preservation=False)
trainer = Trainer(cfg, sys.argv[3])
trainer.set_up()
print({p.dtype for m in (trainer.comps.vae, trainer.comps.text_encoder) for p in m.parameters()})
# VmHWM, not ru_maxrss: a child's ru_maxrss includes the parent's RSS at the fork (here pytest's, holding the model)
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]) // 1024)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc/self/status")
def test_setting_up_from_a_full_size_fp16_checkpoint_holds_no_fp32_copy_on_the_host(
    sd15_checkpoint, fabric_dir, tmp_path
):
    """What a GPU run does on the host before anything moves to the GPU (load the model, add the LoRA), in a
    process of its own: 1.0 GB at the high-water mark measured; loading the 2.1 GB fp16 file in fp32 measured
    6.6 GB (the fp32 model is 4.3 GB)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = [str(sd15_checkpoint), str(fabric_dir), str(tmp_path / "run")]
    done = subprocess.run(
        [sys.executable, "-c", SET_UP_PEAK, *args], cwd=root, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dtypes, peak_mib = done.stdout.strip().splitlines()[-2:]
    assert dtypes == "{torch.float16}"
    assert int(peak_mib) < 2500, peak_mib
