"""The CLI commands: each validates its arguments first, then imports what it runs."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from ..config import TrainConfig
from ..errors import DreamLoomError
from ..files.atomic import check_new_file
from ..inference.prompts import GRID_CONTEXTS
from .args import _config_from_args
from .checks import (
    check_adapter_args,
    check_base_model,
    check_lora_tool_output,
    check_number,
    check_output_file,
    check_output_folder,
    check_rank_args,
    check_resolution,
    check_safetensors_file,
    check_sampling_args,
    check_train_paths,
    check_whole,
    finished_outputs,
    parse_lora_strength,
)


def cmd_train(args) -> int:
    cfg = _config_from_args(args).validate()
    run_dir = check_train_paths(cfg, args)
    from ..data.concepts import load_concept_images  # PIL only: bad images are reported before torch is imported

    instance = load_concept_images(cfg)
    done = finished_outputs(run_dir, cfg, instance.fingerprint())
    if done is not None:
        print(
            f"{run_dir} already holds the finished result of this run (same settings and images); not training "
            "again. Its outputs:",
            file=sys.stderr,
        )
        print(json.dumps(done, indent=2))
        return 0

    from ..errors import StopRequested
    from ..events import Events, TqdmListener
    from ..stop_signals import GracefulStop, tell_user
    from ..training.loop import train

    events = Events(run_dir)
    listener = TqdmListener("train")
    events.listeners.append(listener)
    try:
        with GracefulStop(announce=tell_user) as stop_signal:
            result = train(
                cfg,
                run_dir,
                events=events,
                cache_root=args.cache_dir,
                instance_set=instance,
                should_stop=stop_signal.requested,
            )
    except (StopRequested, InterruptedError) as stopped:
        where = (
            f"at step {stopped.step}; checkpoint {stopped.checkpoint}"
            if isinstance(stopped, StopRequested)
            else (f"while making class images ({stopped}); the images made so far are kept")
        )
        print(f"\nstopped {where}.\nRun the same command again to resume.", file=sys.stderr)
        return stop_signal.exit_code()
    except DreamLoomError as err:  # a failure before or during training: events.jsonl says so too
        events.listeners.remove(listener)  # main() prints it, once, as `error:` and `fix:`
        events.emit("error", message=err.message, hint=err.hint)
        raise
    finally:
        listener.close()
    if result.outputs:  # only the main process of a distributed run has outputs
        print(json.dumps(result.outputs, indent=2))
    return 0


def class_image_spec(args, fingerprint: str, native_resolution: int):
    """The set `class-images` makes: with its defaults, the set `train` looks for (ClassImageSpec.for_training)."""
    from ..data.class_images import ClassImageSpec

    return ClassImageSpec(
        fingerprint,
        args.class_prompt,
        args.negative_prompt,
        args.sampler,
        args.steps,
        args.guidance,
        args.resolution or native_resolution,
        args.seed,
    )


def cmd_class_images(args) -> int:
    check_whole(args.count, "--count", 1, 100_000)
    check_sampling_args(args)
    if not args.class_prompt.strip():
        raise DreamLoomError("The class prompt is empty.", "Give --class-prompt, for example 'a fabric pattern'.")
    root = check_output_folder(args.output_dir or args.cache_dir, "--output-dir" if args.output_dir else "--cache-dir")

    from ..base_models.load import load_base_model
    from ..data.class_images import MANIFEST, class_dir_for, generate_class_images
    from ..events import Events, TqdmListener
    from ..training.precision import inference_placement

    device, dtype = inference_placement()  # fp16/bf16 on a GPU, fp32 on a CPU; loaded so (no fp32 copy first)
    comps = load_base_model(args.base_model, dtype=dtype)
    spec = class_image_spec(args, comps.fingerprint, comps.native_resolution)
    folder = root if args.output_dir else class_dir_for(root, spec)
    events = Events(None)
    listener = TqdmListener("class images")
    events.listeners.append(listener)
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
            dtype=dtype,
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


def trained_on(header: dict) -> str:
    """The name of the model an adapter file says it was trained on (DreamLoom's or kohya's metadata), or ''."""
    meta = header.get("__metadata__") or {}
    return Path(meta.get("dreamloom.base_model") or meta.get("ss_sd_model_name") or "").name


def check_lora_family(path: str, comps) -> None:
    """Refuse a LoRA made for another model family (an SD1.5 LoRA on SDXL), naming both, before any sampling."""
    from ..files.safetensors_header import read_safetensors_header
    from ..formats.lora_import import lora_family

    if not Path(path).is_file():
        return  # the loader says it is missing
    header = read_safetensors_header(path)
    made_for = lora_family(header)
    if made_for and made_for != comps.family.name:
        base = trained_on(header)
        raise DreamLoomError(
            f"{Path(path).name} was trained on {made_for}{f' ({base})' if base else ''}; the base model "
            f"{Path(comps.source).name} is {comps.family.name}.",
            f"Use an {comps.family.name} LoRA with this model, or pass the {made_for} checkpoint it was trained on as "
            "--base-model.",
        )


def check_embedding_token_used(args, prompts: list[str], where: str) -> None:
    """An --embedding changes only prompts that hold its token: refuse a run whose prompts all lack it (it would
    render the base model's pictures and look like an embedding that learned nothing)."""
    for path, token in args.embeddings:
        if not any(token in prompt for prompt in prompts):
            raise DreamLoomError(
                f"No prompt contains the token {token!r} of the embedding {Path(path).name}, so it would change "
                "nothing.",
                f"Put {token} in {where} (e.g. 'a dress in the style of {token}'), or give --embedding-token the "
                "token your prompts use.",
            )


def pipeline_with_adapters(args):
    """The base model as a pipeline on the best device, with every --lora (at its strength) and --embedding."""
    from ..base_models.load import load_base_model
    from ..formats.embeddings import load_embedding_into_pipeline
    from ..formats.lora_fuse import fuse_lora
    from ..inference.pipelines import make_pipeline
    from ..training.precision import inference_placement, to_inference_device

    _, dtype = inference_placement()
    comps = load_base_model(args.base_model, dtype=dtype)  # on a GPU in fp16/bf16 at once: no fp32 copy first
    pipe = make_pipeline(comps, args.sampler)
    to_inference_device(pipe)
    for path, _ in args.loras:  # every file checked before any is fused: a refusal leaves nothing half-applied
        check_lora_family(path, comps)
    for path, strength in args.loras:
        fuse_lora(comps, path, strength)
    for path, token in args.embeddings:
        with embedding_fit(path, comps):
            load_embedding_into_pipeline(pipe, path, token)
    native = comps.native_resolution
    if args.resolution and not native / 2 <= args.resolution <= native * 2:
        expect = "repeated subjects and broken layouts" if args.resolution > native else "blurred, broken pictures"
        print(
            f"note: --resolution {args.resolution} is far from the model's native {native} px: expect {expect}. "
            f"Generate at {native} (and upscale for a big picture).",
            file=sys.stderr,
        )
    return comps, pipe


@contextlib.contextmanager
def embedding_fit(path: str, comps):
    """Turn the embedding loader's errors for a file that does not fit the base model (another model's widths, a LoRA
    given as an embedding) into one message naming both and the fix."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as err:
        from ..files.safetensors_header import read_safetensors_header

        base = trained_on(read_safetensors_header(path))
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "size mismatch" in str(err) or "incorrect shape" in reason:
            reason = "its vectors have another width than this model's"
        raise DreamLoomError(
            f"{Path(path).name} does not fit the base model {Path(comps.source).name} ({reason[:200]})"
            + (f"; it was trained on {base}." if base else "."),
            f"Pass the model it was trained on as --base-model{f' ({base})' if base else ''}, and give --embedding "
            "a textual-inversion embedding (LoRAs go to --lora, embeddings to --embedding).",
        ) from None


def note_gpu_batch(requested: int, resolution: int, pipe, what: str) -> None:
    """Say so when a GPU's per-call cap (inference/pipelines.py:gpu_batch_for) makes fewer at a time than asked."""
    from ..inference.pipelines import gpu_batch_for

    batch = gpu_batch_for(requested, resolution, pipe.unet.device.type)
    if batch < requested:
        note = f"note: {batch} {what} per pipeline call at {resolution} px on a GPU (--batch-size {requested})"
        print(note, file=sys.stderr)


def cmd_generate(args) -> int:
    check_sampling_args(args)
    check_adapter_args(args)
    check_output_file(args.out, "--out", (".png",))
    check_new_file(args.out, args.overwrite, "--out")
    subject = args.subject
    if args.prompt:
        prompts, labels = list(args.prompt), list(args.prompt)
    else:
        prompts = [tpl.format(s=subject) for _, tpl in GRID_CONTEXTS]
        labels = [f"{name}: {p}" for (name, _), p in zip(GRID_CONTEXTS, prompts)]
    check_embedding_token_used(args, prompts, "--prompt, or in --subject")

    from ..files.atomic import atomic_save
    from ..inference.pipelines import generate
    from ..pictures.grid import labelled_grid

    comps, pipe = pipeline_with_adapters(args)
    seeds = [args.seed] * len(prompts)
    resolution = args.resolution or comps.native_resolution
    note_gpu_batch(args.batch_size, resolution, pipe, "images")
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
    from ..inference.slerp import parse_seeds  # no torch

    check_sampling_args(args)
    check_adapter_args(args)
    check_number(args.seconds, "--seconds", 0.0, 3600.0, low_open=True)
    check_number(args.fps, "--fps", 0.0, 120.0, low_open=True)
    check_whole(args.keyframes, "--keyframes", 0, 1000)
    check_whole(args.hold_frames, "--hold-frames", 0, 10_000)
    seeds = parse_seeds(args.seeds)
    if args.keyframes and args.keyframes != len(seeds):
        seeds = (
            (seeds * args.keyframes)[: args.keyframes]
            if args.keyframes < len(seeds)
            else seeds + [seeds[-1] + 1000 * i for i in range(1, args.keyframes - len(seeds) + 1)]
        )
    check_output_file(args.out, "--out", (".gif", ".webp", ".mp4"))
    check_new_file(args.out, args.overwrite, "--out")
    check_embedding_token_used(args, [args.prompt], "--prompt")
    from ..inference.morph import MorphSpec, render_morph  # no torch

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
        sampler=args.sampler,
    )
    spec.check()

    from ..events import TqdmListener
    from ..pictures.animation import write_animation

    comps, pipe = pipeline_with_adapters(args)
    spec.resolution = args.resolution or comps.native_resolution
    note_gpu_batch(args.batch_size, spec.resolution, pipe, "frames")
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


CHECKPOINT_HINT = "Give an SD1.5 or SDXL single-file .safetensors checkpoint."
LORA_HINT = "Give a LoRA .safetensors file (kohya, diffusers or PEFT)."


def _rank_options(args) -> dict:
    """The options extract-lora and resize-lora both pass on to their tool."""
    return {"keep_share": args.keep_share, "precision": args.precision, "overwrite": args.overwrite}


def _run_lora_tool(phase: str, make, describe, out: Path) -> int:
    """Runs `make(progress)` (a LoRA tool writing `out`) under a progress bar, then prints `describe(report)` and
    where the file went."""
    from ..events import TqdmListener

    bar = TqdmListener(phase)
    try:
        report = make(lambda done, total: bar({"event": "progress", "phase": phase, "step": done, "total": total}))
    finally:
        bar.close()
    print(describe(report))
    print(f"wrote {out}")
    return 0


def cmd_extract_lora(args) -> int:
    base = check_safetensors_file(args.base, "Base checkpoint", CHECKPOINT_HINT)
    tuned = check_safetensors_file(args.tuned, "Fine-tuned checkpoint", CHECKPOINT_HINT)
    check_rank_args(args)
    out = check_lora_tool_output(args, [base, tuned])

    from ..formats.lora_tools import extract_lora

    return _run_lora_tool(
        "extract",
        lambda progress: extract_lora(
            base,
            tuned,
            out,
            args.rank,
            modules=args.modules,
            text_encoders=not args.no_text_encoder,
            progress=progress,
            **_rank_options(args),
        ),
        lambda report: report.text(),
        out,
    )


def cmd_merge_lora(args) -> int:
    checkpoint = check_safetensors_file(args.checkpoint, "Checkpoint", CHECKPOINT_HINT)
    loras = []
    for spec in args.lora:
        path, strength = parse_lora_strength(spec)
        check_number(strength, f"--lora {spec} strength", -16.0, 16.0)
        loras.append((check_safetensors_file(path, "LoRA file", LORA_HINT), strength))
    out = check_lora_tool_output(args, [checkpoint, *(p for p, _ in loras)])

    from ..formats.lora_tools import merge_loras

    return _run_lora_tool(
        "merge",
        lambda progress: merge_loras(checkpoint, loras, out, overwrite=args.overwrite, progress=progress),
        lambda report: report.summary(),
        out,
    )


def cmd_resize_lora(args) -> int:
    lora = check_safetensors_file(args.lora, "LoRA file", LORA_HINT)
    check_rank_args(args)
    out = check_lora_tool_output(args, [lora])

    from ..formats.lora_tools import resize_lora

    return _run_lora_tool(
        "resize",
        lambda progress: resize_lora(lora, out, args.rank, progress=progress, **_rank_options(args)),
        lambda report: report.text(),
        out,
    )


def cmd_doctor(args) -> int:
    from ..lab.doctor import doctor

    print(
        doctor(
            base_model=args.base_model,
            resolution=args.resolution or None,
            method=args.method,
            batch_size=args.train_batch_size,
            train_text_encoder=args.train_text_encoder,
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing,
            use_8bit_adam=args.use_8bit_adam,
            use_ema=args.use_ema,
        )
    )
    return 0


def cmd_bench(args) -> int:
    if args.run_one:  # one contender, in the fresh process `bench` started for it
        from ..lab.bench import run_one

        run_one(args.run_one, args.spec, args.json)
        return 0
    check_base_model(args.base_model)
    check_whole(args.steps, "--steps", 1, 100_000)
    check_whole(args.warmup, "--warmup", 1, 10_000)
    check_whole(args.repeats, "--repeats", 1, 1000)
    if args.resolution:
        check_resolution(args.resolution)
    if args.compare_diffusers and not Path(args.compare_diffusers).expanduser().is_file():
        raise DreamLoomError(
            f"--compare-diffusers {args.compare_diffusers}: no such file.",
            "Give the path of diffusers' examples/dreambooth/train_dreambooth_lora.py (the version that matches "
            "the installed diffusers).",
        )
    check_output_file(args.json, "--json")
    # auto/true/false read as the config reads them everywhere else
    half_frozen_convs = TrainConfig.from_dict({"half_frozen_convs": args.half_frozen_convs}).half_frozen_convs
    from ..lab.bench import bench

    bench(
        args.base_model,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        resolution=args.resolution or None,
        morph=not args.skip_morph,
        out=args.json,
        compile_unet=args.compile,
        malloc=args.malloc,
        compare_diffusers=args.compare_diffusers,
        compare_buckets=args.compare_buckets,
        cfg_overrides={
            "mixed_precision": args.mixed_precision,
            "gradient_checkpointing": args.gradient_checkpointing,
            "half_frozen_convs": half_frozen_convs,
            "cudnn_benchmark": args.cudnn_benchmark,
        },
    )
    return 0


def cmd_demo(args) -> int:
    for value, flag in ((args.steps, "--steps"), (args.ti_steps, "--ti-steps")):
        if value is not None:
            check_whole(value, flag, 1, 1_000_000)
    check_base_model(args.base_model)
    check_output_folder(args.output_dir, "--output-dir")
    from ..lab.demo import run_demo

    run_demo(
        Path(args.output_dir), steps=args.steps, quick=args.quick, base_model=args.base_model, ti_steps=args.ti_steps
    )
    return 0


def cmd_pretrain_tiny(args) -> int:
    check_whole(args.per_family, "--per-family", 1, 1_000_000)
    check_whole(args.vae_steps, "--vae-steps", 0 if args.resume_vae else 1, 10_000_000)
    check_whole(args.unet_steps, "--unet-steps", 1, 10_000_000)
    check_whole(args.crop_steps, "--crop-steps", 0, 10_000_000)
    check_whole(args.threads, "--threads", 0, 4096)
    check_number(args.time_budget, "--time-budget", 0.0, 100_000.0)
    check_output_folder(args.output_dir, "--output-dir")
    from ..lab.pretrain import PretrainConfig, pretrain

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

        from ..base_models.builtin import TINY_FABRIC_PATH
        from ..files.atomic import atomic_save

        atomic_save(TINY_FABRIC_PATH, lambda tmp: shutil.copyfile(info["path"], tmp))
        print(f"installed as the built-in tiny-fabric model: {TINY_FABRIC_PATH}")
    return 0


def cmd_quality(args) -> int:
    from ..inference.slerp import parse_seeds  # no torch

    training_seeds, sample_seeds = parse_seeds(args.training_seeds, 1), parse_seeds(args.sample_seeds, 1)
    for value, flag in (
        (args.lora_steps, "--lora-steps"),
        (args.ti_steps, "--ti-steps"),
        (args.gen_steps, "--gen-steps"),
    ):
        check_whole(value, flag, 1, 1_000_000)
    check_whole(args.class_images, "--class-images", 0, 100_000)
    check_base_model(args.base_model)
    check_output_folder(args.output_dir, "--output-dir")
    from ..lab.quality import QualitySpec, run_quality

    spec = QualitySpec(
        base_model=args.base_model,
        training_seeds=tuple(training_seeds),
        sample_seeds=tuple(sample_seeds),
        lora_steps=args.lora_steps,
        ti_steps=args.ti_steps,
        num_class_images=args.class_images,
        gen_steps=args.gen_steps,
        train_text_encoder=not args.unet_only,
    )
    report = run_quality(Path(args.output_dir), spec)
    return 0 if all(report["summary"]["targets"].values()) or not args.strict else 1


def cmd_worker(args) -> int:
    from ..jobs.worker import main as worker_main

    return worker_main(args.job)
