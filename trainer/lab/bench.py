"""`python -m trainer bench`: our training step against a faithful re-implementation of the tutorial's loop and,
optionally, diffusers' own example script; plus batched vs per-frame morph rendering.

Every contender runs in a fresh Python process (`python -m trainer bench --run-one ROLE`, or diffusers' script),
one after the other, alternating for `repeats` rounds, so no contender inherits another's heap, caches or threads.
The instance and class images (and, for diffusers, a diffusers copy of the base model) are made before, in a
process of their own, which then also runs the morph benchmark. Each contender's glibc allocator settings are in
the environment it starts with (see `contender_plan` and `contender_env`), as our trainer gets them.

What is measured, the same way for each contender (bench_measure.py):

* the wall time of every step, from the end of one step to the end of the next (the median is reported). Our
  processes run the timed steps as training runs, with no device sync per phase, and mark the time (after a
  device sync) every 10 steps, each step of a window taking its mean; the per-phase times come from a few
  steps after the timed ones (StepMarks);
* minor page faults, kernel (system) and user CPU time over the timed steps (getrusage in our processes,
  /proc/<pid>/stat for diffusers' script), per step;
* peak resident memory while the timed steps run, sampled from /proc by this process, and the process's
  high-water mark (VmHWM) at the end of the last step;
* peak CUDA memory (torch's allocator) in our processes, and the GPU memory nvidia-smi reports for every one.

diffusers' script runs unchanged (bench_diffusers.py); its step ends are the times its tqdm bar (stderr) reaches
each step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from .. import cpu_malloc
from ..config import BUILTIN_RESOLUTION, TrainConfig
from ..errors import DreamLoomError
from .bench_diffusers import check_script, run_diffusers
from .bench_measure import (
    NOT_ON_CPU,
    PHASES,
    ContenderFailed,
    ProcSampler,
    StepMarks,
    child_env,
    kill_on_interrupt,
    log_tail,
    malloc_label,
    measure,
    process_peak,
    ratios,
    summarise,
)

ROLES = ("prepare", "ours", "tutorial", "unet", "square")
PHASE_STEPS = 3  # steps after the timed ones, with each phase timed (see StepMarks)
MALLOC_CHOICES = ("tuned", "default", "both", "all")


# --------------------------------------------------------------------------------------------- child processes
def run_one(role: str, spec_path: str, out_path: str) -> None:
    """Run one contender (or the preparation) in this fresh process; write its JSON."""
    from ..files.atomic import atomic_write_text

    spec = json.loads(Path(spec_path).read_text())
    if role not in ROLES:
        raise DreamLoomError(f"Unknown bench role {role!r}.", f"Use one of {', '.join(ROLES)}.")
    result = {
        "prepare": _prepare,
        "ours": _run_ours,
        "tutorial": _run_tutorial,
        "unet": _run_bare_unet,
        "square": lambda s: _run_ours(s, square=True),
    }[role](spec)
    result["pid"] = os.getpid()
    atomic_write_text(out_path, json.dumps(result, indent=2))


def _factory(base_model: str, as_trained: bool = False):
    """A loader of the base model: in fp32, or `as_trained` in the dtype `train` loads it in (the file's, placed by
    the Trainer), so ours' process peak is train's."""
    from ..base_models.builtin import build_tiny
    from ..base_models.load import load_base_model, stored_dtype

    if base_model == "tiny":
        return build_tiny
    return lambda: load_base_model(base_model, dtype=stored_dtype(base_model) if as_trained else None)


def _prepare(req: dict) -> dict:
    """Instance images, class images and (for diffusers' script) a diffusers folder of the base model; then the
    morph benchmark, when asked for, which needs a process with a model too."""
    import torch

    from ..data.class_images import ClassImageSpec, class_dir_for, generate_class_images
    from ..data.sample_set import write_fabric_samples
    from ..training.precision import best_device

    work = Path(req["work"])
    comps = _factory(req["base_model"])()
    res = req["resolution"] or (comps.native_resolution if comps.kind == "tiny" else 512)
    write_fabric_samples(work / "instance", size=max(res, 128))
    cfg = TrainConfig(
        base_model=req["base_model"],
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
        # every contender runs these; auto: fp16 on a GPU (the budgets' setting), fp32 on a CPU
        **{"mixed_precision": "auto", "gradient_checkpointing": False, **req["cfg_overrides"]},
    )
    if cfg.mixed_precision == "auto":
        cfg.mixed_precision = "fp16" if best_device().type == "cuda" else "no"
    cfg.validate()
    spec = ClassImageSpec.for_training(cfg, comps.fingerprint)
    class_dir = class_dir_for(work, spec)
    generate_class_images(comps, spec, cfg.num_class_images, class_dir, device=best_device())
    out = {
        "cfg": cfg.to_dict(),
        "base_model": req["base_model"],
        "resolution": res,
        "class_dir": str(class_dir),
        "fingerprint": comps.fingerprint,
        "device": best_device().type,
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    if req.get("buckets"):
        out.update(_mixed_shapes(work / "instance-mixed", res, out["cfg"]))
    if req["diffusers"]:
        out.update(_diffusers_inputs(req["base_model"], comps, work, class_dir))
    if req["morph"]:
        out["morph"] = _run_morph(comps, res, req["repeats"])
    return out


def _mixed_shapes(folder: Path, res: int, cfg: dict) -> dict:
    """--compare-buckets: the fabric images cut to landscape 3:2, portrait 2:3 and square, in turn, and the
    settings that train them at their buckets (ours) or centre-cropped square (square)."""
    from ..data.sample_set import COUNT, fabric_image

    folder.mkdir(parents=True, exist_ok=True)
    side = max(res, 128) * 3 // 2
    for i in range(COUNT):
        width, height = [(side, side * 2 // 3), (side * 2 // 3, side), (side, side)][i % 3]
        fabric_image(i, side).crop((0, 0, width, height)).save(folder / f"mixed_{i:02d}.png")
    # at least three buckets at any resolution: a quarter of the side at small ones, 64 px from 256 px up
    step = 64 if res >= 256 else max(8, res // 4 // 8 * 8)
    cfg.update(instance_dir=str(folder), aspect_buckets=True, bucket_step=step, cache_latents=True)
    return {"cfg": cfg, "mixed_dir": str(folder)}


def _diffusers_inputs(base_model: str, comps, work: Path, class_dir: Path) -> dict:
    """Folders of images only (diffusers' script reads every file in them as an image) and a diffusers folder
    of the base model, for diffusers' script."""
    from ..data.images import list_image_files

    out = {}
    for name, src in (("instance", work / "instance"), ("class", class_dir)):
        dest = work / "diffusers" / name
        dest.mkdir(parents=True, exist_ok=True)
        for path in list_image_files(src):
            shutil.copy2(path, dest / path.name)
        out[f"diffusers_{name}_dir"] = str(dest)
    out["diffusers_class_count"] = len(list_image_files(work / "diffusers" / "class"))
    base = Path(base_model).expanduser()
    if base.is_dir():
        out["diffusers_model"] = str(base)
    else:  # a single file or a built-in model: save the loaded modules as a diffusers folder, once
        folder = work / "diffusers" / "model"
        pipe = comps.family.pipeline(comps, comps.noise_scheduler())
        pipe.save_pretrained(str(folder), safe_serialization=True)
        out["diffusers_model"] = str(folder)
    return out


def _versions() -> dict:
    import platform

    import diffusers
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}


def _cuda_peak_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak():
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


class _PhaseSteps:
    """The timer the bench's loops get: a PhaseTimer that times phases (waiting for the device around each) only
    once `timing_phases` is on, in the phase steps after the timed ones (StepMarks turns it on); until then a
    phase costs nothing, so the timed steps run as training runs."""

    def __init__(self, device_type: str):
        from ..training.timing import PhaseTimer

        self.inner = PhaseTimer(device_type)
        self.totals = self.inner.totals
        self.timing_phases = False
        self.step_times: list[float] = []

    def __call__(self, name: str):
        return self.inner(name) if self.timing_phases else contextlib.nullcontext()


def _bench_timer(device_type: str, warmup: int, steps: int) -> tuple[_PhaseSteps, StepMarks]:
    import torch

    timer = _PhaseSteps(device_type)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    timer.step_times = marks = StepMarks(timer, warmup, steps, sync=sync)
    return timer, marks


def _loop_result(timer, marks: StepMarks, warmup: int, malloc: str) -> dict:
    return {
        "marks": marks.marks,  # (step, mark) at the end of the warm-up, every 10 timed steps and the last
        "loop_step_times": list(marks),  # the loop's own timing of each step (without its end-of-step work)
        "phases": {k: timer.totals.get(k, 0.0) / max(marks.phase_steps, 1) for k in PHASES},
        "peak_rss_process": process_peak(),
        "peak_cuda": _cuda_peak(),
        "malloc": malloc,
    }


def _watch_unet_input(unet) -> list:
    """Filled with the shape of the UNet's first input at its first call: the floor must see ours' batch shape."""
    seen: list = []

    def record(_module, args, kwargs):  # removes itself: nothing is left on the timed steps' path
        seen.extend((args[0] if args else kwargs["sample"]).shape)
        handle.remove()

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def _run_ours(spec: dict, square: bool = False) -> dict:
    """The real Trainer loop (caches, one concatenated UNet pass); square: aspect-ratio buckets off."""
    from ..training.loop import Trainer
    from ..training.precision import best_device

    warmup, steps = spec["warmup"], spec["steps"]
    total = warmup + steps + PHASE_STEPS
    settings = {"max_train_steps": total, "torch_compile": bool(spec.get("compile"))}
    if square:
        settings["aspect_buckets"] = False
    cfg = TrainConfig.from_dict({**spec["cfg"], **settings})
    comps = _factory(spec["base_model"], as_trained=True)()
    timer, marks = _bench_timer(best_device().type, warmup, steps)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, comps=comps, class_dir=spec["class_dir"], timer=timer, bench=True)
        unet_input = _watch_unet_input(comps.unet)
        _cuda_peak_reset()
        trainer.run()
        result = _loop_result(timer, marks, warmup, trainer.settings.get("malloc", NOT_ON_CPU))
        result["buckets"] = trainer.buckets.table()
        result["unet_input"] = unet_input
    return result


def _run_tutorial(spec: dict) -> dict:
    """The tutorial's loop (exercise3b_train_lora.py), re-implemented on our model and data:

    * VAE-encodes the instance image and the class image separately at every step (latent_dist.sample());
    * runs the text encoder on the instance and the class prompt at every step;
    * one shared timestep for the pair, and two separate UNet passes;
    * loss = mse(instance) + prior_weight * mse(class), fp32;
    * AdamW over all UNet parameters (the frozen ones get no gradients), as the tutorial passes them.
    It uses our LoRA config and learning rate, so the maths per step matches ours. Its allocator settings are
    those of its environment (see contender_env), as ours are.
    """
    import torch

    from ..training.precision import best_device

    cfg = TrainConfig.from_dict(spec["cfg"])
    warmup, steps = spec["warmup"], spec["steps"]
    device = best_device()
    m = _tutorial_setup(cfg, spec, device)
    timer, marks = _bench_timer(device.type, warmup, steps)
    g = torch.Generator().manual_seed(cfg.seed)
    _cuda_peak_reset()
    for _ in range(warmup + steps + PHASE_STEPS):
        t0 = time.perf_counter()
        _tutorial_step(m, cfg, timer, g, device)
        marks.append(time.perf_counter() - t0)
    return _loop_result(timer, marks, warmup, malloc_label(device.type))


def _tutorial_setup(cfg: TrainConfig, spec: dict, device) -> SimpleNamespace:
    """The tutorial's model on `device`, its optimizer, its images as tensors and its prompts' token ids."""
    import torch

    from ..data.images import crop_resize, load_image_folder, pil_to_tensor
    from ..training.methods.lora import LoRAMethod

    comps = _factory(spec["base_model"])()
    instance_set = load_image_folder(cfg.instance_dir, cfg.resolution, False)
    class_images = load_image_folder(spec["class_dir"], cfg.resolution, False).images[: cfg.num_class_images]
    torch.manual_seed(cfg.seed)
    LoRAMethod(cfg).setup(comps)
    unet, vae, te, tok = comps.unet.to(device), comps.vae.to(device), comps.text_encoder.to(device), comps.tokenizer
    unet.train()
    return SimpleNamespace(
        unet=unet,
        vae=vae,
        te=te,
        sched=comps.noise_scheduler(),
        opt=torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8),
        inst=[pil_to_tensor(crop_resize(im, cfg.resolution)) for im in instance_set.images],
        cls=[pil_to_tensor(crop_resize(im, cfg.resolution)) for im in class_images],
        ids_i=comps.family.tokenize(tok, [cfg.instance_prompt]).to(device),
        ids_c=comps.family.tokenize(tok, [cfg.class_prompt]).to(device),
    )


def _tutorial_step(m: SimpleNamespace, cfg: TrainConfig, timer, g, device) -> None:
    """One step of the tutorial's loop, each phase timed."""
    import torch
    import torch.nn.functional as F

    with timer("data"):
        idx = int(torch.randint(0, max(len(m.inst), len(m.cls)), (1,), generator=g))
        pi, pc = m.inst[idx % len(m.inst)][None].to(device), m.cls[idx % len(m.cls)][None].to(device)
    with timer("vae"), torch.no_grad():
        li = m.vae.encode(pi).latent_dist.sample() * m.vae.config.scaling_factor
        lc = m.vae.encode(pc).latent_dist.sample() * m.vae.config.scaling_factor
    ni, nc = torch.randn_like(li), torch.randn_like(lc)
    t = torch.randint(0, m.sched.config.num_train_timesteps, (1,), device=device)
    with timer("text_encoder"), torch.no_grad():
        ei, ec = m.te(m.ids_i)[0], m.te(m.ids_c)[0]
    with timer("unet_forward"):
        pred_i = m.unet(m.sched.add_noise(li, ni, t), t, ei).sample
        pred_c = m.unet(m.sched.add_noise(lc, nc, t), t, ec).sample
        loss = F.mse_loss(pred_i.float(), ni.float()) + cfg.prior_loss_weight * F.mse_loss(pred_c.float(), nc.float())
    with timer("backward"):
        loss.backward()
    with timer("optimizer"):
        m.opt.step()
        m.opt.zero_grad()
    loss.item()  # the loss read-back every loop does (ours reads its losses back once per step on a CPU)


def _run_bare_unet(spec: dict) -> dict:
    """The floor for ours: only the UNet's forward and backward and AdamW over the same LoRA, on a batch of the
    same shape as ours (instance + class rows in one pass), made once before the loop: no data, no caches, no
    loss weighting, no logging. The model loaded, its frozen weights placed (half_frozen_convs included) and
    autocast as ours does."""
    import torch
    import torch.nn.functional as F

    from ..training.half_convs import resolve_half_frozen_convs
    from ..training.methods.lora import LoRAMethod
    from ..training.precision import WEIGHT_DTYPES, CudnnBenchmark, best_device, place_trainable_module

    cfg = TrainConfig.from_dict(spec["cfg"])
    warmup, steps = spec["warmup"], spec["steps"]
    device = best_device()
    comps = _factory(spec["base_model"], as_trained=True)()
    torch.manual_seed(cfg.seed)
    LoRAMethod(cfg).setup(comps)
    unet = comps.unet
    frozen_dtype = WEIGHT_DTYPES.get(cfg.mixed_precision, torch.float32)
    half_convs, _ = resolve_half_frozen_convs(cfg.half_frozen_convs, device, frozen_dtype, cfg.torch_compile)
    place_trainable_module(unet, device, frozen_dtype, half_convs)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    CudnnBenchmark(cfg.cudnn_benchmark, device)  # as ours; the process ends with the bench, so never put back
    # the VAE's pixels per latent cell: 8 for SD1.5/SDXL, 4 for tiny-fabric's three-level VAE
    side = cfg.resolution // 2 ** (len(comps.vae.config.block_out_channels) - 1)
    del comps
    rows = 2 * cfg.train_batch_size  # instance + prior rows, as ours concatenates them
    g = torch.Generator().manual_seed(cfg.seed)
    latents = torch.randn((rows, unet.config.in_channels, side, side), generator=g).to(device)
    noise = torch.randn(latents.shape, generator=g).to(device)
    context = torch.randn((rows, 77, unet.config.cross_attention_dim), generator=g).to(device, frozen_dtype)
    timesteps = torch.randint(0, 1000, (rows,), generator=g).to(device)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    autocast = torch.autocast(device.type, dtype=frozen_dtype, enabled=frozen_dtype != torch.float32)
    timer, marks = _bench_timer(device.type, warmup, steps)
    _cuda_peak_reset()
    for _ in range(warmup + steps + PHASE_STEPS):
        t0 = time.perf_counter()
        with timer("unet_forward"), autocast:
            loss = F.mse_loss(unet(latents, timesteps, context).sample.float(), noise)
        with timer("backward"):
            loss.backward()
        with timer("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss.item()
        marks.append(time.perf_counter() - t0)
    return {**_loop_result(timer, marks, warmup, malloc_label(device.type)), "unet_input": list(latents.shape)}


def _run_morph(comps, resolution: int, repeats: int) -> dict:
    """Batched against per-frame morph rendering (inference/morph.py:bench_morph)."""
    from ..inference.morph import MorphSpec, bench_morph
    from ..inference.pipelines import make_pipeline
    from ..training.precision import to_inference_device

    pipe = make_pipeline(comps)
    to_inference_device(pipe)  # as `python -m trainer morph` renders: on the GPU in half precision when there is one
    spec_m = MorphSpec(seconds=1.0, fps=24, steps=8, resolution=resolution)
    return bench_morph(pipe, spec_m, n_frames=24, batch_size=8, repeats=repeats)


# --------------------------------------------------------------------------------------------- the parent
def contender_plan(malloc: str, script: Path | None, buckets: bool = False) -> list[tuple[str, str, bool]]:
    """(name, role, tuned) of each contender, in the order a round runs them. tuned: our glibc settings from
    the process's start (see contender_env). diffusers' script runs in the default environment but in "all",
    which adds it once more tuned; "both" and "all" add ours once more with glibc's defaults. buckets: ours on
    images of mixed shapes at their buckets against the same images square, and nothing else."""
    tuned = malloc != "default"
    if buckets:
        return [("ours", "ours", tuned), ("square", "square", tuned)]
    plan = [("ours", "ours", tuned)]
    if malloc in ("both", "all"):
        plan.append(("ours-malloc-default", "ours", False))
    plan.append(("tutorial", "tutorial", tuned))
    plan.append(("unet", "unet", tuned))  # the floor: the UNet's forward, backward and AdamW alone
    if script is not None:
        plan.append(("diffusers", "diffusers", False))  # the target: diffusers run unchanged, default environment
        if malloc == "all":
            plan.append(("diffusers-tuned", "diffusers", True))
    return plan


def contender_env(tuned: bool, device: str) -> dict:
    """The whole environment a contender starts with. Tuned, on a CPU: our settings in GLIBC_TUNABLES, as
    `python -m trainer` and the job runner give training on a CPU. Otherwise none of our settings (training off
    a CPU is not tuned), and an untuned contender also gets DREAMLOOM_MALLOC=default, so that our trainer does
    not tune itself."""
    env = child_env()
    env.pop(cpu_malloc.OPT_OUT, None)  # the plan decides, not this process's environment
    if tuned and device == "cpu":
        return cpu_malloc.with_tuned_malloc(env)
    # this process may run with our settings itself (`python -m trainer` re-executes with them): leave them out
    kept = [item for item in env.pop("GLIBC_TUNABLES", "").split(":") if item.partition("=")[0] not in cpu_malloc.TUNED]
    if any(kept):
        env["GLIBC_TUNABLES"] = ":".join(filter(None, kept))
    return env if tuned else {**env, cpu_malloc.OPT_OUT: "default"}


def _spawn(role: str, spec_path: Path, work: Path, tag: str, env: dict | None = None, gpu: bool = False):
    """Run `python -m trainer bench --run-one ROLE` with `env` (default: child_env()) to completion, sampling its
    memory; (result, sampler, t0)."""
    out, log = work / f"{tag}.json", work / f"{tag}.log"
    cmd = [sys.executable, "-m", "trainer", "bench", "--run-one", role, "--spec", str(spec_path), "--json", str(out)]
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env or child_env(), cwd=work)
        with ProcSampler(proc.pid, gpu=gpu) as sampler:
            kill_on_interrupt(proc, proc.wait)
            rc = proc.returncode
    if rc != 0 or not out.exists():
        raise ContenderFailed(
            f"bench: the {tag} process failed (exit code {rc}). The end of its log ({log}):\n{log_tail(log)}",
            "Fix what the log says; the bench's folder is kept for inspection.",
        )
    result = json.loads(out.read_text())
    result["process_wall_s"] = time.monotonic() - t0
    return result, sampler, t0


def _run_loop_contender(role: str, spec_path: Path, work: Path, tag: str, env: dict, spec: dict) -> dict:
    raw, sampler, t0 = _spawn(role, spec_path, work, tag, env, gpu=spec["device"] == "cuda")
    marks = {n: m for n, m in raw["marks"]}
    run = measure(raw, marks, spec["warmup"], sampler, t0)
    run["loop_step_times"] = raw["loop_step_times"][spec["warmup"] :]
    run["buckets"] = raw.get("buckets")  # the bucket table the run trained on
    run["unet_input"] = raw.get("unet_input")  # the batch's shape as the UNet got it (the floor's must equal ours')
    return run


def _run_rounds(plan: list, script: Path | None, spec: dict, spec_path: Path, work: Path) -> dict[str, list]:
    """Every contender of the plan, each in a fresh process, `repeats` rounds; name -> its runs."""
    runs: dict[str, list] = {name: [] for name, _, _ in plan}
    for r in range(spec["repeats"]):
        for name, role, tuned in plan:
            env, tag = contender_env(tuned, spec["device"]), f"{name}-{r + 1}"
            if role == "diffusers":
                runs[name].append(run_diffusers(script, spec, work, tag, env))
            else:
                runs[name].append(_run_loop_contender(role, spec_path, work, tag, env, spec))
        print(
            f"  round {r + 1}: " + ", ".join(f"{name} {runs[name][-1]['median_step_s']:.3f} s/step" for name in runs),
            file=sys.stderr,
        )
    return runs


def _check_args(steps: int, warmup: int, repeats: int, malloc: str | None, compare_diffusers: str | None):
    """The path of diffusers' script (or None); refuses bad arguments before any work."""
    if warmup < 1 or steps < 1 or repeats < 1:
        raise DreamLoomError("bench needs --warmup, --steps and --repeats of 1 or more.", "Use the defaults 5, 30, 3.")
    if malloc is not None and malloc not in MALLOC_CHOICES:
        raise DreamLoomError(f"Unknown --malloc {malloc!r}.", f"Use one of {', '.join(MALLOC_CHOICES)}.")
    script = Path(compare_diffusers).expanduser().resolve() if compare_diffusers else None
    if script is not None and not script.is_file():
        raise DreamLoomError(
            f"--compare-diffusers {compare_diffusers}: no such file.",
            "Give the path of diffusers' examples/dreambooth/train_dreambooth_lora.py.",
        )
    if script is not None:
        check_script(script)  # its imports and check_min_version, before minutes of work by the other contenders
    return script


def _prepare_in_process(
    work: Path, base_model: str, resolution, cfg_overrides, script, morph: bool, repeats: int, buckets: bool = False
):
    """Run the preparation in its own process; (the spec every contender reads, the morph result or None)."""
    # the processes run in the bench's folder: give them the model's absolute path
    model_arg = base_model if base_model in BUILTIN_RESOLUTION else str(Path(base_model).expanduser().resolve())
    request = {
        "work": str(work),
        "base_model": model_arg,
        "resolution": resolution,
        "cfg_overrides": cfg_overrides or {},
        "diffusers": script is not None,
        "morph": morph,
        "repeats": repeats,
        "buckets": buckets,
    }
    (work / "request.json").write_text(json.dumps(request))
    print(
        f"bench: preparing images{', a diffusers folder' if script else ''}{', morph' if morph else ''} in {work}",
        file=sys.stderr,
    )
    spec, _, _ = _spawn("prepare", work / "request.json", work, "prepare")
    return spec, spec.pop("morph", None)


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
    malloc: str | None = None,
    compare_diffusers: str | None = None,
    contenders: list[str] | None = None,
    compare_buckets: bool = False,
) -> dict:
    """Prepare the data in one process, then run the contenders, each in a fresh process, `repeats` rounds.

    malloc: "tuned" (ours and the tutorial loop with our glibc settings from their start, as our trainer runs on
    a CPU; diffusers' script in the default environment), "default" (glibc's defaults for all), "both" (tuned,
    plus ours once more with glibc's defaults) or "all" (both, plus diffusers' script once more with our
    settings); None: both on a Linux CPU, else tuned. Off a CPU nobody is tuned. contenders: the names of the
    plan's contenders to run (ours always runs); None: all of them. compare_buckets: ours on images of mixed
    shapes at their aspect-ratio buckets against the same images centre-cropped square (both cached), and
    nothing else.
    """
    script = _check_args(steps, warmup, repeats, malloc, compare_diffusers)
    work = Path(tempfile.mkdtemp(prefix="dreamloom-bench-"))
    keep = False
    try:  # removed however the bench ends (an error, Ctrl-C, SIGTERM), unless a contender's log is to be read
        spec, morph_result = _prepare_in_process(
            work, base_model, resolution, cfg_overrides, script, morph, repeats, compare_buckets
        )
        spec.update(warmup=warmup, steps=steps, repeats=repeats, compile=compile_unet)
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        if malloc is None:
            malloc = "both" if spec["device"] == "cpu" and sys.platform.startswith("linux") else "tuned"
        plan = contender_plan(malloc, script, compare_buckets)
        plan = [c for c in plan if contenders is None or c[0] in ("ours", *contenders)]
        print(
            f"bench: {base_model} at {spec['resolution']}px on {spec['device']}, rank 4, batch 1, "
            "prior preservation on; "
            f"{warmup} warm-up + {steps} timed steps; {repeats} rounds of {', '.join(name for name, _, _ in plan)}, "
            f"each in a fresh process; malloc {malloc}",
            file=sys.stderr,
        )
        runs = _run_rounds(plan, script, spec, spec_path, work)
        report = build_report(base_model, spec, malloc, script, runs)
        if morph_result is not None:
            report["morph"] = morph_result
        print(format_report(report))
        if out:
            from ..files.atomic import atomic_write_text

            atomic_write_text(out, json.dumps(report, indent=2))
            print(f"wrote {out}", file=sys.stderr)
    except ContenderFailed:
        keep = True
        raise
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return report


# --------------------------------------------------------------------------------------------- the report
def build_report(base_model: str, spec: dict, malloc: str, script: Path | None, runs: dict[str, list]) -> dict:
    """The JSON report: the settings, each contender's summary and runs, and ours / each other contender."""
    contenders = {name: {"summary": summarise(r), "runs": r} for name, r in runs.items()}
    ours = contenders["ours"]["summary"]
    return {
        "base_model": base_model,
        "resolution": spec["resolution"],
        "steps": spec["steps"],
        "warmup": spec["warmup"],
        "repeats": spec["repeats"],
        "torch_compile": spec["compile"],
        "device": spec["device"],
        "torch_threads": spec["torch_threads"],
        "cpu_count": os.cpu_count(),
        "versions": spec["versions"],
        "malloc": malloc,
        "glibc_tunables_env": os.environ.get("GLIBC_TUNABLES"),
        "diffusers_script": str(script) if script else None,
        "contenders": contenders,
        "ratios": {f"ours/{n}": ratios(ours, contenders[n]["summary"]) for n in contenders if n != "ours"},
        "buckets": {n: c["runs"][0].get("buckets") for n, c in contenders.items()} if "square" in contenders else None,
    }


def _mb(value) -> str:
    return f"{value:9.0f} MB" if value is not None else f"{'-':>12}"


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio < 1000 else ">1000x"


def format_report(r: dict) -> str:
    contenders = r["contenders"]
    n = next(iter(contenders.values()))["summary"]["timed_steps"]
    lines = [
        f"training ({r['base_model']}, {r['resolution']}px, {r['device']}, {r['torch_threads']} torch threads"
        f"{', ours with torch.compile' if r.get('torch_compile') else ''}): each contender in fresh processes; "
        f"median of {n} steps ({r['repeats']} x {r['steps']}) after {r['warmup']} warm-up",
        f"  {'contender':<20} {'s/step':>8} {'steps/s':>8} {'faults/step':>12} {'sys s/step':>10} "
        f"{'user s/step':>11} {'peak RSS':>12} {'proc. peak':>12} {'peak CUDA':>12}  malloc",
    ]
    if r.get("buckets"):
        lines.append(
            f"  ours: {r['buckets']['ours']} (aspect-ratio buckets, cached); square: the same images centre-cropped "
            f"to {r['buckets']['square']}"
        )
    for name, c in contenders.items():
        s = c["summary"]
        cuda = s["peak_cuda_mb"] if s["peak_cuda_mb"] is not None else s["peak_gpu_process_mb"]
        lines.append(
            f"  {name:<20} {s['median_step_s']:8.3f} {s['steps_per_s']:8.2f} {s['faults_per_step']:12.0f} "
            f"{s['sys_s_per_step']:10.3f} {s['user_s_per_step']:11.3f} {_mb(s['peak_rss_mb'])} "
            f"{_mb(s['peak_rss_process_mb'])} {_mb(cuda)}  {s['malloc']}"
        )
    lines.append(
        "  peak RSS: while the timed steps run; proc. peak: the process's high-water mark by its last step "
        "(loading included)"
    )
    if any(c["summary"]["peak_gpu_process_mb"] is not None for c in contenders.values()):
        lines.append(
            "  GPU memory nvidia-smi shows per process: "
            + ", ".join(f"{k} {_mb(c['summary']['peak_gpu_process_mb']).strip()}" for k, c in contenders.items())
        )
    for key, q in r["ratios"].items():
        parts = [f"step time {_x(q['step_time'])} ({_x(q['speedup'])} the speed)"]
        for label, field in (("faults", "faults"), ("sys CPU", "sys_cpu"), ("peak RSS", "peak_rss")):
            if q[field] is not None:
                parts.append(f"{label} {_x(q[field])}")
        if q["peak_cuda"] is not None:
            parts.append(f"peak CUDA {_x(q['peak_cuda'])}")
        elif q["peak_gpu_process"] is not None:
            parts.append(f"GPU memory {_x(q['peak_gpu_process'])}")
        lines.append(f"  {key:<24} " + ", ".join(parts))
    with_phases = [(k, c["summary"]["phases_ms"]) for k, c in contenders.items() if c["summary"]["phases_ms"]]
    if with_phases:
        lines.append(f"  per-step phase times (ms): {'':>6}" + "  ".join(f"{k:>12}" for k in PHASES))
        for name, phases in with_phases:
            lines.append(f"    {name:<30}" + "  ".join(f"{phases[k]:12.2f}" for k in PHASES))
    if "morph" in r:
        m = r["morph"]
        lines.append(
            f"morph rendering ({m['frames']} frames): batched x{m['batch_size']} {m['batched_fps']:.2f} fps, "
            f"per-frame {m['per_frame_fps']:.2f} fps, ratio {m['ratio']:.2f}x"
        )
    return "\n".join(lines)
