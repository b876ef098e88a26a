"""A run folder's job.json: the settings, fingerprints and versions of its run (jobs/parent.py and the Trainer
write it; the CLI reads it to recognise a finished or stopped run)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DreamLoomError


def read_job_file(job_file: Path) -> dict:
    """The job.json at `job_file` ({} when absent); a file of that name DreamLoom did not write is refused, never
    replaced."""
    if not job_file.exists():
        return {}
    try:
        job = json.loads(job_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        job = None
    if not isinstance(job, dict):
        raise DreamLoomError(
            f"{job_file} is not a DreamLoom job file (not a JSON object), so this output folder holds something else.",
            "Give an empty or new output folder; DreamLoom does not replace files it did not write.",
        )
    return job
