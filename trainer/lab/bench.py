"""`python -m trainer bench`: our training step against a faithful re-implementation of the tutorial's,
alternating in one process on the same model and data; plus batched vs per-frame morph rendering."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..config import TrainConfig
from ..training.precision import best_device

PHASES = ("data", "vae", "text_encoder", "unet_forward", "backward", "optimizer")


class PeakRSS:
    """Peak resident memory while the block runs, sampled from /proc (ru_maxrss only ever grows)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def _cuda_peak_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak():
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def run_ours(cfg: TrainConfig, comps_factory, instance_set, class_dir, warmup: int, steps: int) -> dict:
    """The real Trainer loop (caches, one concatenated UNet pass), timed per phase after warm-up."""
    from ..training.loop import Trainer
    from ..training.timing import PhaseTimer

    cfg = TrainConfig.from_dict({**cfg.to_dict(), "max_train_steps": warmup + steps})
    comps = comps_factory()
    timer = PhaseTimer(best_device().type)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(
            cfg, run_dir, comps=comps, instance_set=instance_set, class_dir=class_dir, timer=timer, bench=True
        )
        _cuda_peak_reset()
        with PeakRSS() as rss:
            trainer.run()
    times = timer.step_times[warmup:]
    # Phase totals include warm-up; scale them to per-step averages over all steps.
    n_all = len(timer.step_times)
    return {
        "steps_per_s": len(times) / sum(times),
        "step_times": times,
        "peak_rss": rss.peak,
        "peak_cuda": _cuda_peak(),
        "phases": {k: timer.totals.get(k, 0.0) / n_all for k in PHASES},
    }


def run_baseline(cfg: TrainConfig, comps_factory, instance_set, class_images: list, warmup: int, steps: int) -> dict:
    """The tutorial's loop (exercise3b_train_lora.py), re-implemented on our model and data:

    * VAE-encodes the instance image and the class image separately at every step (latent_dist.sample());
    * runs the text encoder on the instance and the class prompt at every step;
    * one shared timestep for the pair, and two separate UNet passes;
    * loss = mse(instance) + prior_weight * mse(class), fp32;
    * AdamW over all UNet parameters (the frozen ones get no gradients), as the tutorial passes them.
    It uses our LoRA config and learning rate, so the maths per step matches ours.
    """
    import torch
    import torch.nn.functional as F

    from ..data.images import crop_resize, pil_to_tensor
    from ..training.methods.lora import LoRAMethod
    from ..training.timing import PhaseTimer

    comps = comps_factory()
    device = best_device()
    LoRAMethod(cfg).setup(comps)
    unet, vae, te, tok = comps.unet.to(device), comps.vae.to(device), comps.text_encoder.to(device), comps.tokenizer
    unet.train()
    sched = comps.noise_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    inst = [pil_to_tensor(crop_resize(im, cfg.resolution)) for im in instance_set.images]
    cls = [pil_to_tensor(crop_resize(im, cfg.resolution)) for im in class_images]
    ids_i = comps.family.tokenize(tok, [cfg.instance_prompt]).to(device)
    ids_c = comps.family.tokenize(tok, [cfg.class_prompt]).to(device)
    timer = PhaseTimer(device.type)
    g = torch.Generator().manual_seed(cfg.seed)
    _cuda_peak_reset()
    with PeakRSS() as rss:
        for step in range(warmup + steps):
            if step == warmup:
                timer.reset()
            t0 = time.perf_counter()
            with timer("data"):
                idx = int(torch.randint(0, max(len(inst), len(cls)), (1,), generator=g))
                pi, pc = inst[idx % len(inst)][None].to(device), cls[idx % len(cls)][None].to(device)
            with timer("vae"), torch.no_grad():
                li = vae.encode(pi).latent_dist.sample() * vae.config.scaling_factor
                lc = vae.encode(pc).latent_dist.sample() * vae.config.scaling_factor
            ni, nc = torch.randn_like(li), torch.randn_like(lc)
            t = torch.randint(0, sched.config.num_train_timesteps, (1,), device=device)
            with timer("text_encoder"), torch.no_grad():
                ei, ec = te(ids_i)[0], te(ids_c)[0]
            with timer("unet_forward"):
                pred_i = unet(sched.add_noise(li, ni, t), t, ei).sample
                pred_c = unet(sched.add_noise(lc, nc, t), t, ec).sample
                loss = F.mse_loss(pred_i.float(), ni.float()) + cfg.prior_loss_weight * F.mse_loss(
                    pred_c.float(), nc.float()
                )
            with timer("backward"):
                loss.backward()
            with timer("optimizer"):
                opt.step()
                opt.zero_grad()
            timer.step_times.append(time.perf_counter() - t0)
    times = timer.step_times
    return {
        "steps_per_s": len(times) / sum(times),
        "step_times": times,
        "peak_rss": rss.peak,
        "peak_cuda": _cuda_peak(),
        "phases": {k: timer.totals.get(k, 0.0) / len(times) for k in PHASES},
    }


def bench(
    base_model: str = "tiny",
    steps: int = 30,
    warmup: int = 5,
    repeats: int = 3,
    resolution: int | None = None,
    morph: bool = True,
    out: str | None = None,
    cfg_overrides: dict | None = None,
    compile_unet: bool = False,
) -> dict:
    from ..base_models.builtin import build_tiny
    from ..base_models.load import load_base_model
    from ..data.class_images import ClassImageSpec, class_dir_for, generate_class_images
    from ..data.images import load_image_folder
    from ..data.sample_set import write_fabric_samples

    work = Path(tempfile.mkdtemp(prefix="dreamloom-bench-"))
    factory = build_tiny if base_model == "tiny" else (lambda: load_base_model(base_model))
    comps = factory()
    res = resolution or (comps.native_resolution if comps.kind == "tiny" else 512)
    write_fabric_samples(work / "instance", size=max(res, 128))
    instance = load_image_folder(work / "instance", res, False)
    cfg = TrainConfig(
        base_model=base_model,
        instance_dir=str(work / "instance"),
        resolution=res,
        rank=4,
        alpha=4.0,
        train_batch_size=1,
        with_prior_preservation=True,
        num_class_images=8,
        class_steps=4,
        checkpoint_every=0,
        sample_every=0,
        # the tutorial loop it is compared with runs in fp32, without checkpointing
        **{"mixed_precision": "no", "gradient_checkpointing": False, **(cfg_overrides or {})},
    ).validate()
    spec = ClassImageSpec(
        comps.fingerprint, cfg.class_prompt, "", cfg.class_sampler, cfg.class_steps, cfg.class_guidance, res, cfg.seed
    )
    class_dir = class_dir_for(work, spec)
    generate_class_images(comps, spec, cfg.num_class_images, class_dir)
    class_images = load_image_folder(class_dir, res, False).images

    print(
        f"bench: {base_model} at {res}px, rank {cfg.rank}, batch 1, prior preservation on; {warmup} warm-up + "
        f"{steps} steps, "
        f"{repeats} alternating repeats",
        file=sys.stderr,
    )
    results = {"ours": [], "baseline": []}
    ours_cfg = TrainConfig.from_dict({**cfg.to_dict(), "torch_compile": compile_unet}) if compile_unet else cfg
    for r in range(repeats):
        results["ours"].append(run_ours(ours_cfg, factory, instance, class_dir, warmup, steps))
        results["baseline"].append(run_baseline(cfg, factory, instance, class_images, warmup, steps))
        print(
            f"  repeat {r + 1}: ours {results['ours'][-1]['steps_per_s']:.2f} steps/s, "
            f"baseline {results['baseline'][-1]['steps_per_s']:.2f} steps/s",
            file=sys.stderr,
        )

    def summary(runs):
        return {
            "steps_per_s": statistics.median(x["steps_per_s"] for x in runs),
            "peak_rss_mb": max(x["peak_rss"] for x in runs) / 2**20,
            "peak_cuda_mb": (max(x["peak_cuda"] for x in runs) / 2**20) if runs[0]["peak_cuda"] is not None else None,
            "phases_ms": {k: 1000 * statistics.median(x["phases"][k] for x in runs) for k in PHASES},
        }

    report = {
        "base_model": base_model,
        "resolution": res,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "torch_compile": compile_unet,
        "device": best_device().type,
        "ours": summary(results["ours"]),
        "baseline": summary(results["baseline"]),
    }
    report["speedup"] = report["ours"]["steps_per_s"] / report["baseline"]["steps_per_s"]
    report["peak_rss_ratio"] = report["ours"]["peak_rss_mb"] / report["baseline"]["peak_rss_mb"]

    if morph:
        from ..inference.morph import MorphSpec, bench_morph
        from ..inference.pipelines import make_pipeline

        pipe = make_pipeline(factory())
        spec_m = MorphSpec(seconds=1.0, fps=24, steps=8, resolution=res)
        report["morph"] = bench_morph(pipe, spec_m, n_frames=24, batch_size=8, repeats=repeats)

    print(format_report(report))
    if out:
        from ..files.atomic import atomic_write_text

        atomic_write_text(out, json.dumps(report, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    return report


def format_report(r: dict) -> str:
    o, b = r["ours"], r["baseline"]
    lines = [
        f"training ({r['base_model']}, {r['resolution']}px, "
        f"{r['device']}{', ours with torch.compile' if r.get('torch_compile') else ''}), median of {r['repeats']}:",
        f"  ours      {o['steps_per_s']:8.2f} steps/s   peak RSS {o['peak_rss_mb']:8.1f} MB",
        f"  baseline  {b['steps_per_s']:8.2f} steps/s   peak RSS {b['peak_rss_mb']:8.1f} MB   (tutorial loop)",
        f"  speed ratio (ours / baseline): {r['speedup']:.2f}x   peak RSS ratio: {r['peak_rss_ratio']:.2f}",
    ]
    if o.get("peak_cuda_mb") is not None:
        lines.append(f"  peak CUDA: ours {o['peak_cuda_mb']:.0f} MB, baseline {b['peak_cuda_mb']:.0f} MB")
    lines.append("  per-step phase times (ms):   " + "  ".join(f"{k:>12}" for k in PHASES))
    lines.append("    ours                       " + "  ".join(f"{o['phases_ms'][k]:12.2f}" for k in PHASES))
    lines.append("    baseline                   " + "  ".join(f"{b['phases_ms'][k]:12.2f}" for k in PHASES))
    if "morph" in r:
        m = r["morph"]
        lines.append(
            f"morph rendering ({m['frames']} frames): batched x{m['batch_size']} {m['batched_fps']:.2f} fps, "
            f"per-frame {m['per_frame_fps']:.2f} fps, ratio {m['ratio']:.2f}x"
        )
    return "\n".join(lines)
