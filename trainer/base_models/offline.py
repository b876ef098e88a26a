"""No network at run time: every Hugging Face library is told to stay offline. No torch, so the CLI can call it
before anything heavy is imported."""

from __future__ import annotations

import os


def set_offline() -> None:
    """Make every Hugging Face library refuse network access in this process."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
