"""The child process: `trainer.cli.main(["worker", "<run_dir>/job.json"])`, started by parent.py's
`worker_command` (a bootstrap that needs neither PYTHONPATH nor the working folder; `python -m trainer
worker <job.json>` runs the same thing by hand).

It runs one job (training or class images), writes JSON-lines events to stdout and events.jsonl,
checks for a stop request file, and exits with a code the parent understands.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from pathlib import Path

from ..errors import OUT_OF_MEMORY_HINT, DreamLoomError, StopRequested

EXIT_OK, EXIT_CRASH, EXIT_USER_ERROR, EXIT_STOPPED = 0, 1, 2, 3
STOP_FILE = "STOP"
DONE_FILE = "done.json"


def install_offline_guard() -> None:
    """Refuse every network connection except loopback and local sockets (used by torch.distributed)."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def allowed(sock, address) -> bool:
        if sock.family == getattr(socket, "AF_UNIX", None):
            return True
        host = address[0] if isinstance(address, tuple) else address
        return host in ("localhost", "::1") or str(host).startswith("127.")

    def connect(sock, address):
        if not allowed(sock, address):
            raise DreamLoomError(
                f"Blocked a network connection to {address}: DreamLoom never uses the network at run time.",
                "All models load from local files; if a library tried to download something, report it as a bug.",
            )
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if not allowed(sock, address):
            return 111  # ECONNREFUSED
        return real_connect_ex(sock, address)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex


def _run(job: dict, run_dir: Path, events, stop_signal) -> dict:
    def should_stop() -> bool:
        """Ctrl-C or SIGTERM reached this process, the pack asked (a file in the run folder), or the pack is gone
        (its end of our stdout is closed: ComfyUI ended). The pack's SIGTERM after its Stop then stops at once."""
        if (run_dir / STOP_FILE).exists() or events.reader_gone:
            stop_signal.ask()
        return stop_signal.requested()

    kind = job.get("kind")
    if kind == "train":
        from ..config import TrainConfig
        from ..training.loop import train

        cfg = TrainConfig.from_dict(job["config"])
        result = train(
            cfg,
            run_dir,
            events=events,
            should_stop=should_stop,
            cache_root=job.get("cache_root"),
            class_dir=job.get("class_dir"),
        )
        return result.outputs
    if kind == "class_images":
        from ..base_models.load import load_base_model
        from ..data.class_images import ClassImageSpec, generate_class_images
        from ..training.precision import inference_placement

        # On a GPU in fp16/bf16 (diffusers' prior_generation_precision), loaded so: no fp32 copy in host memory
        device, dtype = inference_placement()
        comps = load_base_model(job["base_model"], dtype=dtype)
        spec = ClassImageSpec(model_fingerprint=comps.fingerprint, **job["spec"])
        try:
            paths = generate_class_images(
                comps,
                spec,
                int(job["count"]),
                job["folder"],
                int(job.get("batch_size", 4)),
                device=device,
                dtype=dtype,
                events=events,
                should_stop=should_stop,
            )
        except InterruptedError as err:
            raise StopRequested(0, None) from err
        return {"folder": str(job["folder"]), "images": [str(p) for p in paths]}
    raise DreamLoomError(f"Unknown job kind {kind!r}.", "This is a bug in the caller.")


def main(job_path: str) -> int:
    from ..base_models.offline import set_offline
    from ..events import Events
    from ..files.atomic import atomic_write_text
    from ..stop_signals import GracefulStop, Terminated

    set_offline()
    install_offline_guard()
    job_path = Path(job_path)
    run_dir = job_path.parent
    events = Events(run_dir, stream=sys.stdout)
    try:
        job = json.loads(job_path.read_text(encoding="utf-8"))
        _quiet_libraries()
        with GracefulStop(announce=lambda name: events.log(f"{name}: stopping after this step")) as stop_signal:
            outputs = _run(job, run_dir, events, stop_signal)
        atomic_write_text(run_dir / DONE_FILE, json.dumps({"outputs": outputs}, indent=2))
        # The trainer already emitted "done"; class-image jobs emit theirs here.
        if job.get("kind") != "train":
            events.emit("done", outputs=outputs)
        return EXIT_OK
    except StopRequested as stop:
        if not stop.announced:  # the trainer writes its own, with the checkpoint
            events.emit("stopped", step=stop.step, checkpoint=stop.checkpoint)
        return EXIT_STOPPED
    except DreamLoomError as err:
        events.emit("error", message=err.message, hint=err.hint)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as stop:  # a second Ctrl-C or SIGTERM: stopped at once
        name = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
        events.emit(
            "error",
            message=f"The training process was stopped at once by {name}, before it could save a checkpoint.",
            hint="Run it again: it resumes from the last checkpoint written.",
        )
        return EXIT_CRASH
    except BaseException as err:  # noqa: BLE001 - the parent must learn of every failure
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        message = f"{type(err).__name__}: {err}"
        hint = "See the log for the traceback."
        if "out of memory" in str(err).lower():
            hint = OUT_OF_MEMORY_HINT
        events.emit("error", message=message, hint=hint, traceback=tb[-4000:])
        return EXIT_CRASH
    finally:
        sys.stdout.flush()


def _quiet_libraries() -> None:
    from ..base_models.offline import hide_known_noise

    hide_known_noise()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
