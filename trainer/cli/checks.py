"""Checks of CLI arguments, paths and finished run folders, made before torch is imported."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import MISSING
from pathlib import Path

from ..config import BUILTIN_RESOLUTION, DEFAULT_CACHE_DIR, SAMPLERS, TrainConfig, config_identity
from ..errors import DreamLoomError
from ..files.job_file import read_job_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
BUILTIN_MODELS = tuple(BUILTIN_RESOLUTION)
MODEL_HINT = (
    "Give 'tiny-fabric' or 'tiny', the path of an SD1.5 .safetensors checkpoint, or a diffusers folder "
    "(one with model_index.json)."
)


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """A folder the command may create (with its parents) and write in; refused before anything is written."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DreamLoomError(
            f"{flag} {folder} is a file, not a folder.",
            f"Give {flag} a folder (it is created if missing), or move the file away.",
        )
    _check_can_create(folder, flag)
    return folder


def check_output_file(path: str | os.PathLike, flag: str, suffixes: tuple[str, ...] = ()) -> Path:
    """A file the command may write (replacing an older file of that name); refused before any work is done."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise DreamLoomError(f"{flag} {out} is a folder, not a file.", f"Give {flag} a file name, e.g. {out / 'out'}.")
    if suffixes and out.suffix.lower() not in suffixes:
        raise DreamLoomError(
            f"{flag} {out} has an unknown file type {out.suffix or '(none)'!r}.",
            f"End the name in {', '.join(suffixes)}.",
        )
    _check_can_create(out.parent, flag, of=out)
    return out


def _check_can_create(folder: Path, flag: str, of: Path | None = None) -> None:
    """The nearest existing folder at or above `folder` must be a folder this user may write in."""
    target = of or folder
    existing = folder.absolute()
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        what = "a link to nothing" if existing.is_symlink() and not existing.exists() else "a file"
        raise DreamLoomError(
            f"{flag} {target} cannot be created: {existing} is {what}, not a folder.",
            f"Give {flag} a path whose parent folders are folders (or move {existing} away).",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DreamLoomError(
            f"{flag} {target} cannot be written: this user has no permission to write in {existing}.",
            f"Give {flag} a folder you can write to (for example under your home folder), or change the "
            "folder's permissions.",
        )


def check_safetensors_file(path: str | os.PathLike, what: str, convert_hint: str) -> Path:
    """An existing .safetensors file with a sound header; pickles (.ckpt/.pt/.bin) are refused unread."""
    from ..files.safetensors_header import read_safetensors_header

    file = Path(path).expanduser()
    if not file.exists():
        raise DreamLoomError(f"{what} not found: {path}", convert_hint)
    if file.is_dir():
        raise DreamLoomError(f"{what} {file} is a folder, not a file.", convert_hint)
    suffix = file.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise DreamLoomError(
            f"{file.name} is a pickle-based file ({suffix}); DreamLoom loads only .safetensors, because loading a "
            "pickle can run arbitrary code.",
            "Convert it to .safetensors, or download the .safetensors version.",
        )
    if suffix not in SAFETENSORS_SUFFIXES:
        raise DreamLoomError(f"{file.name} is not a .safetensors file, the only kind DreamLoom loads.", convert_hint)
    read_safetensors_header(file)
    return file


def check_base_model(spec: str) -> None:
    """What load_base_model refuses for paths and file types, without loading anything."""
    if spec in BUILTIN_MODELS:
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise DreamLoomError(f"Base model not found: {spec}", MODEL_HINT)
    if path.is_dir():
        if not (path / "model_index.json").exists() or not (path / "unet").is_dir():
            raise DreamLoomError(
                f"{path} is not a diffusers model folder (no model_index.json or unet/).",
                "Point to the folder that holds model_index.json, or to a single .safetensors checkpoint.",
            )
        return
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise DreamLoomError(
            f"{path.name} is a pickle-based checkpoint ({path.suffix.lower()}); DreamLoom loads only .safetensors, "
            "because loading a pickle can run arbitrary code.",
            "Convert it to .safetensors (many tools do this, e.g. ComfyUI's CheckpointSave node), or download the "
            ".safetensors version.",
        )
    check_safetensors_file(path, "Base model", "Use an SD1.5 .safetensors checkpoint or a diffusers folder.")


def check_whole(value: int, flag: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DreamLoomError(f"Invalid value {flag} {value}.", f"Use a whole number from {low} to {high}.")


def check_number(value: float, flag: str, low: float, high: float, low_open: bool = False) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        lowest = f"more than {low:g}" if low_open else f"at least {low:g}"
        raise DreamLoomError(f"Invalid value {flag} {value:g}.", f"Use a number {lowest} and at most {high:g}.")


def check_resolution(value: int) -> None:
    if value != 0 and (not 64 <= value <= 2048 or value % 8):
        raise DreamLoomError(
            f"Invalid value --resolution {value}.",
            "Use a multiple of 8 from 64 to 2048 (SD1.5: 512), or leave it out for the model's native size.",
        )


def check_sampling_args(args) -> None:
    """The settings every picture-making command shares: steps, guidance, size, sampler, seed, batch, model."""
    check_whole(args.steps, "--steps", 1, 1000)
    check_number(args.guidance, "--guidance", 0.0, 50.0)
    check_resolution(args.resolution)
    if args.sampler not in SAMPLERS:
        raise DreamLoomError(f"Invalid value --sampler {args.sampler!r}.", f"Use one of: {', '.join(SAMPLERS)}.")
    if hasattr(args, "seed"):
        check_whole(args.seed, "--seed", 0, 2**63 - 1)
    check_whole(args.batch_size, "--batch-size", 1, 256)
    check_base_model(args.base_model)


DEFAULT_EMBEDDING_TOKEN = "<sks-fabric>"


def check_adapter_args(args) -> None:
    """--lora and --embedding (generate, morph): .safetensors files only, checked without torch. Sets args.loras
    [(file, strength)] and args.embeddings [(file, token)]."""
    check_number(args.lora_scale, "--lora-scale", -16.0, 16.0)
    args.loras = []
    for spec in args.lora or []:
        path, strength = parse_lora_strength(spec, default=args.lora_scale)
        check_number(strength, f"--lora {spec} strength", -16.0, 16.0)
        hint = "Give the .safetensors file written by training (result/<name>.safetensors)."
        args.loras.append((str(check_safetensors_file(path, "LoRA file", hint)), strength))
    files = args.embedding or []
    tokens = args.embedding_token or ([DEFAULT_EMBEDDING_TOKEN] if len(files) == 1 else [])
    if files and len(tokens) != len(files):
        raise DreamLoomError(
            f"{len(files)} --embedding files and {len(tokens)} --embedding-token values: each embedding needs the "
            "token it is used as in the prompts.",
            "Give one --embedding-token per --embedding, in the same order.",
        )
    if len(set(tokens)) < len(tokens):
        raise DreamLoomError("Two embeddings were given the same --embedding-token.", "Give each its own token.")
    args.embeddings = []
    for path, token in zip(files, tokens):
        path = str(check_safetensors_file(path, "Embedding file", "Give the .safetensors file written by TI training."))
        if not token.strip() or any(c.isspace() for c in token):
            raise DreamLoomError(
                f"Invalid value --embedding-token {token!r}.", "Use one word with no spaces, e.g. '<sks-fabric>'."
            )
        args.embeddings.append((path, token))


def uses_prior(cfg: TrainConfig) -> bool:
    return cfg.method in ("lora", "full") and cfg.with_prior_preservation and cfg.prior_loss_weight > 0


def check_train_paths(cfg: TrainConfig, args) -> Path:
    """The run folder, base model and class-image folder of a training run; returns the run folder."""
    if not cfg.instance_dir and not cfg.concepts:
        raise DreamLoomError(
            "No instance images given.",
            "Pass --instance-dir FOLDER with 5-20 images of your subject, or [[concepts]] tables in a --config file.",
        )
    run_dir = check_output_folder(args.output_dir, "--output-dir")
    read_job_file(run_dir / "job.json")  # refuses a job.json DreamLoom did not write, before anything loads
    for concept in cfg.concept_list():
        images = _resolved(concept.instance_dir)
        if images is not None and images == _resolved(run_dir):
            raise DreamLoomError(
                f"--output-dir {run_dir} is the folder of the training images; the run's loss plot and samples "
                "would be trained on next time.",
                "Give --output-dir a folder of its own, e.g. beside the images.",
            )
        if uses_prior(cfg) and concept.class_dir and images is not None and _resolved(concept.class_dir) == images:
            flag = "--class-dir" if not cfg.concepts else f"class_dir of concept {concept.name!r}"
            raise DreamLoomError(
                f"{flag} {concept.class_dir} is the folder of the training images, so the subject would be its "
                "own prior.",
                f"Give {flag} a folder for pictures of the class ({concept.class_prompt!r}), or leave it out to have "
                "them made.",
            )
    check_base_model(cfg.base_model)
    if uses_prior(cfg):
        for concept in cfg.concept_list():
            flag = "--class-dir" if not cfg.concepts else f"class_dir of concept {concept.name!r}"
            if not concept.class_dir:
                check_output_folder(args.cache_dir or DEFAULT_CACHE_DIR, "--cache-dir")
            elif not Path(concept.class_dir).expanduser().is_dir():  # a folder of existing images may be read-only
                check_output_folder(concept.class_dir, flag)
    return run_dir


# --------------------------------------------------------------------------- a finished run folder
# A CLI run folder holds one run. When it holds a finished result (result/ and a `done` event), a run with the
# same settings and images prints that result instead of training again, and a run with other settings is
# refused: it would replace result/. The folder is the user's, so DreamLoom never moves or deletes it.


def finished_outputs(run_dir: Path, cfg: TrainConfig, dataset_fingerprint: str) -> dict | None:
    """The outputs of the finished run of these settings in `run_dir`, None if there is none to reuse, or a
    DreamLoomError if `run_dir` holds the result of another run."""
    result_dir = run_dir / "result"
    job = _read_json(run_dir / "job.json")
    if not result_dir.is_dir() or not any(p.is_file() for p in result_dir.iterdir()):
        _check_stopped_run(run_dir, cfg, dataset_fingerprint, job)
        return None
    outputs = _last_done_outputs(run_dir / "events.jsonl")
    keep_both = (
        f"Pass another --output-dir (for example {_free_sibling(run_dir)}) to keep both; to replace the old "
        f"result, move or delete {run_dir} yourself first."
    )
    changed = _changed_settings(job, cfg, dataset_fingerprint)
    if changed is None:
        raise DreamLoomError(
            f"{run_dir} already holds a result/ folder whose settings are unknown (job.json is missing or "
            "unreadable); training here could replace it.",
            keep_both,
        )
    if changed:
        state = "the finished result" if outputs is not None else "the result"
        raise DreamLoomError(
            f"{run_dir} already holds {state} of a different run (changed: {', '.join(changed)}); training here "
            "would replace its result/.",
            keep_both,
        )
    if outputs is None:
        return None  # the same run, stopped before it finished: training resumes and finishes it
    outputs = _rebased(outputs, run_dir)
    missing = [p for p in _output_paths(outputs) if not Path(p).exists()]
    if missing:
        print(
            f"note: the finished result in {run_dir} lacks {', '.join(missing)}; finishing the run again",
            file=sys.stderr,
        )
        return None
    return outputs


def _changed_settings(job, cfg: TrainConfig, dataset_fingerprint: str) -> list[str] | None:
    """What differs between the run job.json recorded and this one (settings by name, "the instance images");
    None when job.json says nothing readable."""
    old = job.get("config") if isinstance(job, dict) else None
    if not isinstance(old, dict):
        return None
    old, new = config_identity(old), cfg.identity()  # an option added since, at its default, is no change
    changed = sorted(k for k in set(old) | set(new) if old.get(k, MISSING) != new.get(k, MISSING))
    if job.get("dataset_fingerprint") != dataset_fingerprint:
        changed.append("the instance images")
    elif "instance_dir" in changed:  # the same pictures and captions, named by another path: the same data
        changed.remove("instance_dir")
    return changed


def _check_stopped_run(run_dir: Path, cfg: TrainConfig, dataset_fingerprint: str, job) -> None:
    """A folder with checkpoints of a stopped run resumes only that run: refuse other settings now, naming them,
    before the model loads (the trainer would refuse them too, after loading, without the names)."""
    checkpoints = run_dir / "checkpoints"
    if not checkpoints.is_dir() or not any(checkpoints.iterdir()):
        return
    changed = _changed_settings(job, cfg, dataset_fingerprint)
    if changed:
        raise DreamLoomError(
            f"{run_dir} holds checkpoints of a stopped run with other settings (changed: {', '.join(changed)}).",
            f"Run the same command as before to resume that run, or pass another --output-dir (for example "
            f"{_free_sibling(run_dir)}) for this one.",
        )


def _rebased(outputs: dict, run_dir: Path) -> dict:
    """The outputs with the run folder as this command names it (the first run may have named it from
    another working folder): every run writes loss.csv at the top of its folder."""
    loss_csv = outputs.get("loss_csv")
    if not isinstance(loss_csv, str):
        return outputs
    old = str(Path(loss_csv).parent)

    def rebase(value):
        if isinstance(value, str) and (value == old or value.startswith((old + os.sep, old + "/"))):
            return str(run_dir) + value[len(old) :]
        return value

    return {k: [rebase(v) for v in value] if isinstance(value, list) else rebase(value) for k, value in outputs.items()}


def _resolved(path) -> Path | None:
    try:
        return Path(path).expanduser().resolve() if path else None
    except OSError:
        return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _last_done_outputs(events_file: Path) -> dict | None:
    outputs = None
    try:
        with open(events_file, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if '"done"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == "done" and isinstance(record.get("outputs"), dict):
                    outputs = record["outputs"]
    except OSError:
        return None
    return outputs or None


def _output_paths(outputs: dict) -> list[str]:
    values = [v for value in outputs.values() for v in (value if isinstance(value, list) else [value])]
    return [v for v in values if isinstance(v, str) and (os.sep in v or "/" in v)]


def _free_sibling(run_dir: Path) -> Path:
    for n in range(2, 1000):
        candidate = run_dir.with_name(f"{run_dir.name}-{n}")
        if not os.path.lexists(candidate):
            return candidate
    return run_dir.with_name(f"{run_dir.name}-new")


def parse_lora_strength(spec: str, default: float = 1.0) -> tuple[str, float]:
    """'style.safetensors:0.7' -> ('style.safetensors', 0.7); without a number after the last colon (a Windows
    drive, a plain name) the strength is `default`. A decimal comma ('style.safetensors:0,7') is refused by name."""
    path, sep, tail = spec.rpartition(":")
    if sep and path and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?\s*", tail, re.IGNORECASE):
        return path, float(tail)
    if sep and path and re.fullmatch(r"\s*[-+]?\d*,\d+\s*", tail) and not Path(spec).exists():
        raise DreamLoomError(
            f"Invalid strength in {spec!r}: {tail!r} has a decimal comma.",
            f"Write the strength with a point: {path}:{tail.strip().replace(',', '.')}",
        )
    return spec, default


def check_lora_tool_output(args, inputs) -> Path:
    """--out of extract-lora, merge-lora and resize-lora: a new .safetensors file (or --overwrite), not an input."""
    from ..files.atomic import check_new_file

    out = check_output_file(args.out, "--out", SAFETENSORS_SUFFIXES)
    return check_new_file(out, args.overwrite, "--out", inputs)


def check_rank_args(args) -> None:
    check_whole(args.rank, "--rank", 1, 65536)
    if args.keep_share is not None:
        check_number(args.keep_share, "--keep-share", 0.0, 1.0, low_open=True)
