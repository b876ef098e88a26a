"""The loss of every optimizer step: kept on the device until read back, checked, and written to loss.csv/png."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import DreamLoomError
from ..pictures.plots import plot_loss, read_loss_csv, write_loss_csv


class LossLog:
    """Losses queued as device tensors after each micro-batch and read back in one host sync by flush()."""

    def __init__(self, rows: list[dict] | None = None):
        self.rows: list[dict] = rows or []
        self._pending: list[tuple] = []  # (step, loss, instance loss, prior loss or None), device tensors
        self._lr: dict[int, float] = {}
        self._validation: dict[int, float] = {}  # step -> validation loss, until that step's row is recorded

    @classmethod
    def resumed(cls, run_dir: Path, step: int) -> LossLog:
        """The rows loss.csv holds up to `step`, the checkpoint a run resumes from."""
        return cls([r for r in read_loss_csv(run_dir / "loss.csv") if r["step"] <= step])

    def add(self, step: int, loss, instance_loss, prior_loss) -> None:
        self._pending.append((step, *(None if t is None else t.detach() for t in (loss, instance_loss, prior_loss))))

    def end_step(self, step: int, lr: float) -> None:
        self._lr[step] = float(lr)

    def add_validation(self, step: int, value: float) -> None:
        """The held-out images' loss measured after `step` (training/validation.py), kept in that step's row."""
        row = next((r for r in reversed(self.rows) if r["step"] == step), None)
        if row is not None:
            row["validation_loss"] = value
        else:
            self._validation[step] = value

    def flush(self) -> dict | None:
        """Record the pending micro-batch losses as one row per step (their mean); the newest row, or None.

        Raises DreamLoomError on a NaN or infinite loss, so a broken run stops before anything is exported.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return None
        nan = torch.tensor(float("nan"))
        stacked = [
            torch.stack([loss, inst, nan.to(loss) if prior is None else prior]) for _, loss, inst, prior in pending
        ]
        values = torch.stack(stacked).float().cpu().tolist()
        by_step: dict[int, list] = {}
        for (step, _, _, prior), row in zip(pending, values):
            by_step.setdefault(step, []).append((row, prior is not None))
        for step, items in by_step.items():
            loss = sum(r[0] for r, _ in items) / len(items)
            if not math.isfinite(loss):
                raise DreamLoomError(
                    f"The loss became {loss} at step {step}; training stopped so the result is not silently broken.",
                    "Lower learning_rate (e.g. by 10x), set max_grad_norm to 1.0, or use bf16 instead of fp16.",
                )
            row = {"step": step, "loss": loss, "instance_loss": sum(r[1] for r, _ in items) / len(items)}
            row["lr"] = self._lr.pop(step, float("nan"))
            if items[0][1]:
                row["prior_loss"] = sum(r[2] for r, _ in items) / len(items)
            if step in self._validation:
                row["validation_loss"] = self._validation.pop(step)
            self.rows.append(row)
        return self.rows[-1]

    def write(self, run_dir: Path, title: str) -> None:
        write_loss_csv(run_dir / "loss.csv", self.rows)
        plot_loss(run_dir / "loss.png", self.rows, title=title)
