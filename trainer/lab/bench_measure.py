"""What `python -m trainer bench` measures and how: /proc readers, the step marks a contender takes, the memory
sampler the bench runs beside each contender, and the maths that turn them into per-step rows, summaries and
ratios. Torch-free; see bench.py for what runs where."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

try:
    import resource
except ImportError:  # Windows
    resource = None

from .. import cpu_malloc
from ..errors import DreamLoomError

PHASES = ("data", "vae", "text_encoder", "unet_forward", "backward", "optimizer")
NOT_ON_CPU = "default (not on a CPU)"  # the allocator label where training does not run on a CPU
REPO_ROOT = Path(__file__).resolve().parents[2]
MB = 2**20


# --------------------------------------------------------------------------------------------- /proc readers
class ContenderFailed(DreamLoomError):
    """A contender's process failed; the bench keeps its folder, where that process's log is."""


def kill_on_interrupt(proc: subprocess.Popen, wait) -> None:
    """Run `wait()` (which waits for `proc`); if Ctrl-C or SIGTERM reaches the bench meanwhile, end `proc` too
    (SIGTERM reaches the bench's process alone) and re-raise."""
    try:
        wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise


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


def process_peak() -> int | None:
    """This process's resident high-water mark in bytes (VmHWM, else getrusage), or None."""
    status = read_status()
    if status is not None:
        return status[1]
    if resource is None:
        return None
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


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


def malloc_label(device: str, env: Mapping[str, str] = os.environ) -> str:
    """What the allocator of a contender started with `env` does, as the report shows it."""
    return cpu_malloc.describe(env) if device == "cpu" else NOT_ON_CPU


# --------------------------------------------------------------------------------------------- step marks
class StepMarks(list):
    """The list a loop appends each step's wall time to (PhaseTimer.step_times): the loop's own timing of the
    warm-up and timed steps. It also takes a step_mark() (step number, mark) at the end of the warm-up, then every
    `every` timed steps and at the last, each after `sync()` (waiting for the device), so a window's time is the
    device's too; the steps between run as training runs (our loop reads its loss back, a device sync, every
    10 steps). Once the timed steps are done, the loop runs phase steps: `timer.timing_phases` turns on and
    its totals start again, so the per-phase times come from those steps alone (timing a phase waits for the
    device before and after it, which the timed steps must not do)."""

    def __init__(self, timer, warmup: int, steps: int, every: int = 10, sync=lambda: None):
        super().__init__()
        self.timer, self.warmup, self.steps, self.every, self.sync = timer, warmup, steps, every, sync
        self.marks: list[tuple[int, list]] = []
        self.n = self.phase_steps = 0

    def append(self, seconds: float) -> None:
        self.n += 1
        n, last = self.n, self.warmup + self.steps
        if n > last:
            self.phase_steps += 1
            return
        super().append(seconds)
        if n == self.warmup or n == last or (n > self.warmup and (n - self.warmup) % self.every == 0):
            self.sync()
            self.marks.append((n, step_mark()))
        if n == last:
            self.timer.totals.clear()
            self.timer.timing_phases = True


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
def child_env(extra: Mapping[str, str] | None = None) -> dict:
    """This process's environment for a child: the repository importable, the Hub offline, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def measure(raw: dict, marks: dict[int, list], warmup: int, sampler: ProcSampler, t_start: float) -> dict:
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


# --------------------------------------------------------------------------------------------- over the repeats
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
