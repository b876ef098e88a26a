"""diffusers' example script (examples/dreambooth/train_dreambooth_lora.py) as a bench contender: the arguments
that make it train what ours trains, and a run of it, unchanged, in its own process, its steps timed from its
tqdm bar (stderr) and its memory and CPU time read from /proc by the bench."""

from __future__ import annotations

import codecs
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from ..errors import DreamLoomError
from .bench_measure import ProcSampler, log_tail, malloc_label, measure, read_counters, read_status

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


def _mark(pid: int, n: int, marks: dict[int, list], hwm: list) -> None:
    """Step n's mark, [time, faults, sys s, user s, RSS], read from /proc now; hwm[0]: the largest VmHWM seen."""
    counters, status = read_counters(pid), read_status(pid)
    if counters is not None:
        marks[n] = [time.monotonic(), *counters, status[0] if status else None]
        if status:
            hwm[0] = max(hwm[0] or 0, status[1])


def _follow(proc: subprocess.Popen, log: Path, marks: dict[int, list], hwm: list) -> None:
    """Copy the script's output to `log` until it ends, marking each step its tqdm bar reaches."""
    decoder, pending = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    with open(log, "wb") as fh:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            fh.write(chunk)
            parts = re.split(r"[\r\n]", pending + decoder.decode(chunk))  # tqdm redraws its bar after a \r
            pending = parts.pop()
            for n in filter(None, map(parse_step_line, parts)):  # None: not a bar; 0: the bar before any step
                if n not in marks:
                    _mark(proc.pid, n, marks, hwm)


def run_diffusers(script: Path, spec: dict, work: Path, tag: str, env: dict) -> dict:
    """diffusers' example script, unchanged, in its own process started with `env` (the whole environment);
    its steps timed from its tqdm bar."""
    out_dir, log = work / f"{tag}-output", work / f"{tag}.log"
    env = {**env, "TQDM_MININTERVAL": "0"}  # tqdm prints every step (it does anyway: set_postfix refreshes the bar)
    cmd = [sys.executable, str(script), *diffusers_args(spec, out_dir)]
    marks: dict[int, list] = {}
    hwm = [None]
    t_start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=work, bufsize=0)
    with ProcSampler(proc.pid, gpu=spec["device"] == "cuda") as sampler:
        _follow(proc, log, marks, hwm)
        rc = proc.wait()
    if rc != 0:
        raise DreamLoomError(
            f"bench: diffusers' script {script} failed (exit code {rc}). The end of its log ({log}):\n{log_tail(log)}",
            "Install the example's requirements (examples/dreambooth/requirements.txt: torchvision, matching your "
            "torch, and the others) and use the train_dreambooth_lora.py of the installed diffusers version (its "
            "check_min_version must pass).",
        )
    if len(marks) < 2:
        raise DreamLoomError(
            f"bench: found no tqdm step lines ('Steps: ... n/N') in the output of {script} ({log}).",
            "Give diffusers' examples/dreambooth/train_dreambooth_lora.py, which shows a 'Steps' progress bar.",
        )
    raw = {
        "pid": proc.pid,
        "malloc": malloc_label(spec["device"], env),
        "peak_rss_process": None,
        "process_wall_s": time.monotonic() - t_start,
    }
    run = measure(raw, marks, spec["warmup"], sampler, t_start)
    run["peak_rss_process"] = max(
        filter(None, [hwm[0], sampler.hwm_at(marks[max(marks)][0]), run["peak_rss"]]), default=None
    )
    run["command"] = cmd
    return run
