"""Parent side of a job: run dir, worker process, events, stop, crash reporting.

Imports nothing heavy (no torch): the ComfyUI nodes call it from the node-graph thread.

Concurrency: one job at a time per process. A second request in the same process waits for the
first (ComfyUI runs one prompt at a time anyway, so this only orders CLI/API callers). A run dir
that another live process is using is refused with a clear error, never shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .. import cpu_malloc
from ..errors import DreamLoomError
from .worker import DONE_FILE, EXIT_STOPPED, STOP_FILE

PACK_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds trainer/
_PROCESS_LOCK = threading.Lock()

# The worker's entry point. `python -m trainer` needs the pack on sys.path through PYTHONPATH or the
# working folder, and an embedded Python with a `python3XX._pth` file (ComfyUI's Windows portable build)
# honours neither: the child failed with "No module named trainer". This bootstrap puts the pack root on
# sys.path itself. The pack root and the job file arrive as argv (never pasted into the code), so spaces,
# quotes and non-ASCII letters in either path are passed through untouched. No double quotes in the
# code: it survives Windows command-line quoting as one argument.
_WORKER_BOOTSTRAP = (
    "import sys; root, job = sys.argv[1], sys.argv[2]; sys.path.insert(0, root); "
    "from trainer.cli import main; sys.exit(main(['worker', job]))"
)


class JobInterrupted(Exception):
    """The caller asked to stop; the worker checkpointed (when it could) and exited."""

    def __init__(self, run_dir: Path, checkpoint: str | None):
        super().__init__(f"job in {run_dir} stopped")
        self.run_dir = run_dir
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------- identity and run dirs
def folder_fingerprint(folder: str | os.PathLike, suffixes: set[str] | None = None) -> str:
    """Hash of the names and bytes of a dataset folder's images and captions (not recursive)."""
    from ..data.images import IMAGE_SUFFIXES

    suffixes = suffixes or (IMAGE_SUFFIXES | {".txt"})
    h = hashlib.sha256()
    folder = Path(folder)
    if not folder.is_dir():
        raise DreamLoomError(f"Image folder not found: {folder}", "Check the folder path.")
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        if p.suffix.lower() in suffixes and p.is_file():
            h.update(p.name.encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def job_id(request: dict, fingerprints: dict) -> str:
    """The run folder's key: the request (its training settings as their identity: trainer/config.py) and the
    fingerprints of the model and images."""
    from ..config import config_identity

    if isinstance(request.get("config"), dict):
        request = {**request, "config": config_identity(request["config"])}
    blob = json.dumps({"request": request, "fingerprints": fingerprints}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def prepare_run_dir(runs_root: str | os.PathLike, request: dict, fingerprints: dict, name_hint: str = "") -> Path:
    """The run dir for this request (same inputs -> same folder), with job.json written once."""
    from ..files.atomic import atomic_write_text

    rid = job_id(request, fingerprints)
    run_dir = Path(runs_root) / (f"{name_hint}-{rid}" if name_hint else rid)
    run_dir.mkdir(parents=True, exist_ok=True)
    job_file = run_dir / "job.json"
    if not job_file.exists():
        atomic_write_text(
            job_file, json.dumps({**request, "fingerprints": fingerprints, "run_id": rid}, indent=2, default=str)
        )
    return run_dir


def finished_outputs(run_dir: str | os.PathLike) -> dict | None:
    """Outputs of a finished job if every file it names is still there, else None."""
    done = Path(run_dir) / DONE_FILE
    if not done.exists():
        return None
    try:
        outputs = json.loads(done.read_text())["outputs"]
    except (json.JSONDecodeError, KeyError, OSError):
        return None
    for value in outputs.values():
        paths = value if isinstance(value, list) else [value]
        for p in paths:
            if isinstance(p, str) and (p.endswith((".safetensors", ".png")) or os.sep in p) and not Path(p).exists():
                return None
    return outputs


# --------------------------------------------------------------------------- locking
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)
        if handle:
            ctypes.windll.kernel32.CloseHandle(handle)
            return True
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock file in the run dir holding the owner's PID; a stale lock is taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"

    def __enter__(self):
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise DreamLoomError(
                        f"Another DreamLoom job (process {pid}) is already running in {self.path.parent}.",
                        "Wait for it to finish or cancel it; identical requests share one run folder, so "
                        "running the same training twice at once is refused rather than corrupted.",
                    ) from None
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return self
        raise DreamLoomError(f"Could not lock {self.path.parent}.", "Try again.")

    def __exit__(self, *exc):
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------- the worker process
def request_stop(run_dir: str | os.PathLike) -> None:
    """Ask the worker of `run_dir` to checkpoint and exit (a file, so it works on every OS)."""
    (Path(run_dir) / STOP_FILE).write_text(str(time.time()))


def worker_command(job_file: str | os.PathLike, pack_root: str | os.PathLike = PACK_ROOT) -> list[str]:
    """The worker's command line: this interpreter, the bootstrap, the pack root and the job file.

    It depends on neither PYTHONPATH nor the working folder, so it also runs under an isolated (`-I`) or
    `._pth`-configured embedded Python. Such an interpreter also ignores PYTHON* variables, so `-u` says on
    the command line what PYTHONUNBUFFERED says in the environment. Both paths are made absolute: the
    worker runs in the pack root.
    """
    return [sys.executable, "-u", "-c", _WORKER_BOOTSTRAP, os.path.abspath(pack_root), os.path.abspath(job_file)]


def describe_event(record: dict, last_phase: list) -> str | None:
    """A line for log.txt: every event but routine progress (which is logged once per phase)."""
    kind = record["event"]
    if kind == "progress":
        if record.get("phase") == (last_phase[0] if last_phase else None):
            return None
        last_phase[:] = [record.get("phase")]
    shown = {k: v for k, v in record.items() if k not in ("event", "time") and v is not None}
    if isinstance(shown.get("outputs"), dict):  # the file list is in done.json; the log names what was made
        shown["outputs"] = ", ".join(shown["outputs"])
    details = ", ".join(f"{k}={v}"[:300] for k, v in shown.items())
    return f"{time.strftime('%H:%M:%S')} {kind}: {details}"


def _reader(stream, q: queue.Queue, log) -> None:
    last_phase: list = []
    for raw in iter(stream.readline, ""):
        line = raw.rstrip("\n")
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "event" in record:
            q.put(record)
            line = describe_event(record, last_phase) or ""
        if line:
            log.write(line + "\n")
            log.flush()
    q.put(None)


def run_job(
    run_dir: str | os.PathLike,
    on_event: Callable[[dict], None] | None = None,
    should_interrupt: Callable[[], bool] | None = None,
    stop_timeout: float = 120.0,
    poll: float = 0.2,
    env: dict | None = None,
) -> dict:
    """Run the job in `run_dir` in a worker process and return its outputs.

    `on_event` sees every event; it may raise (e.g. ComfyUI's interrupt from a progress update), in which
    case the worker is stopped, given `stop_timeout` seconds to checkpoint, and the exception re-raised.
    `should_interrupt` is polled; when it returns True the worker is stopped and JobInterrupted raised.
    """
    run_dir = Path(run_dir)
    done = finished_outputs(run_dir)
    if done is not None:
        return done
    with _PROCESS_LOCK, RunLock(run_dir):
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        log_path = run_dir / "log.txt"
        child_env = {**os.environ, **(env or {})}
        # Not needed by the worker itself (see worker_command); kept for what it may start.
        child_env["PYTHONPATH"] = os.pathsep.join([str(PACK_ROOT), child_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        # Keep matplotlib's font cache beside the runs, not in the user's home folder.
        child_env.setdefault("MPLCONFIGDIR", str(run_dir.parent.parent / ".cache" / "matplotlib"))
        if cpu_malloc.wants_tuning(child_env, cuda=cpu_malloc.cuda_in_this_process()):
            child_env = cpu_malloc.with_tuned_malloc(child_env)  # read by glibc at start-up only
        kwargs = {}
        if os.name == "nt":  # pragma: no cover
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"--- worker started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            log.flush()
            proc = subprocess.Popen(
                worker_command(run_dir / "job.json"),
                cwd=str(PACK_ROOT),
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                encoding="utf-8",
                errors="replace",
                env=child_env,
                **kwargs,
            )
            (run_dir / "worker.pid").write_text(str(proc.pid))
            events: queue.Queue = queue.Queue()
            thread = threading.Thread(target=_reader, args=(proc.stdout, events, log), daemon=True)
            thread.start()
            last_error, final, stopped = None, None, None
            try:
                while True:
                    try:
                        record = events.get(timeout=poll)
                    except queue.Empty:
                        record = False
                    if record is None:
                        break
                    if record:
                        if record["event"] == "error":
                            last_error = record
                        elif record["event"] == "done":
                            final = record
                        elif record["event"] == "stopped":
                            stopped = record
                        if on_event:
                            on_event(record)
                    if should_interrupt and should_interrupt():
                        raise JobInterrupted(run_dir, None)
            except BaseException as exc:
                _stop(proc, run_dir, stop_timeout)
                thread.join(timeout=5)
                checkpoint = _drain_checkpoint(events)
                if isinstance(exc, JobInterrupted):
                    raise JobInterrupted(run_dir, checkpoint) from None
                raise
            proc.wait()
            thread.join(timeout=5)
        rc = proc.returncode
        if rc == EXIT_STOPPED or stopped:
            raise JobInterrupted(run_dir, (stopped or {}).get("checkpoint"))
        if rc == 0 and final is not None:
            outputs = finished_outputs(run_dir)
            if outputs is None:
                raise DreamLoomError(
                    f"The worker finished but its output files are missing in {run_dir}.", f"See the log: {log_path}"
                )
            return outputs
        if last_error:
            hint = last_error.get("hint") or ""
            raise DreamLoomError(last_error["message"], (hint + f" Log: {log_path}").strip())
        tail = _tail(log_path)
        why = f"exit code {rc}" if rc is not None and rc >= 0 else f"killed by signal {-rc}"
        raise DreamLoomError(
            f"The training worker stopped unexpectedly ({why}) without "
            f"finishing.{(' Last output: ' + tail) if tail else ''}",
            f"Run it again to resume from the last checkpoint. Log: {log_path}",
        )


def _drain_checkpoint(events: queue.Queue) -> str | None:
    """The checkpoint named by a 'stopped' (or the last 'checkpoint') event left in the queue."""
    checkpoint = None
    while True:
        try:
            record = events.get_nowait()
        except queue.Empty:
            return checkpoint
        if record and record["event"] in ("stopped", "checkpoint") and record.get("checkpoint", record.get("path")):
            checkpoint = record.get("checkpoint") or record.get("path")


def _stop(proc: subprocess.Popen, run_dir: Path, timeout: float) -> None:
    if proc.poll() is not None:
        return
    request_stop(run_dir)
    try:
        proc.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-800:]
