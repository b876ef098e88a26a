"""`python -m trainer demo`: the fabric tutorial, end to end, on the built-in tiny-fabric model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..base_models.load import load_base_model
from ..config import TrainConfig
from ..data.sample_set import write_fabric_samples
from ..events import Events, TqdmListener
from ..files.atomic import atomic_save, atomic_write_text
from ..formats.embeddings import load_embedding_into_pipeline
from ..inference.morph import MorphSpec, render_morph
from ..inference.pipelines import generate, make_pipeline
from ..inference.prompts import GRID_CONTEXTS
from ..pictures.animation import write_gif
from ..pictures.grid import labelled_grid, save_png
from ..training.loop import train
from .quality import features, mean_similarity_to, reference_features

SUBJECT = "sks african fabric pattern"
TI_TOKEN = "<sks-fabric>"


def _copy(src: str | Path, dst: Path) -> Path:
    return atomic_save(dst, lambda tmp: shutil.copyfile(src, tmp))


def _fidelity(images) -> float:
    return round(mean_similarity_to([features(im) for im in images], reference_features())["combined"], 4)


def _demo_config(
    samples_dir: Path, base_model: str, resolution: int, steps: int, grids: int, **settings
) -> TrainConfig:
    """A demo run on the sample set: `grids` sample grids and as many checkpoints after step 0, 8 sampling steps."""
    return TrainConfig(
        base_model=base_model,
        instance_dir=str(samples_dir),
        resolution=resolution,
        max_train_steps=steps,
        sample_steps=8,
        sample_every=max(1, steps // grids),
        checkpoint_every=max(1, steps // grids),
        **settings,
    ).validate()


def lora_config(samples_dir: Path, base_model: str, resolution: int, steps: int | None, quick: bool) -> TrainConfig:
    """The tutorial's LoRA settings: rank 4, lr 1e-4, 800 steps, 100 class images (`quick`: fewer of everything)."""
    return _demo_config(
        samples_dir, base_model, resolution, steps or (30 if quick else 800), 4,
        method="lora", rank=4, alpha=4.0, learning_rate=1e-4, num_class_images=8 if quick else 100,
        class_steps=4 if quick else 10, output_name="sks_fabric",
    )  # fmt: skip


def ti_config(samples_dir: Path, base_model: str, resolution: int, steps: int | None, quick: bool) -> TrainConfig:
    """Textual inversion on the same images: 600 steps at lr 5e-3, initialised from "pattern", no class images."""
    return _demo_config(
        samples_dir, base_model, resolution, steps or (30 if quick else 600), 3,
        method="ti", placeholder_token=TI_TOKEN, initializer_token="pattern", learning_rate=5e-3,
        with_prior_preservation=False, output_name="sks_fabric_ti",
    )  # fmt: skip


def _train_with_progress(cfg: TrainConfig, run_dir: Path, label: str, **kwargs):
    events = Events(run_dir)
    listener = TqdmListener(label)
    events.listeners.append(listener)
    try:
        return train(cfg, run_dir, events=events, **kwargs)
    finally:
        listener.close()


def run_demo(
    out: Path,
    steps: int | None = None,
    quick: bool = False,
    base_model: str = "tiny-fabric",
    ti_steps: int | None = None,
) -> dict:
    """The tutorial on `base_model`: LoRA (`steps`, default 800), TI (`ti_steps`, default `steps` or 600), grids,
    the comparisons and a morph; writes summary.json in `out`."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"base_model": base_model}
    samples_dir = out / "fabric_samples"
    write_fabric_samples(samples_dir, size=512)
    print(f"[demo] sample set: {samples_dir} (10 images, 512 px)")
    resolution = load_base_model(base_model).native_resolution
    pipe = _lora(out, samples_dir, base_model, resolution, steps, quick, summary)
    _ti(out, samples_dir, base_model, resolution, ti_steps or steps, quick, pipe, summary)
    _morph(out, pipe, resolution, summary)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(f"[demo] done in {summary['wall_s']} s; outputs in {out}")
    return summary


def _lora(out: Path, samples_dir: Path, base_model: str, resolution: int, steps, quick: bool, summary: dict):
    """The tutorial's LoRA run, its nine-context grid (exercise 1) and base-vs-LoRA; returns the LoRA pipeline."""
    cfg = lora_config(samples_dir, base_model, resolution, steps, quick)
    result = _train_with_progress(cfg, out / "lora_run", "demo", class_dir=out / "class_images")
    summary["lora_steps"] = cfg.max_train_steps
    summary["lora"] = str(_copy(result.outputs["lora"], out / "sks_fabric.safetensors"))
    summary["lora_diffusers"] = str(_copy(result.outputs["lora_diffusers"], out / "pytorch_lora_weights.safetensors"))
    summary["loss_plot"] = str(_copy(result.outputs["loss_plot"], out / "loss.png"))
    summary["samples"] = result.outputs["samples"]
    print(f"[demo] LoRA: {summary['lora']}")

    pipe = make_pipeline(load_base_model(base_model))
    pipe.load_lora_weights(str(out), weight_name="sks_fabric.safetensors")
    prompts = [tpl.format(s=SUBJECT) for _, tpl in GRID_CONTEXTS]
    images = generate(pipe, prompts, [42] * len(prompts), 10, 7.5, resolution)
    grid = labelled_grid(
        images,
        [name for name, _ in GRID_CONTEXTS],
        cols=3,
        tile=160,
        title="sks african fabric pattern, 9 contexts (LoRA)",
    )
    summary["grid"] = str(save_png(grid, out / "grid_lora.png"))

    # The same prompts and seed on the base model: what the LoRA changed, in pictures and in numbers.
    base_images = generate(
        make_pipeline(load_base_model(base_model)), prompts, [42] * len(prompts), 10, 7.5, resolution
    )
    labels = [f"base: {name}" for name, _ in GRID_CONTEXTS[:5]] + [f"LoRA: {name}" for name, _ in GRID_CONTEXTS[:5]]
    comparison = labelled_grid(
        base_images[:5] + images[:5],
        labels,
        cols=5,
        tile=160,
        title="base model (top) vs LoRA (bottom), same prompts and seed",
    )
    summary["base_vs_lora"] = str(save_png(comparison, out / "base_vs_lora.png"))
    summary["fidelity"] = {"base": _fidelity(base_images), "lora": _fidelity(images)}
    print(
        f"[demo] fidelity to the sample set (quality.py features, 0-1): base {summary['fidelity']['base']:.3f}, "
        f"LoRA {summary['fidelity']['lora']:.3f}"
    )
    return pipe


def _ti(
    out: Path, samples_dir: Path, base_model: str, resolution: int, steps, quick: bool, lora_pipe, summary: dict
) -> None:
    """Textual inversion on the same images, then the tutorial's step 4: TI next to LoRA, same prompts and seeds."""
    cfg = ti_config(samples_dir, base_model, resolution, steps, quick)
    result = _train_with_progress(cfg, out / "ti_run", "demo ti")
    summary["ti_steps"] = cfg.max_train_steps
    summary["embedding"] = str(_copy(result.outputs["embedding"], out / "sks_fabric_ti.safetensors"))
    print(f"[demo] TI embedding: {summary['embedding']}")
    ti_pipe = make_pipeline(load_base_model(base_model))
    load_embedding_into_pipeline(ti_pipe, summary["embedding"], TI_TOKEN)
    compare = [
        ("a fabric pattern in the style of {}", "fabric"),
        ("a dress made of {}", "dress"),
        ("a watercolor painting of {}", "watercolor"),
        ("a ceramic vase painted with {}", "vase"),
    ]
    seeds = [7] * len(compare)
    lora_images = generate(lora_pipe, [t.format(SUBJECT) for t, _ in compare], seeds, 10, 7.5, resolution)
    ti_images = generate(ti_pipe, [t.format(TI_TOKEN) for t, _ in compare], seeds, 10, 7.5, resolution)
    labels = [f"LoRA: {n}" for _, n in compare] + [f"TI: {n}" for _, n in compare]
    grid = labelled_grid(
        lora_images + ti_images,
        labels,
        cols=len(compare),
        tile=160,
        title="LoRA (top) vs textual inversion (bottom), same seeds",
    )
    summary["ti_vs_lora"] = str(save_png(grid, out / "ti_vs_lora.png"))
    summary["fidelity"]["ti"] = _fidelity(ti_images)


def _morph(out: Path, pipe, resolution: int, summary: dict) -> None:
    """A short seamless morph through the learned style (tutorial step 5, scaled down for the CPU)."""
    spec = MorphSpec(
        prompt="a sks african fabric pattern", seconds=3.0, fps=10.0, easing="cosine", steps=8, resolution=resolution
    )
    frames = render_morph(pipe, spec, batch_size=10)
    write_gif(frames, out / "morph.gif", fps=spec.fps)
    summary["morph"] = {"path": str(out / "morph.gif"), "frames": len(frames), "fps": spec.fps}
    print(f"[demo] morph: {out / 'morph.gif'} ({len(frames)} frames)")
