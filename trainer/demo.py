"""`python -m trainer demo`: the fabric tutorial, end to end, on the built-in tiny-fabric model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .config import TrainConfig
from .events import Events, TqdmListener


def _copy(src: str | Path, dst: Path) -> Path:
    from .fsutil import atomic_save

    return atomic_save(dst, lambda tmp: shutil.copyfile(src, tmp))


def _fidelity(images) -> float:
    from .quality import features, mean_similarity_to, reference_features

    return round(mean_similarity_to([features(im) for im in images], reference_features())["combined"], 4)


def run_demo(out: Path, steps: int | None = None, quick: bool = False, base_model: str = "tiny-fabric") -> dict:
    from .prompts import GRID_CONTEXTS
    from .fabric import write_fabric_samples
    from .fsutil import atomic_save, atomic_write_text
    from .models import load_base_model
    from .sampling import generate, labelled_grid, make_pipeline
    from .train import train

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"base_model": base_model}
    samples_dir = out / "fabric_samples"
    write_fabric_samples(samples_dir, size=512)
    print(f"[demo] sample set: {samples_dir} (10 images, 512 px)")

    lora_steps = steps or (30 if quick else 800)
    resolution = load_base_model(base_model).native_resolution
    cfg = TrainConfig(
        method="lora",
        base_model=base_model,
        instance_dir=str(samples_dir),
        resolution=resolution,
        rank=4,
        alpha=4.0,
        learning_rate=1e-4,
        max_train_steps=lora_steps,
        num_class_images=8 if quick else 100,
        class_steps=4 if quick else 10,
        sample_steps=8,
        sample_every=max(1, lora_steps // 4),
        checkpoint_every=max(1, lora_steps // 4),
        output_name="sks_fabric",
    ).validate()
    listener = TqdmListener("demo")
    events = Events(out / "lora_run")
    events.listeners.append(listener)
    try:
        result = train(cfg, out / "lora_run", events=events, class_dir=out / "class_images")
    finally:
        listener.close()
    summary["lora_steps"] = lora_steps
    summary["lora"] = str(_copy(result.outputs["lora"], out / "sks_fabric.safetensors"))
    summary["lora_diffusers"] = str(_copy(result.outputs["lora_diffusers"], out / "pytorch_lora_weights.safetensors"))
    summary["loss_plot"] = str(_copy(result.outputs["loss_plot"], out / "loss.png"))
    summary["samples"] = result.outputs["samples"]
    print(f"[demo] LoRA: {summary['lora']}")

    # Exercise 1: the nine contexts, with the LoRA applied.
    comps = load_base_model(base_model)
    pipe = make_pipeline(comps)
    pipe.load_lora_weights(str(out), weight_name="sks_fabric.safetensors")
    subject = "sks african fabric pattern"
    prompts = [tpl.format(s=subject) for _, tpl in GRID_CONTEXTS]
    images = generate(pipe, prompts, [42] * len(prompts), 10, 7.5, resolution)
    grid = labelled_grid(images, [name for name, _ in GRID_CONTEXTS], cols=3, tile=160, title="sks african fabric pattern, 9 contexts (LoRA)")
    atomic_save(out / "grid_lora.png", lambda tmp: grid.save(tmp, format="PNG"))
    summary["grid"] = str(out / "grid_lora.png")

    # The same prompts and seed on the base model: what the LoRA changed, in pictures and in numbers.
    base_images = generate(make_pipeline(load_base_model(base_model)), prompts, [42] * len(prompts), 10, 7.5, resolution)
    labels = [f"base: {name}" for name, _ in GRID_CONTEXTS[:5]] + [f"LoRA: {name}" for name, _ in GRID_CONTEXTS[:5]]
    cmp = labelled_grid(base_images[:5] + images[:5], labels, cols=5, tile=160, title="base model (top) vs LoRA (bottom), same prompts and seed")
    atomic_save(out / "base_vs_lora.png", lambda tmp: cmp.save(tmp, format="PNG"))
    summary["base_vs_lora"] = str(out / "base_vs_lora.png")
    summary["fidelity"] = {"base": _fidelity(base_images), "lora": _fidelity(images)}
    print(f"[demo] fidelity to the sample set (quality.py features, 0-1): base {summary['fidelity']['base']:.3f}, "
          f"LoRA {summary['fidelity']['lora']:.3f}")

    # Textual inversion on the same images, then the tutorial's step 4: TI next to LoRA, same prompts and seeds.
    ti_steps = steps or (30 if quick else 600)
    ti_cfg = TrainConfig(
        method="ti",
        base_model=base_model,
        instance_dir=str(samples_dir),
        resolution=resolution,
        placeholder_token="<sks-fabric>",
        initializer_token="pattern",
        learning_rate=5e-3,
        max_train_steps=ti_steps,
        with_prior_preservation=False,
        sample_steps=8,
        sample_every=max(1, ti_steps // 3),
        checkpoint_every=max(1, ti_steps // 3),
        output_name="sks_fabric_ti",
    ).validate()
    ti_events = Events(out / "ti_run")
    listener = TqdmListener("demo ti")
    ti_events.listeners.append(listener)
    try:
        ti_result = train(ti_cfg, out / "ti_run", events=ti_events)
    finally:
        listener.close()
    summary["ti_steps"] = ti_steps
    summary["embedding"] = str(_copy(ti_result.outputs["embedding"], out / "sks_fabric_ti.safetensors"))
    print(f"[demo] TI embedding: {summary['embedding']}")
    from .ti import load_embedding_into_pipeline

    ti_pipe = make_pipeline(load_base_model(base_model))
    load_embedding_into_pipeline(ti_pipe, summary["embedding"], "<sks-fabric>")
    compare = [("a fabric pattern in the style of {}", "fabric"), ("a dress made of {}", "dress"),
               ("a watercolor painting of {}", "watercolor"), ("a ceramic vase painted with {}", "vase")]
    lora_imgs = generate(pipe, [t.format(subject) for t, _ in compare], [7] * len(compare), 10, 7.5, resolution)
    ti_imgs = generate(ti_pipe, [t.format("<sks-fabric>") for t, _ in compare], [7] * len(compare), 10, 7.5, resolution)
    labels = [f"LoRA: {n}" for _, n in compare] + [f"TI: {n}" for _, n in compare]
    cmp_grid = labelled_grid(lora_imgs + ti_imgs, labels, cols=len(compare), tile=160, title="LoRA (top) vs textual inversion (bottom), same seeds")
    atomic_save(out / "ti_vs_lora.png", lambda tmp: cmp_grid.save(tmp, format="PNG"))
    summary["ti_vs_lora"] = str(out / "ti_vs_lora.png")
    summary["fidelity"]["ti"] = _fidelity(ti_imgs)

    # A short seamless morph through the learned style (tutorial step 5, scaled down for the CPU).
    from .animate import write_gif
    from .morph import MorphSpec, render_morph

    spec = MorphSpec(prompt="a sks african fabric pattern", seconds=3.0, fps=10.0, easing="cosine", steps=8,
                     resolution=resolution)
    frames = render_morph(pipe, spec, batch_size=10)
    write_gif(frames, out / "morph.gif", fps=spec.fps)
    summary["morph"] = {"path": str(out / "morph.gif"), "frames": len(frames), "fps": spec.fps}
    print(f"[demo] morph: {out / 'morph.gif'} ({len(frames)} frames)")
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(f"[demo] done in {summary['wall_s']} s; outputs in {out}")
    return summary
