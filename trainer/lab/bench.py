"""`python -m trainer bench`: our training step against a faithful re-implementation of the tutorial's loop and,
optionally, diffusers' own example script; plus batched vs per-frame morph rendering.

Every contender runs in a fresh Python process (`python -m trainer bench --run-one ROLE`), one after the other,
alternating for `repeats` rounds, so no contender inherits another's heap, caches or threads. The instance and
class images (and, for diffusers, a diffusers copy of the base model) are made before, in a process of their own,
which then also runs the morph benchmark; allocator settings are set per contender (see `bench`).

What is measured, the same way for each contender:

* the wall time of every step, from the end of one step to the end of the next (the median is reported);
* minor page faults, kernel (system) and user CPU time over the timed steps (getrusage in our processes,
  /proc/<pid>/stat for diffusers' script), per step;
* peak resident memory while the timed steps run, sampled from /proc by this process, and the process's
  high-water mark (VmHWM) at the end of the last step;
* peak CUDA memory (torch's allocator) in our processes, and the GPU memory nvidia-smi reports for every one.

diffusers' script runs unchanged; its step ends are the times its tqdm bar (stderr) reaches each step.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    import resource
except ImportError:  # Windows
    resource = None

from ..config import BUILTIN_RESOLUTION, TrainConfig
from ..errors import DreamLoomError

PHASES = ("data", "vae", "text_encoder", "unet_forward", "backward", "optimizer")
ROLES = ("prepare", "ours", "tutorial")
MALLOC_CHOICES = ("tuned", "default", "both", "all")
# The same effect as training/precision.py:keep_freed_memory, for a process we cannot call mallopt in.
GLIBC_TUNED = "glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=33554432"
REPO_ROOT = Path(__file__).resolve().parents[2]
MB = 2**20


# --------------------------------------------------------------------------------------------- /proc readers
def read_status(pid: int | str = "self") -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in bytes from /proc/<pid>/status; None where there is no /proc or the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            text = fh.read()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            values[key] = int(value.split()[0]) * 1024
    if len(values) < 2:
        return None
    return values["VmRSS"], values["VmHWM"]


def read_counters(pid: int | str) -> tuple[int, float, float] | None:
    """(minor faults, system CPU s, user CPU s) of a whole process from /proc/<pid>/stat (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # fields[0] is field 3 (state) of proc(5)
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), int(fields[12]) / tick, int(fields[11]) / tick


def step_mark() -> list:
    """[monotonic time, minor faults, system CPU s, user CPU s, RSS bytes] of this process, now."""
    t = time.monotonic()
    status = read_status()
    rss = status[0] if status else None
    if resource is None:
        return [t, 0, 0.0, 0.0, rss]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return [t, ru.ru_minflt, ru.ru_stime, ru.ru_utime, rss]


class ProcSampler:
    """RSS and VmHWM of another process, sampled every `interval` seconds from /proc on a thread of this one
    (so the measured process runs no sampler); GPU memory from nvidia-smi every half second when asked."""

    def __init__(self, pid: int, interval: float = 0.01, gpu: bool = False):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, int]] = []  # (monotonic time, RSS, VmHWM)
        self.gpu_peak: int | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)]
        if gpu and shutil.which("nvidia-smi"):
            self._threads.append(threading.Thread(target=self._run_gpu, daemon=True))

    def _run(self):
        while not self._stop.is_set():
            status = read_status(self.pid)
            if status is not None:
                self.samples.append((time.monotonic(), *status))
            self._stop.wait(self.interval)

    def _run_gpu(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
            except (OSError, subprocess.SubprocessError):
                return
            used = nvidia_smi_used(out, self.pid)
            if used is not None:
                self.gpu_peak = max(self.gpu_peak or 0, used)
            self._stop.wait(0.5)

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def peak_rss(self, t0: float, t1: float) -> int | None:
        inside = [rss for t, rss, _ in self.samples if t0 <= t <= t1]
        return max(inside) if inside else None

    def hwm_at(self, t1: float) -> int | None:
        before = [hwm for t, _, hwm in self.samples if t <= t1]
        return max(before) if before else None


def nvidia_smi_used(out: str, pid: int) -> int | None:
    """Bytes of GPU memory nvidia-smi lists for `pid` (csv, noheader, nounits: "PID, MiB" lines), or None."""
    total = None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            total = (total or 0) + int(parts[1]) * MB
    return total


# --------------------------------------------------------------------------------------------- step marks
class StepMarks(list):
    """The list a loop appends each step's wall time to (PhaseTimer.step_times). Each append also takes a
    step_mark(), and once the warm-up steps are done the phase totals start again, so they cover the timed
    steps only."""

    def __init__(self, timer, warmup: int):
        super().__init__()
        self.timer, self.warmup, self.marks = timer, warmup, []

    def append(self, seconds: float) -> None:
        super().append(seconds)
        self.marks.append(step_mark())
        if len(self) == self.warmup:
            self.timer.totals.clear()


def per_step_rows(marks: dict[int, list], warmup: int) -> list[list[float]]:
    """[wall s, minor faults, system s, user s] for each step after `warmup`, from marks taken at the end of
    steps (step number -> mark). A step with no mark of its own (a tqdm line tqdm skipped) shares the interval
    it falls in equally with its neighbours."""
    ns = sorted(n for n in marks if n >= warmup)
    rows = []
    for a, b in zip(ns, ns[1:]):
        rows += [[(y - x) / (b - a) for x, y in zip(marks[a][:4], marks[b][:4])]] * (b - a)
    return rows


def window(marks: dict[int, list], warmup: int) -> tuple[float, float] | None:
    ns = sorted(n for n in marks if n >= warmup)
    return (marks[ns[0]][0], marks[ns[-1]][0]) if len(ns) >= 2 else None


# --------------------------------------------------------------------------------------------- child processes
def run_one(role: str, spec_path: str, out_path: str) -> None:
    """Run one contender (or the preparation) in this fresh process; write its JSON."""
    from ..files.atomic import atomic_write_text

    spec = json.loads(Path(spec_path).read_text())
    if role not in ROLES:
        raise DreamLoomError(f"Unknown bench role {role!r}.", f"Use one of {', '.join(ROLES)}.")
    result = {"prepare": _prepare, "ours": _run_ours, "tutorial": _run_tutorial}[role](spec)
    result["pid"] = os.getpid()
    atomic_write_text(out_path, json.dumps(result, indent=2))


def _factory(base_model: str):
    from ..base_models.builtin import build_tiny
    from ..base_models.load import load_base_model

    return build_tiny if base_model == "tiny" else (lambda: load_base_model(base_model))


def _prepare(req: dict) -> dict:
    """Instance images, class images and (for diffusers' script) a diffusers folder of the base model; then the
    morph benchmark, when asked for, which needs a process with a model too."""
    import torch

    from ..data.class_images import ClassImageSpec, class_dir_for, generate_class_images
    from ..data.images import list_image_files
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
        # the tutorial loop and diffusers' script run in fp32 here, without checkpointing
        **{"mixed_precision": "no", "gradient_checkpointing": False, **req["cfg_overrides"]},
    ).validate()
    spec = ClassImageSpec(
        comps.fingerprint,
        cfg.class_prompt,
        cfg.class_negative_prompt,
        cfg.class_sampler,
        cfg.class_steps,
        cfg.class_guidance,
        res,
        cfg.seed,
    )
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
    if req["diffusers"]:
        # diffusers' script reads every file in its image folders as an image: give it folders of images only
        for name, src in (("instance", work / "instance"), ("class", class_dir)):
            dest = work / "diffusers" / name
            dest.mkdir(parents=True, exist_ok=True)
            for path in list_image_files(src):
                shutil.copy2(path, dest / path.name)
            out[f"diffusers_{name}_dir"] = str(dest)
        out["diffusers_class_count"] = len(list_image_files(work / "diffusers" / "class"))
        base = Path(req["base_model"]).expanduser()
        if base.is_dir():
            out["diffusers_model"] = str(base)
        else:  # a single file or a built-in model: save the loaded modules as a diffusers folder, once
            folder = work / "diffusers" / "model"
            pipe = comps.family.pipeline(comps, comps.noise_scheduler())
            pipe.save_pretrained(str(folder), safe_serialization=True)
            out["diffusers_model"] = str(folder)
    if req["morph"]:
        out["morph"] = _run_morph(comps, res, req["repeats"])
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


def _process_peak() -> int | None:
    status = read_status()
    if status is not None:
        return status[1]
    if resource is None:
        return None
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _loop_result(timer, marks: StepMarks, warmup: int, malloc: str) -> dict:
    timed = max(len(marks) - warmup, 1)
    return {
        "marks": marks.marks,
        "loop_step_times": list(marks),  # the loop's own timing of each step (without its end-of-step work)
        "phases": {k: timer.totals.get(k, 0.0) / timed for k in PHASES},
        "peak_rss_process": _process_peak(),
        "peak_cuda": _cuda_peak(),
        "malloc": malloc,
    }


def _run_ours(spec: dict) -> dict:
    """The real Trainer loop (caches, one concatenated UNet pass)."""
    from ..training.loop import Trainer
    from ..training.precision import best_device
    from ..training.timing import PhaseTimer

    warmup, steps = spec["warmup"], spec["steps"]
    cfg = TrainConfig.from_dict(
        {**spec["cfg"], "max_train_steps": warmup + steps, "torch_compile": bool(spec.get("compile"))}
    )
    comps = _factory(spec["base_model"])()
    timer = PhaseTimer(best_device().type)
    timer.step_times = marks = StepMarks(timer, warmup)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, comps=comps, class_dir=spec["class_dir"], timer=timer, bench=True)
        _cuda_peak_reset()
        trainer.run()
        result = _loop_result(timer, marks, warmup, trainer.settings.get("malloc", "default (not on a CPU)"))
    return result


def _run_tutorial(spec: dict) -> dict:
    """The tutorial's loop (exercise3b_train_lora.py), re-implemented on our model and data:

    * VAE-encodes the instance image and the class image separately at every step (latent_dist.sample());
    * runs the text encoder on the instance and the class prompt at every step;
    * one shared timestep for the pair, and two separate UNet passes;
    * loss = mse(instance) + prior_weight * mse(class), fp32;
    * AdamW over all UNet parameters (the frozen ones get no gradients), as the tutorial passes them.
    It uses our LoRA config and learning rate, so the maths per step matches ours. On a CPU it gets the same
    allocator setting as ours (training/precision.py:keep_freed_memory, or DREAMLOOM_MALLOC=default).
    """
    import torch
    import torch.nn.functional as F

    from ..data.images import crop_resize, load_image_folder, pil_to_tensor
    from ..training.methods.lora import LoRAMethod
    from ..training.precision import best_device, keep_freed_memory
    from ..training.timing import PhaseTimer

    cfg = TrainConfig.from_dict(spec["cfg"])
    warmup, steps = spec["warmup"], spec["steps"]
    comps = _factory(spec["base_model"])()
    device = best_device()
    malloc = "default (not on a CPU)"
    if device.type == "cpu":
        malloc = "keep freed memory" if keep_freed_memory() else "default"
    instance_set = load_image_folder(cfg.instance_dir, cfg.resolution, False)
    class_images = load_image_folder(spec["class_dir"], cfg.resolution, False).images[: cfg.num_class_images]
    torch.manual_seed(cfg.seed)
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
    timer.step_times = marks = StepMarks(timer, warmup)
    g = torch.Generator().manual_seed(cfg.seed)
    _cuda_peak_reset()
    for _ in range(warmup + steps):
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
        loss.item()  # the loss read-back every loop does (ours reads its losses back once per step on a CPU)
        marks.append(time.perf_counter() - t0)
    return _loop_result(timer, marks, warmup, malloc)


def _run_morph(comps, resolution: int, repeats: int) -> dict:
    """Batched against per-frame morph rendering (inference/morph.py:bench_morph)."""
    from ..inference.morph import MorphSpec, bench_morph
    from ..inference.pipelines import make_pipeline

    pipe = make_pipeline(comps)
    spec_m = MorphSpec(seconds=1.0, fps=24, steps=8, resolution=resolution)
    return bench_morph(pipe, spec_m, n_frames=24, batch_size=8, repeats=repeats)


# --------------------------------------------------------------------------------------------- the parent
def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def _log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _spawn(role: str, spec_path: Path, work: Path, tag: str, env_extra: dict | None = None, gpu: bool = False):
    """Run `python -m trainer bench --run-one ROLE` to completion, sampling its memory; (result, sampler, t0)."""
    out, log = work / f"{tag}.json", work / f"{tag}.log"
    cmd = [sys.executable, "-m", "trainer", "bench", "--run-one", role, "--spec", str(spec_path), "--json", str(out)]
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_child_env(env_extra), cwd=work)
        with ProcSampler(proc.pid, gpu=gpu) as sampler:
            rc = proc.wait()
    if rc != 0 or not out.exists():
        raise DreamLoomError(
            f"bench: the {tag} process failed (exit code {rc}). The end of its log ({log}):\n{_log_tail(log)}",
            "Fix what the log says; the bench's folder is kept for inspection.",
        )
    result = json.loads(out.read_text())
    result["process_wall_s"] = time.monotonic() - t0
    return result, sampler, t0


def _measure(raw: dict, marks: dict[int, list], warmup: int, sampler: ProcSampler, t_start: float) -> dict:
    """One contender's run: its per-step rows and its memory, from its step marks and this process's samples."""
    rows = per_step_rows(marks, warmup)
    if not rows:
        raise DreamLoomError(
            "bench: a contender reported too few steps to time.", "Use --warmup 1 or more and --steps 1 or more."
        )
    t0, t1 = window(marks, warmup)
    in_window = [m[4] for n, m in marks.items() if n >= warmup and len(m) > 4 and m[4] is not None]
    peaks = [p for p in (sampler.peak_rss(t0, t1), *in_window) if p is not None]
    process_peak = raw.get("peak_rss_process") or sampler.hwm_at(t1)
    if process_peak is not None and peaks:  # VmHWM is kept lazily by the kernel: never below an RSS seen
        process_peak = max(process_peak, *peaks)
    walls = [r[0] for r in rows]
    return {
        "pid": raw["pid"],
        "malloc": raw.get("malloc"),
        "step_times": walls,
        "minor_faults": [r[1] for r in rows],
        "sys_s": [r[2] for r in rows],
        "user_s": [r[3] for r in rows],
        "median_step_s": statistics.median(walls),
        "faults_per_step": sum(r[1] for r in rows) / len(rows),
        "sys_s_per_step": sum(r[2] for r in rows) / len(rows),
        "user_s_per_step": sum(r[3] for r in rows) / len(rows),
        "peak_rss": max(peaks) if peaks else None,
        "peak_rss_process": process_peak,
        "peak_cuda": raw.get("peak_cuda"),
        "peak_gpu_process": sampler.gpu_peak,
        "phases": raw.get("phases"),
        "first_step_at_s": marks[min(marks)][0] - t_start if marks else None,
        "process_wall_s": raw.get("process_wall_s"),
    }


def _run_loop_contender(role: str, spec_path: Path, work: Path, tag: str, env_extra: dict, spec: dict) -> dict:
    raw, sampler, t0 = _spawn(role, spec_path, work, tag, env_extra, gpu=spec["device"] == "cuda")
    marks = {i + 1: m for i, m in enumerate(raw["marks"])}
    run = _measure(raw, marks, spec["warmup"], sampler, t0)
    run["loop_step_times"] = raw["loop_step_times"][spec["warmup"] :]
    return run


STEP_LINE = re.compile(r"Steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def parse_step_line(line: str) -> int | None:
    """The step count of one of diffusers' tqdm lines ("Steps:  40%|####  | 2/5 [00:03<...]"), else None."""
    m = STEP_LINE.search(line)
    return int(m.group(1)) if m else None


def diffusers_args(spec: dict, out_dir: Path) -> list[str]:
    """The arguments that make diffusers' train_dreambooth_lora.py train what ours trains: same model, images,
    prompts, class images (none generated), resolution, batch 1, rank, learning rate, optimizer, precision and
    seed; no validation, no checkpoints, logs kept local."""
    cfg = spec["cfg"]
    total = spec["warmup"] + spec["steps"]
    precision = cfg["mixed_precision"] if cfg["mixed_precision"] in ("no", "fp16", "bf16") else "no"
    args = [
        "--pretrained_model_name_or_path", spec["diffusers_model"],
        "--instance_data_dir", spec["diffusers_instance_dir"],
        "--instance_prompt", cfg["instance_prompt"],
        "--with_prior_preservation",
        "--class_data_dir", spec["diffusers_class_dir"],
        "--class_prompt", cfg["class_prompt"],
        "--num_class_images", str(spec["diffusers_class_count"]),
        "--prior_loss_weight", str(cfg["prior_loss_weight"]),
        "--output_dir", str(out_dir),
        "--seed", str(cfg["seed"]),
        "--resolution", str(spec["resolution"]),
        "--train_batch_size", "1",
        "--gradient_accumulation_steps", str(cfg["gradient_accumulation_steps"]),
        "--max_train_steps", str(total),
        "--checkpointing_steps", str(total + 1),
        "--learning_rate", str(cfg["learning_rate"]),
        "--lr_scheduler", "constant",
        "--adam_beta1", str(cfg["adam_beta1"]),
        "--adam_beta2", str(cfg["adam_beta2"]),
        "--adam_weight_decay", str(cfg["adam_weight_decay"]),
        "--adam_epsilon", str(cfg["adam_epsilon"]),
        "--max_grad_norm", str(cfg["max_grad_norm"]),
        "--rank", str(cfg["rank"]),
        "--mixed_precision", precision,
        "--dataloader_num_workers", "0",
        "--report_to", "tensorboard",  # written under output_dir only when tensorboard is installed; never online
    ]  # fmt: skip
    if cfg["center_crop"]:
        args.append("--center_crop")
    if cfg["gradient_checkpointing"]:
        args.append("--gradient_checkpointing")
    return args


def _run_diffusers(script: Path, spec: dict, work: Path, tag: str, tuned: bool) -> dict:
    """diffusers' example script, unchanged, in its own process; its steps timed from its tqdm bar."""
    out_dir, log = work / f"{tag}-output", work / f"{tag}.log"
    env = {"TQDM_MININTERVAL": "0"}  # tqdm prints every step (it does anyway: set_postfix refreshes the bar)
    malloc = "default"
    if spec["device"] != "cpu":
        malloc = "default (not on a CPU)"
    elif tuned and sys.platform.startswith("linux"):
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), GLIBC_TUNED]))
        malloc = "keep freed memory (GLIBC_TUNABLES)"
    cmd = [sys.executable, str(script), *diffusers_args(spec, out_dir)]
    marks: dict[int, list] = {}
    t_start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_child_env(env), cwd=work, bufsize=0
    )

    def mark(n: int) -> None:
        counters = read_counters(proc.pid)
        status = read_status(proc.pid)
        if counters is not None:
            marks[n] = [time.monotonic(), *counters, status[0] if status else None]
            if status:
                hwm[0] = max(hwm[0] or 0, status[1])

    hwm = [None]
    with open(log, "wb") as fh, ProcSampler(proc.pid, gpu=spec["device"] == "cuda") as sampler:
        decoder, pending = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            fh.write(chunk)
            parts = re.split(r"[\r\n]", pending + decoder.decode(chunk))
            pending = parts.pop()
            for line in parts:
                n = parse_step_line(line)
                if n is not None and n > 0 and n not in marks:
                    mark(n)
        rc = proc.wait()
    if rc != 0:
        raise DreamLoomError(
            f"bench: diffusers' script {script} failed (exit code {rc}). The end of its log ({log}):\n{_log_tail(log)}",
            "Install the example's requirements (examples/dreambooth/requirements.txt: torchvision, matching your "
            "torch, and the others) and use the train_dreambooth_lora.py of the installed diffusers version (its "
            "check_min_version must pass).",
        )
    if len(marks) < 2:
        raise DreamLoomError(
            f"bench: found no tqdm step lines ('Steps: ... n/N') in the output of {script} ({log}).",
            "Give diffusers' examples/dreambooth/train_dreambooth_lora.py, which shows a 'Steps' progress bar.",
        )
    raw = {"pid": proc.pid, "malloc": malloc, "peak_rss_process": None, "process_wall_s": time.monotonic() - t_start}
    run = _measure(raw, marks, spec["warmup"], sampler, t_start)
    run["peak_rss_process"] = max(
        filter(None, [hwm[0], sampler.hwm_at(marks[max(marks)][0]), run["peak_rss"]]), default=None
    )
    run["command"] = cmd
    return run


def summarise(runs: list[dict]) -> dict:
    """One contender over its repeats: the median over all timed steps; CPU and faults per step over all of
    them; the largest peaks."""
    walls = [w for r in runs for w in r["step_times"]]
    n = len(walls)

    def most(key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return max(values) / MB if values else None

    phases = None
    if runs[0].get("phases"):
        phases = {k: 1000 * statistics.median(r["phases"][k] for r in runs) for k in PHASES}
    median = statistics.median(walls)
    return {
        "timed_steps": n,
        "median_step_s": median,
        "steps_per_s": 1 / median if median > 0 else None,
        "faults_per_step": sum(sum(r["minor_faults"]) for r in runs) / n,
        "sys_s_per_step": sum(sum(r["sys_s"]) for r in runs) / n,
        "user_s_per_step": sum(sum(r["user_s"]) for r in runs) / n,
        "peak_rss_mb": most("peak_rss"),
        "peak_rss_process_mb": most("peak_rss_process"),
        "peak_cuda_mb": most("peak_cuda"),
        "peak_gpu_process_mb": most("peak_gpu_process"),
        "first_step_at_s": statistics.median(r["first_step_at_s"] for r in runs),
        "phases_ms": phases,
        "malloc": runs[0]["malloc"],
    }


def _ratio(a, b):
    return a / b if a is not None and b else None


def ratios(ours: dict, other: dict) -> dict:
    """ours / other: below 1 means ours takes less time or memory."""
    return {
        "step_time": _ratio(ours["median_step_s"], other["median_step_s"]),
        "speedup": _ratio(other["median_step_s"], ours["median_step_s"]),
        "faults": _ratio(ours["faults_per_step"], other["faults_per_step"]),
        "sys_cpu": _ratio(ours["sys_s_per_step"], other["sys_s_per_step"]),
        "peak_rss": _ratio(ours["peak_rss_mb"], other["peak_rss_mb"]),
        "peak_rss_process": _ratio(ours["peak_rss_process_mb"], other["peak_rss_process_mb"]),
        "peak_cuda": _ratio(ours["peak_cuda_mb"], other["peak_cuda_mb"]),
        "peak_gpu_process": _ratio(ours["peak_gpu_process_mb"], other["peak_gpu_process_mb"]),
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
    malloc: str | None = None,
    compare_diffusers: str | None = None,
) -> dict:
    """Prepare the data in one process, then run the contenders, each in a fresh process, `repeats` rounds.

    malloc: "tuned" (every contender keeps freed memory, as our trainer does on a CPU), "default" (glibc's
    defaults for all), "both" (tuned, plus ours once more with glibc's defaults) or "all" (both, plus ours with
    the same settings given as GLIBC_TUNABLES from the process's start); None: both on a Linux CPU.
    """
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
    # the processes run in the bench's folder: give them the model's absolute path
    model_arg = base_model if base_model in BUILTIN_RESOLUTION else str(Path(base_model).expanduser().resolve())
    work = Path(tempfile.mkdtemp(prefix="dreamloom-bench-"))
    request = {
        "work": str(work),
        "base_model": model_arg,
        "resolution": resolution,
        "cfg_overrides": cfg_overrides or {},
        "diffusers": script is not None,
        "morph": morph,
        "repeats": repeats,
    }
    (work / "request.json").write_text(json.dumps(request))
    print(
        f"bench: preparing images{', a diffusers folder' if script else ''}{', morph' if morph else ''} in {work}",
        file=sys.stderr,
    )
    spec, _, _ = _spawn("prepare", work / "request.json", work, "prepare")
    morph_result = spec.pop("morph", None)
    spec.update(warmup=warmup, steps=steps, repeats=repeats, compile=compile_unet)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    on_cpu = spec["device"] == "cpu"
    if malloc is None:
        malloc = "both" if on_cpu and sys.platform.startswith("linux") else "tuned"
    tuned = malloc != "default"
    plan = [("ours", "ours", {} if tuned else {"DREAMLOOM_MALLOC": "default"})]
    if malloc in ("both", "all"):
        plan.append(("ours-malloc-default", "ours", {"DREAMLOOM_MALLOC": "default"}))
    if malloc == "all":  # the same settings as keep_freed_memory, but from the process's start (as diffusers gets)
        tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), GLIBC_TUNED]))
        plan.append(("ours-glibc-tunables", "ours", {"DREAMLOOM_MALLOC": "default", "GLIBC_TUNABLES": tunables}))
    plan.append(("tutorial", "tutorial", {} if tuned else {"DREAMLOOM_MALLOC": "default"}))
    names = [name for name, _, _ in plan] + (["diffusers"] if script else [])
    print(
        f"bench: {base_model} at {spec['resolution']}px on {spec['device']}, rank 4, batch 1, prior preservation on; "
        f"{warmup} warm-up + {steps} timed steps; {repeats} rounds of {', '.join(names)}, each in a fresh process; "
        f"malloc {malloc}",
        file=sys.stderr,
    )
    runs: dict[str, list] = {name: [] for name in names}
    for r in range(repeats):
        for name, role, env in plan:
            runs[name].append(_run_loop_contender(role, spec_path, work, f"{name}-{r + 1}", env, spec))
            if "GLIBC_TUNABLES" in env:
                runs[name][-1]["malloc"] = "keep freed memory (GLIBC_TUNABLES)"
        if script:
            runs["diffusers"].append(_run_diffusers(script, spec, work, f"diffusers-{r + 1}", tuned))
        print(
            f"  round {r + 1}: " + ", ".join(f"{name} {runs[name][-1]['median_step_s']:.3f} s/step" for name in names),
            file=sys.stderr,
        )

    contenders = {name: {"summary": summarise(runs[name]), "runs": runs[name]} for name in names}
    ours = contenders["ours"]["summary"]
    report = {
        "base_model": base_model,
        "resolution": spec["resolution"],
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "torch_compile": compile_unet,
        "device": spec["device"],
        "torch_threads": spec["torch_threads"],
        "cpu_count": os.cpu_count(),
        "versions": spec["versions"],
        "malloc": malloc,
        "glibc_tunables_env": os.environ.get("GLIBC_TUNABLES"),
        "diffusers_script": str(script) if script else None,
        "contenders": contenders,
        "ratios": {f"ours/{n}": ratios(ours, contenders[n]["summary"]) for n in names if n != "ours"},
    }
    if morph_result is not None:
        report["morph"] = morph_result

    print(format_report(report))
    if out:
        from ..files.atomic import atomic_write_text

        atomic_write_text(out, json.dumps(report, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return report


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
