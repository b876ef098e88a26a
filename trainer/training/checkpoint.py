"""Resumable checkpoints: trainable weights, optimizer, LR scheduler, RNG and step, written atomically.

accelerate's save_state would also write every prepared module whole (the frozen UNet: GBs per checkpoint);
these hold only what the method trains, and state.json's train_id refuses a checkpoint of another run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import installed_version
from ..errors import DreamLoomError
from ..files.atomic import give_usual_permissions

_STEP_DIR = re.compile(r"^step_(\d{5,})$")


def train_id_for(cfg, dataset_fingerprint: str, model_fingerprint: str) -> str:
    """The identity a checkpoint must match to be resumed: settings, images and base model."""
    blob = json.dumps(
        {"config": cfg.identity(), "data": dataset_fingerprint, "model": model_fingerprint}, sort_keys=True
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def versions() -> dict:
    """Python and library versions, recorded in job.json."""
    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "peft", "accelerate", "transformers"):
        out[name] = installed_version(name)
    return out


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / "state.json").exists():
            found.append((int(m[1]), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    trainable: dict,
    optimizer_state: dict,
    scheduler_state: dict,
    rng_state: dict,
    extra: dict,
    keep: int,
) -> Path:
    """Write checkpoints/step_NNNNN/ via a temporary folder and a rename; prune to the newest `keep`."""
    folder = checkpoints_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:05d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:05d}.", dir=folder))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng_state}, tmp / "state.pt")
        # state.json is written last: its presence marks a complete checkpoint.
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
        give_usual_permissions(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".step_*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise DreamLoomError(
            f"The checkpoint {path} is damaged ({err}).",
            "Delete that checkpoint folder; the run then resumes from the one before, or starts over.",
        ) from err
    return {"step": int(meta["step"]), "meta": meta, "trainable": trainable, **state}
