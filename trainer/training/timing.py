"""Wall time per phase of the training step, for `python -m trainer bench` only."""

from __future__ import annotations

import collections
import contextlib
import time

import torch


class PhaseTimer:
    """Wall time per phase of the step; synchronises CUDA around each phase, so enable it only to measure."""

    def __init__(self, device_type: str = "cpu"):
        self.device_type = device_type
        self.totals = collections.defaultdict(float)
        self.step_times: list[float] = []

    def _sync(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()

    def reset(self) -> None:
        self.totals.clear()
        self.step_times.clear()

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - t0


@contextlib.contextmanager
def untimed(name: str):
    """PhaseTimer's stand-in when nothing is measured."""
    yield
