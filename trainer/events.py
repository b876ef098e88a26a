"""JSON-lines events: the one channel from a training job to whoever watches it."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO


class Events:
    """Emit events to `events.jsonl` in the run dir, to an optional stream, and to listeners.

    Only the main process of a distributed run emits (`enabled=False` elsewhere).
    """

    def __init__(self, run_dir: str | Path | None = None, stream: TextIO | None = None, enabled: bool = True):
        self.path = Path(run_dir) / "events.jsonl" if run_dir else None
        self.stream = stream
        self.reader_gone = False  # the stream's reader closed its end (the pack's process ended)
        self.enabled = enabled
        self.listeners: list[Callable[[dict], None]] = []
        if self.path and enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **data) -> dict:
        record = {"event": event, "time": round(time.time(), 3), **data}
        if not self.enabled:
            return record
        line = json.dumps(record, default=str)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        if self.stream:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # the reader is gone (BrokenPipeError; EINVAL on Windows)
                self.stream, self.reader_gone = None, True  # events.jsonl still gets every event
        for listener in self.listeners:
            listener(record)
        return record

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)


class TqdmListener:
    """Shows progress events as a tqdm bar and prints log events (the CLI's view of a job)."""

    def __init__(self, desc: str = "train", file: TextIO | None = None):
        self.desc = desc
        self.file = file or sys.stderr
        self.bar = None

    def __call__(self, record: dict) -> None:
        from tqdm import tqdm

        kind = record["event"]
        if kind == "progress":
            phase = record.get("phase", self.desc)
            if self.bar is None or self.bar.total != record["total"] or self.bar.desc != phase:
                if self.bar is not None:
                    self.bar.close()
                self.bar = tqdm(total=record["total"], desc=phase, file=self.file, dynamic_ncols=True, mininterval=0.5)
            postfix = {k: f"{record[k]:.4g}" for k in ("loss", "lr") if isinstance(record.get(k), (int, float))}
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(record["step"] - self.bar.n)  # redraws at most every mininterval
        elif kind in ("log", "error", "done"):
            msg = record.get("message") or (f"done: {record.get('outputs')}" if kind == "done" else "")
            if kind == "error" and record.get("hint"):
                msg += f"\nFix: {record['hint']}"
            if self.bar is not None:
                self.bar.write(msg, file=self.file)
            else:
                print(msg, file=self.file)
        elif kind in ("sample", "checkpoint", "validation"):
            what = f"loss {record.get('loss')}" if kind == "validation" else record.get("path")
            line = f"{kind} at step {record.get('step')}: {what}"
            if self.bar is not None:
                self.bar.write(line, file=self.file)
            else:
                print(line, file=self.file)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
