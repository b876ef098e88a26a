import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_cli_reports_bad_input_without_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("train", "--output-dir", str(tmp_path / "run"), "--instance-dir", str(empty), "--resolution", "64")
    assert r.returncode == 2
    assert "error: No images" in r.stderr and "fix:" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "--output-dir", str(tmp_path / "run"), "--instance-dir", str(empty), "--rank", "0")
    assert r.returncode == 2 and "rank = 0" in r.stderr


def test_cli_train_then_generate(fabric_dir, tmp_path):
    run = tmp_path / "run"
    r = run_cli(
        "train",
        "--output-dir",
        str(run),
        "--instance-dir",
        str(fabric_dir),
        "--resolution",
        "64",
        "--max-train-steps",
        "4",
        "--num-class-images",
        "2",
        "--class-steps",
        "2",
        "--sample-steps",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert r.returncode == 0, r.stderr
    outputs = json.loads(r.stdout)
    assert Path(outputs["lora"]).exists() and Path(outputs["lora_diffusers"]).exists()
    grid_args = ["--steps", "2", "--resolution", "64", "--out", str(tmp_path / "grid.png")]  # as trained
    r = run_cli("generate", "--lora", outputs["lora"], *grid_args)
    assert r.returncode == 0, r.stderr
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 3 * 160 and grid.height > 3 * 160  # a labelled 3x3 grid


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The demo's whole pipeline (class images, LoRA, grids, TI, comparison, morph) at half the tutorial's LoRA steps,
    100 TI steps (TI learns the colours fast) and 8 class images: the tutorial's 800 + 600 steps and 100 class images
    take 8 minutes on one core, and their settings are checked without training in
    test_demo_defaults_are_the_tutorials."""
    out = tmp_path / "demo_output"
    r = run_cli("demo", "--quick", "--steps", "400", "--ti-steps", "100", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for name in (
        "sks_fabric.safetensors",
        "pytorch_lora_weights.safetensors",
        "loss.png",
        "grid_lora.png",
        "base_vs_lora.png",
        "sks_fabric_ti.safetensors",
        "ti_vs_lora.png",
        "morph.gif",
    ):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "class_images").glob("class_*.png"))) == 8
    assert len(list((out / "fabric_samples").glob("*.png"))) == 10
    assert summary["lora_steps"] == 400 and summary["ti_steps"] == 100
    with Image.open(out / "morph.gif") as gif:
        assert gif.n_frames == summary["morph"]["frames"] == 30 and gif.info["loop"] == 0
    samples = [Path(p).name for p in summary["samples"]]
    assert samples[0] == "step_00000.png" and samples[-1] == "step_00400.png"
    # On the pretrained tiny-fabric model the demo visibly learns the style: its pictures move towards the
    # sample set (quality.py's colour + texture features) from the base model's at the same prompts and seed
    # (measured: base 0.342, LoRA 0.414 after 400 steps and 0.441 after 800, TI 0.525 after 100 and 0.53 after 400).
    assert summary["base_model"] == "tiny-fabric"
    assert summary["fidelity"]["lora"] > summary["fidelity"]["base"] + 0.05, summary["fidelity"]
    assert summary["fidelity"]["ti"] > summary["fidelity"]["base"], summary["fidelity"]


def test_demo_defaults_are_the_tutorials(tmp_path):
    """`python -m trainer demo` without options trains with the tutorial's numbers (seed-tutorial.md)."""
    from trainer.lab.demo import TI_TOKEN, lora_config, ti_config

    lora = lora_config(tmp_path, "tiny-fabric", 128, None, quick=False)
    assert (lora.method, lora.rank, lora.learning_rate, lora.max_train_steps) == ("lora", 4, 1e-4, 800)
    assert lora.with_prior_preservation and lora.num_class_images == 100
    assert (lora.instance_prompt, lora.class_prompt) == ("a sks african fabric pattern", "a fabric pattern")
    ti = ti_config(tmp_path, "tiny-fabric", 128, None, quick=False)
    assert (ti.method, ti.max_train_steps, ti.placeholder_token) == ("ti", 600, TI_TOKEN)
    assert not ti.with_prior_preservation
    assert lora_config(tmp_path, "tiny-fabric", 128, 400, quick=True).max_train_steps == 400


@pytest.mark.parametrize("model, native", [("tiny-fabric", 128), ("sd15.safetensors", 512)])
def test_class_images_defaults_make_the_set_train_looks_for(model, native):
    """`class-images` without options makes the set `train` without options reuses: same sampler, steps,
    guidance, prompts, seed and resolution, so the same cache key (they once differed: 25 steps against 20)."""
    from trainer.cli import build_parser
    from trainer.cli.args import _config_from_args
    from trainer.cli.commands import class_image_spec
    from trainer.data.class_images import ClassImageSpec

    parser = build_parser()
    made = class_image_spec(parser.parse_args(["class-images", "--base-model", model]), "fp", native)
    cfg = _config_from_args(parser.parse_args(["train", "--base-model", model, "--output-dir", "out"]))
    assert made == ClassImageSpec.for_training(cfg, "fp")
    assert made.key() == ClassImageSpec.for_training(cfg, "fp").key()


def test_cli_morph_writes_looping_gif(tmp_path):
    out = tmp_path / "m.gif"
    r = run_cli("morph", "--seconds", "1", "--fps", "10", "--steps", "2", "--seeds", "1,2,3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    with Image.open(out) as gif:
        assert gif.n_frames == 9 and gif.info["loop"] == 0  # 3 transitions x 3 frames, no duplicate seam
