"""diffusers' example script (examples/dreambooth/train_dreambooth_lora.py) as a bench contender: the arguments
that make it train what ours trains, and a run of it, unchanged, in its own process, its steps timed from its
tqdm bar (stderr) and its memory and CPU time read from /proc by the bench."""

from __future__ import annotations

import ast
import codecs
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .. import installed_version
from ..errors import DreamLoomError
from .bench_measure import (
    ContenderFailed,
    ProcSampler,
    child_env,
    kill_on_interrupt,
    log_tail,
    malloc_label,
    measure,
    read_counters,
    read_status,
)

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


# Run by this Python in a child (argv: the script's folder, its imports as JSON, its check_min_version or ""):
# prints what the script would fail on first, as JSON, or null. Any exception counts: a torchvision built for
# another torch raises RuntimeError ("operator torchvision::nms does not exist"), not ImportError.
_PREFLIGHT = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
failed = None
for name in json.loads(sys.argv[2]):
    try:
        importlib.import_module(name)
    except BaseException as err:
        failed = {"what": "import " + name, "error": f"{type(err).__name__}: {err}"}
        break
if failed is None and sys.argv[3]:
    try:
        from diffusers.utils import check_min_version
        check_min_version(sys.argv[3])
    except BaseException as err:
        failed = {"what": f"check_min_version({sys.argv[3]!r})", "error": f"{type(err).__name__}: {err}"}
print(json.dumps(failed))
"""


def script_requirements(source: bytes | str, name: str = "<script>") -> tuple[list[str], str | None]:
    """(the modules the script imports unconditionally, the version its check_min_version asks for or None):
    what its module body does before it trains. Raises SyntaxError or ValueError for what is not Python."""
    tree = ast.parse(source, name)
    modules: list[str] = []
    min_version = None
    for node in tree.body:  # the module's own statements: imports under an if or a try may be optional
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            call = node.value
            if getattr(call.func, "id", None) == "check_min_version" and call.args:
                arg = call.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    min_version = arg.value
    return list(dict.fromkeys(modules)), min_version


def check_script(script: Path) -> None:
    """Refuse, before the bench does any work, a script this Python cannot run: not Python, an import that fails
    (a missing torchvision, or one built for another torch), or a check_min_version the installed diffusers
    fails. The imports are tried in a child process, as the script would run."""
    what = f"--compare-diffusers {script}"
    hint = "Give diffusers' examples/dreambooth/train_dreambooth_lora.py."
    try:
        modules, min_version = script_requirements(script.read_bytes(), str(script))
    except OSError as err:
        raise DreamLoomError(f"{what}: cannot be read ({err.strerror}).", hint) from None
    except (SyntaxError, ValueError) as err:
        raise DreamLoomError(f"{what}: is not a Python script ({err}).", hint) from None
    proc = subprocess.run(
        [sys.executable, "-c", _PREFLIGHT, str(script.parent), json.dumps(modules), min_version or ""],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=script.parent,
        timeout=600,  # a hang guard: importing torch, diffusers and torchvision takes seconds
    )
    cannot = f"bench: diffusers' script {script} cannot run with {sys.executable}"
    requirements_fix = (
        "Install the example's requirements (examples/dreambooth/requirements.txt) into this Python, with a "
        f"torchvision built for the installed torch ({installed_version('torch') or 'none found'}): PyPI's "
        "torchvision works only with the torch release it was made for."
    )
    if proc.returncode != 0:  # the check itself died (a crash inside an extension, say)
        tail = " ".join((proc.stderr or proc.stdout)[-800:].split())
        raise DreamLoomError(
            f"{cannot}: trying its imports exited with code {proc.returncode}: {tail}", requirements_fix
        )
    failed = json.loads(proc.stdout.strip().splitlines()[-1])  # the child's last line is its verdict
    if failed is None:
        return
    detail = f"{failed['what']} failed with {' '.join(failed['error'].split())[:800]}"
    if not failed["what"].startswith("check_min_version"):
        raise DreamLoomError(f"{cannot}: {detail}", requirements_fix)
    raise DreamLoomError(
        f"{cannot}: {detail}",
        f"Use the train_dreambooth_lora.py of the installed diffusers ({installed_version('diffusers')}, the "
        "examples/dreambooth folder of that release), or install the diffusers release the script asks for.",
    )


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
        kill_on_interrupt(proc, lambda: (_follow(proc, log, marks, hwm), proc.wait()))
        rc = proc.returncode
    if rc != 0:
        raise ContenderFailed(
            f"bench: diffusers' script {script} failed (exit code {rc}). The end of its log ({log}):\n{log_tail(log)}",
            "Install the example's requirements (examples/dreambooth/requirements.txt: torchvision, matching your "
            "torch, and the others) and use the train_dreambooth_lora.py of the installed diffusers version (its "
            "check_min_version must pass).",
        )
    if len(marks) < 2:
        raise ContenderFailed(
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
