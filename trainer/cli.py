"""`python -m trainer <command>`: train, class-images, generate, demo, worker."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from .config import BUILTIN_RESOLUTION, DEFAULT_CACHE_DIR, SAMPLERS, TrainConfig
from .errors import DreamLoomError
from .inference.prompts import GRID_CONTEXTS

HELP = {
    "method": "lora (DreamBooth LoRA) or ti (textual inversion)",
    "base_model": "'tiny-fabric' (built-in, pretrained), 'tiny' (random weights), an SD1.5 .safetensors "
    "checkpoint, or a diffusers folder",
    "instance_dir": "folder of 5-20 instance images (.jpg/.png/.webp, optional .txt captions)",
    "instance_prompt": "prompt for the instance images; must contain the token",
    "token": "the rare word that stands for the subject",
    "class_dir": "folder for class images (default: a cache folder keyed by the settings)",
    "alpha": "LoRA alpha; the LoRA scale is alpha/rank and is stored in the file",
    "max_train_steps": "number of optimizer updates",
    "sample_every": "make a sample grid every N steps (0: only at start and end)",
    "checkpoint_every": "write a resumable checkpoint every N steps (0: only at the end)",
    "snr_gamma": "min-SNR gamma loss weighting (0 = off, 5 is typical)",
    "mixed_precision": "auto (bf16 on GPUs that have it, else fp16; no on a CPU), no, fp16 (CUDA) or bf16",
    "gradient_checkpointing": "true, false or auto (on when the GPU has less than 12 GiB free)",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training settings (also accepted in a TOML file via --config)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{HELP.get(f.name, '')} (default: {default!r})".strip()
        group.add_argument(
            flag, dest=f.name, default=None, metavar=str(f.type).upper().replace("LIST[STR]", "A,B"), help=help_text
        )


def _toml_keys(path) -> set[str]:
    import tomllib

    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    return set(raw["train"] if set(raw) == {"train"} and isinstance(raw["train"], dict) else raw)


def _config_from_args(args) -> TrainConfig:
    data = {}
    if getattr(args, "config", None):
        from_file = TrainConfig.from_toml(args.config).to_dict()  # validated; keep only the keys the file sets
        data.update({k: from_file[k] for k in _toml_keys(args.config)})
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    # The CLI's base model is the pretrained tiny-fabric unless told otherwise; a built-in model trains at
    # its native size unless a resolution is given.
    data.setdefault("base_model", "tiny-fabric")
    if "resolution" not in data and data["base_model"] in BUILTIN_RESOLUTION:
        data["resolution"] = BUILTIN_RESOLUTION[data["base_model"]]
    return TrainConfig.from_dict(data)


# --------------------------------------------------------------------------- checks before heavy imports
# They read only the file system, the settings and safetensors headers, so a wrong path, file or setting is
# reported in a fraction of a second, before torch and diffusers are imported (5-15 s), and before anything
# is written.

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
    from .files.safetensors_header import read_safetensors_header

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


def check_adapter_args(args) -> None:
    """--lora and --embedding (generate, morph): .safetensors files only, checked without torch."""
    check_number(args.lora_scale, "--lora-scale", -16.0, 16.0)
    if args.lora:
        check_safetensors_file(
            args.lora, "LoRA file", "Give the .safetensors file written by training (result/<name>.safetensors)."
        )
    if args.embedding:
        check_safetensors_file(args.embedding, "Embedding file", "Give the .safetensors file written by TI training.")
        token = args.embedding_token
        if not token.strip() or any(c.isspace() for c in token):
            raise DreamLoomError(
                f"Invalid value --embedding-token {token!r}.", "Use one word with no spaces, e.g. '<sks-fabric>'."
            )


def uses_prior(cfg: TrainConfig) -> bool:
    return cfg.method == "lora" and cfg.with_prior_preservation and cfg.prior_loss_weight > 0


def check_train_paths(cfg: TrainConfig, args) -> Path:
    """The run folder, base model and class-image folder of a training run; returns the run folder."""
    if not cfg.instance_dir:
        raise DreamLoomError(
            "No instance images given.", "Pass --instance-dir FOLDER with 5-20 images of your subject."
        )
    run_dir = check_output_folder(args.output_dir, "--output-dir")
    check_base_model(cfg.base_model)
    if uses_prior(cfg):
        if not cfg.class_dir:
            check_output_folder(args.cache_dir or DEFAULT_CACHE_DIR, "--cache-dir")
        elif not Path(cfg.class_dir).expanduser().is_dir():  # a folder of existing images may be read-only
            check_output_folder(cfg.class_dir, "--class-dir")
    return run_dir


# --------------------------------------------------------------------------- a finished run folder
# A CLI run folder holds one run. When it holds a finished result (result/ and a `done` event), a run with the
# same settings and images prints that result instead of training again, and a run with other settings is
# refused: it would replace result/. The folder is the user's, so DreamLoom never moves or deletes it.


def finished_outputs(run_dir: Path, cfg: TrainConfig, dataset_fingerprint: str) -> dict | None:
    """The outputs of the finished run of these settings in `run_dir`, None if there is none to reuse, or a
    DreamLoomError if `run_dir` holds the result of another run."""
    result_dir = run_dir / "result"
    if not result_dir.is_dir() or not any(p.is_file() for p in result_dir.iterdir()):
        return None
    outputs = _last_done_outputs(run_dir / "events.jsonl")
    job = _read_json(run_dir / "job.json")
    old = job.get("config") if isinstance(job, dict) else None
    keep_both = (
        f"Pass another --output-dir (for example {_free_sibling(run_dir)}) to keep both; to replace the old "
        f"result, move or delete {run_dir} yourself first."
    )
    if not isinstance(old, dict):
        raise DreamLoomError(
            f"{run_dir} already holds a result/ folder whose settings are unknown (job.json is missing or "
            "unreadable); training here could replace it.",
            keep_both,
        )
    new = cfg.to_dict()
    changed = sorted(k for k in set(old) | set(new) if old.get(k, MISSING) != new.get(k, MISSING))
    if job.get("dataset_fingerprint") != dataset_fingerprint:
        changed.append("the instance images")
    elif "instance_dir" in changed:  # the same pictures and captions, named by another path: the same data
        changed.remove("instance_dir")
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


def cmd_train(args) -> int:
    cfg = _config_from_args(args).validate()
    run_dir = check_train_paths(cfg, args)
    from .data.images import load_image_folder  # PIL only: bad images are reported before torch is imported

    instance = load_image_folder(cfg.instance_dir, cfg.resolution, cfg.use_captions)
    done = finished_outputs(run_dir, cfg, instance.fingerprint())
    if done is not None:
        print(
            f"{run_dir} already holds the finished result of this run (same settings and images); not training "
            "again. Its outputs:",
            file=sys.stderr,
        )
        print(json.dumps(done, indent=2))
        return 0

    from .events import Events, TqdmListener
    from .training.loop import train

    events = Events(run_dir)
    listener = TqdmListener("train")
    events.listeners.append(listener)
    try:
        result = train(cfg, run_dir, events=events, cache_root=args.cache_dir, instance_set=instance)
    finally:
        listener.close()
    if result.outputs:  # only the main process of a distributed run has outputs
        print(json.dumps(result.outputs, indent=2))
    return 0


def cmd_class_images(args) -> int:
    check_whole(args.count, "--count", 1, 100_000)
    check_sampling_args(args)
    if not args.class_prompt.strip():
        raise DreamLoomError("The class prompt is empty.", "Give --class-prompt, for example 'a fabric pattern'.")
    root = check_output_folder(args.output_dir or args.cache_dir, "--output-dir" if args.output_dir else "--cache-dir")

    from .base_models.load import load_base_model
    from .data.class_images import MANIFEST, ClassImageSpec, class_dir_for, generate_class_images
    from .events import Events, TqdmListener
    from .training.precision import WEIGHT_DTYPES, best_device, resolve_mixed_precision

    comps = load_base_model(args.base_model)
    spec = ClassImageSpec(
        comps.fingerprint,
        args.class_prompt,
        args.negative_prompt,
        args.sampler,
        args.steps,
        args.guidance,
        args.resolution or comps.native_resolution,
        args.seed,
    )
    folder = root if args.output_dir else class_dir_for(root, spec)
    events = Events(None)
    listener = TqdmListener("class images")
    events.listeners.append(listener)
    device = best_device()
    precision, _ = resolve_mixed_precision("auto", device.type)  # fp16/bf16 on a GPU, fp32 on a CPU
    created = _missing_folders(folder)
    had_manifest = (folder / MANIFEST).exists()
    try:
        paths = generate_class_images(
            comps,
            spec,
            args.count,
            folder,
            args.batch_size,
            device=device,
            dtype=WEIGHT_DTYPES.get(precision),
            events=events,
        )
    except BaseException:
        _remove_if_unused(folder, created, had_manifest, MANIFEST)
        raise
    finally:
        listener.close()
    print(f"{len(paths)} class images in {folder}")
    return 0


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing, p = [], folder.absolute()
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    return missing


def _remove_if_unused(folder: Path, created: list[Path], had_manifest: bool, manifest: str) -> None:
    """After a refused or failed class-image run that made no image: take back the manifest and the folders
    this run created, so nothing half-made is left behind. Images already made are kept (the set resumes)."""
    if not folder.is_dir() or any(folder.glob("class_*.png")):
        return
    if not had_manifest:
        (folder / manifest).unlink(missing_ok=True)
    for path in created:
        try:
            path.rmdir()  # only an empty folder
        except OSError:
            break


def pipeline_with_adapters(args):
    """The base model as a pipeline on the best device, with --lora and --embedding applied."""
    from .base_models.load import load_base_model
    from .formats.embeddings import load_embedding_into_pipeline
    from .inference.pipelines import load_lora_into_pipeline, make_pipeline
    from .training.precision import best_device

    comps = load_base_model(args.base_model)
    pipe = make_pipeline(comps, args.sampler)
    pipe.to(best_device())
    if args.lora:
        load_lora_into_pipeline(pipe, args.lora, args.lora_scale)
    if args.embedding:
        load_embedding_into_pipeline(pipe, args.embedding, args.embedding_token)
    return comps, pipe


def cmd_generate(args) -> int:
    check_sampling_args(args)
    check_adapter_args(args)
    check_output_file(args.out, "--out", (".png",))

    from .files.atomic import atomic_save
    from .inference.pipelines import generate
    from .pictures.grid import labelled_grid

    comps, pipe = pipeline_with_adapters(args)
    subject = args.subject
    if args.prompt:
        prompts, labels = list(args.prompt), list(args.prompt)
    else:
        prompts = [tpl.format(s=subject) for _, tpl in GRID_CONTEXTS]
        labels = [f"{name}: {p}" for (name, _), p in zip(GRID_CONTEXTS, prompts)]
    seeds = [args.seed] * len(prompts)
    resolution = args.resolution or comps.native_resolution
    images = generate(
        pipe,
        prompts,
        seeds,
        args.steps,
        args.guidance,
        resolution,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
    )
    grid = labelled_grid(images, labels, cols=3, tile=max(resolution, 160), title=args.title)
    atomic_save(args.out, lambda tmp: grid.save(tmp, format="PNG"))
    print(f"wrote {args.out}")
    return 0


def cmd_morph(args) -> int:
    from .inference.slerp import parse_seeds  # no torch

    check_sampling_args(args)
    check_adapter_args(args)
    check_number(args.seconds, "--seconds", 0.0, 3600.0, low_open=True)
    check_number(args.fps, "--fps", 0.0, 120.0, low_open=True)
    check_whole(args.keyframes, "--keyframes", 0, 1000)
    check_whole(args.hold_frames, "--hold-frames", 0, 10_000)
    seeds = parse_seeds(args.seeds)
    check_output_file(args.out, "--out", (".gif", ".webp", ".mp4"))

    from .events import TqdmListener
    from .inference.morph import MorphSpec, render_morph
    from .pictures.animation import write_animation

    comps, pipe = pipeline_with_adapters(args)
    if args.keyframes and args.keyframes != len(seeds):
        seeds = (
            (seeds * args.keyframes)[: args.keyframes]
            if args.keyframes < len(seeds)
            else seeds + [seeds[-1] + 1000 * i for i in range(1, args.keyframes - len(seeds) + 1)]
        )
    spec = MorphSpec(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seeds=seeds,
        seconds=args.seconds,
        fps=args.fps,
        easing=args.easing,
        hold_frames=args.hold_frames,
        loop=not args.open,
        steps=args.steps,
        guidance=args.guidance,
        resolution=args.resolution or comps.native_resolution,
        sampler=args.sampler,
    )
    bar = TqdmListener("morph")
    frames = render_morph(
        pipe,
        spec,
        args.batch_size,
        on_progress=lambda done, total: bar({"event": "progress", "phase": "morph", "step": done, "total": total}),
    )
    bar.close()
    notes = write_animation(frames, args.out, args.fps)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out}: {len(frames)} frames, {len(frames) / args.fps:.2f} s at {args.fps:g} fps")
    return 0


def cmd_bench(args) -> int:
    check_base_model(args.base_model)
    check_output_file(args.json, "--json")
    from .lab.bench import bench

    bench(
        args.base_model,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        resolution=args.resolution or None,
        morph=not args.skip_morph,
        out=args.json,
        compile_unet=args.compile,
    )
    return 0


def cmd_demo(args) -> int:
    check_base_model(args.base_model)
    check_output_folder(args.output_dir, "--output-dir")
    from .lab.demo import run_demo

    run_demo(Path(args.output_dir), steps=args.steps, quick=args.quick, base_model=args.base_model)
    return 0


def cmd_pretrain_tiny(args) -> int:
    check_output_folder(args.output_dir, "--output-dir")
    from .lab.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        out=Path(args.output_dir),
        per_family=args.per_family,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        crop_steps=min(args.crop_steps, args.unet_steps),
        seed=args.seed,
        threads=args.threads or None,
        time_budget_s=args.time_budget * 60 if args.time_budget else None,
        resume_vae=args.resume_vae,
    )
    info = pretrain(cfg)
    if args.install:
        import shutil

        from .base_models.builtin import TINY_FABRIC_PATH
        from .files.atomic import atomic_save

        atomic_save(TINY_FABRIC_PATH, lambda tmp: shutil.copyfile(info["path"], tmp))
        print(f"installed as the built-in tiny-fabric model: {TINY_FABRIC_PATH}")
    return 0


def cmd_quality(args) -> int:
    check_base_model(args.base_model)
    check_output_folder(args.output_dir, "--output-dir")
    from .lab.quality import QualitySpec, run_quality

    spec = QualitySpec(
        base_model=args.base_model,
        training_seeds=tuple(int(s) for s in args.training_seeds.split(",")),
        sample_seeds=tuple(int(s) for s in args.sample_seeds.split(",")),
        lora_steps=args.lora_steps,
        ti_steps=args.ti_steps,
        num_class_images=args.class_images,
        gen_steps=args.gen_steps,
        train_text_encoder=not args.unet_only,
    )
    report = run_quality(Path(args.output_dir), spec)
    return 0 if all(report["summary"]["targets"].values()) or not args.strict else 1


def cmd_worker(args) -> int:
    from .jobs.worker import main as worker_main

    return worker_main(args.job)


def _add_pipeline_flags(p: argparse.ArgumentParser, sampler_help: str = "") -> None:
    """Flags shared by the commands that generate pictures with a base model and optional adapters."""
    p.add_argument("--base-model", default="tiny-fabric")
    p.add_argument("--lora", help="LoRA .safetensors to apply (kohya or diffusers format)")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--embedding", help="textual inversion .safetensors")
    p.add_argument("--embedding-token", default="<sks-fabric>", help="token the embedding is used as in prompts")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="dpmpp_2m", help=sampler_help or None)
    p.add_argument("--resolution", type=int, default=0, help="default: the model's native size")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a DreamBooth LoRA or a textual inversion embedding")
    p.add_argument("--config", help="TOML file with settings (flags override it)")
    p.add_argument(
        "--output-dir",
        required=True,
        help="run folder: checkpoints, samples, loss, result/. A folder that holds a finished run is never "
        "overwritten: the same settings and images print its outputs, other settings are refused",
    )
    p.add_argument("--cache-dir", default=None, help=f"where class images are cached (default {DEFAULT_CACHE_DIR})")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)


def _add_class_images(sub) -> None:
    p = sub.add_parser("class-images", help="generate (or complete) a cached set of class images")
    p.add_argument("--base-model", default="tiny-fabric")
    p.add_argument("--class-prompt", default="a fabric pattern")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--resolution", type=int, default=0, help="default: the model's native size")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--output-dir", default=None, help="folder (default: cache folder keyed by the settings)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    p.set_defaults(func=cmd_class_images)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="a labelled prompt grid, with a LoRA and/or embedding applied")
    _add_pipeline_flags(p)
    p.add_argument("--subject", default="sks african fabric pattern", help="fills {s} in the nine default contexts")
    p.add_argument("--prompt", action="append", help="explicit prompt (repeatable); replaces the nine contexts")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=3)
    p.add_argument("--title", default=None)
    p.add_argument("--out", default="grid.png")
    p.set_defaults(func=cmd_generate)


def _add_morph(sub) -> None:
    p = sub.add_parser("morph", help="a seamless looping SLERP morph animation (GIF, WebP or MP4)")
    _add_pipeline_flags(p, sampler_help="use a deterministic sampler (dpmpp_2m, euler, ddim)")
    p.add_argument("--prompt", default="a sks african fabric pattern")
    p.add_argument("--seeds", default="1, 42, 100, 256, 512", help="keyframe seeds, comma separated")
    p.add_argument("--keyframes", type=int, default=0, help="number of keyframes (default: one per seed)")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--easing", default="linear", choices=["linear", "cosine", "smoothstep"])
    p.add_argument("--hold-frames", type=int, default=0, help="frames to rest on each keyframe")
    p.add_argument("--open", action="store_true", help="an open path instead of a seamless loop")
    p.add_argument("--batch-size", type=int, default=8, help="frames per pipeline call")
    p.add_argument("--out", default="morph.gif", help=".gif, .webp or .mp4")
    p.set_defaults(func=cmd_morph)


def _add_lab_commands(sub) -> None:
    """demo, bench, pretrain-tiny and quality: the recipes in trainer/lab."""
    p = sub.add_parser("demo", help="the whole fabric pipeline on the built-in tiny-fabric model")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument(
        "--base-model", default="tiny-fabric", help="tiny-fabric (pretrained), tiny (random weights) or an SD1.5 file"
    )
    p.add_argument("--steps", type=int, default=None, help="override the demo's training steps")
    p.add_argument("--quick", action="store_true", help="a smaller, faster demo (used by the tests)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench", help="training steps/s and memory against the tutorial's loop; batched vs per-frame morph"
    )
    p.add_argument("--base-model", default="tiny")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resolution", type=int, default=0, help="default: 64 for tiny, 512 otherwise")
    p.add_argument("--skip-morph", action="store_true")
    p.add_argument(
        "--compile", action="store_true", help="ours with torch.compile on the UNet (compile time is in the warm-up)"
    )
    p.add_argument("--json", default="bench.json", help="where to write the JSON result")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "pretrain-tiny", help="pretrain the built-in tiny-fabric base model on the procedural corpus (CPU, ~50 min)"
    )
    p.add_argument("--output-dir", default="pretrain_output")
    p.add_argument("--per-family", type=int, default=1000, help="corpus images per pattern family")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--crop-steps", type=int, default=1800, help="UNet steps on 16x16 latent crops before whole latents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--time-budget", type=float, default=58, help="minutes; stop the UNet stage early when reached")
    p.add_argument("--resume-vae", action="store_true", help="reuse the stage-1 VAE in --output-dir")
    p.add_argument("--install", action="store_true", help="copy the result over the built-in tiny-fabric weights")
    p.set_defaults(func=cmd_pretrain_tiny)

    p = sub.add_parser("quality", help="mini DreamBench on the held-out style: LoRA +/- prior and TI vs the base model")
    p.add_argument("--output-dir", default="quality_output")
    p.add_argument("--base-model", default="tiny-fabric")
    p.add_argument("--training-seeds", default="0,1,2", help="comma separated; one training run per method and seed")
    p.add_argument("--sample-seeds", default="11,22,33,44", help="comma separated generation seeds")
    p.add_argument("--lora-steps", type=int, default=800)
    p.add_argument("--ti-steps", type=int, default=800)
    p.add_argument("--class-images", type=int, default=100)
    p.add_argument("--gen-steps", type=int, default=20, help="sampler steps per generated image")
    p.add_argument(
        "--unet-only",
        action="store_true",
        help="LoRA on the UNet only (the tutorial's setting) instead of UNet + text encoder",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.set_defaults(func=cmd_quality)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer", description="DreamLoom: DreamBooth LoRA and Textual Inversion for SD1.5."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_class_images(sub)
    _add_generate(sub)
    _add_morph(sub)
    _add_lab_commands(sub)
    p = sub.add_parser("worker", help=argparse.SUPPRESS)
    p.add_argument("job")
    p.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .base_models.offline import set_offline

    set_offline()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DreamLoomError as err:
        print(f"error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"fix: {err.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
