"""`python -m trainer <command>`: train, class-images, generate, morph, extract-lora, merge-lora, resize-lora, doctor,
demo, bench, quality, worker."""

from __future__ import annotations

import argparse
import sys

from ..config import DEFAULT_CACHE_DIR, TrainConfig
from ..errors import DreamLoomError
from .args import _add_config_flags, _config_from_args
from .checks import DEFAULT_EMBEDDING_TOKEN
from .commands import (
    cmd_bench,
    cmd_class_images,
    cmd_demo,
    cmd_doctor,
    cmd_extract_lora,
    cmd_generate,
    cmd_merge_lora,
    cmd_morph,
    cmd_pretrain_tiny,
    cmd_quality,
    cmd_resize_lora,
    cmd_train,
    cmd_worker,
)

__all__ = ["build_parser", "main", "_config_from_args"]


def _add_pipeline_flags(p: argparse.ArgumentParser, sampler_help: str = "") -> None:
    """Flags shared by the commands that generate pictures with a base model and optional adapters."""
    p.add_argument("--base-model", default="tiny-fabric")
    p.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:STRENGTH]",
        help="LoRA .safetensors to apply (kohya, diffusers or PEFT format); repeat for several",
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of each --lora given without one")
    p.add_argument("--embedding", action="append", metavar="FILE", help="textual inversion .safetensors; repeatable")
    p.add_argument(
        "--embedding-token",
        action="append",
        metavar="TOKEN",
        help=f"the token each --embedding is used as in prompts, in the same order (default {DEFAULT_EMBEDDING_TOKEN})",
    )
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="dpmpp_2m", help=sampler_help or None)
    p.add_argument("--resolution", type=int, default=0, help="default: the model's native size")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a DreamBooth LoRA, a textual inversion embedding or a full DreamBooth fine-tune"
    )
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
    # train's defaults (TrainConfig), so that a set made here with them is the cache train looks for
    d = TrainConfig()
    p.add_argument("--base-model", default="tiny-fabric")
    p.add_argument("--class-prompt", default=d.class_prompt)
    p.add_argument("--negative-prompt", default=d.class_negative_prompt)
    p.add_argument("--count", type=int, default=d.num_class_images)
    p.add_argument("--resolution", type=int, default=0, help="default: the model's native size")
    p.add_argument("--steps", type=int, default=d.class_steps)
    p.add_argument("--guidance", type=float, default=d.class_guidance)
    p.add_argument("--sampler", default=d.class_sampler)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.class_batch_size)
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
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
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
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_morph)


def _add_lora_tools(sub) -> None:
    """extract-lora, merge-lora and resize-lora: trainer/formats/lora_tools.py."""
    share_help = (
        "a dynamic rank: per module, the lowest rank (at most --rank) that keeps this share of its difference's "
        "energy, e.g. 0.9"
    )
    precision_help = "dtype of the LoRA's weights"
    p = sub.add_parser(
        "extract-lora",
        help="a LoRA holding a fine-tuned checkpoint's difference to its base (truncated SVD), with the share kept",
    )
    p.add_argument("--base", required=True, help="the base checkpoint (.safetensors, SD1.5 or SDXL single file)")
    p.add_argument("--tuned", required=True, help="the fine-tuned checkpoint made from it")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (clamped to what each layer allows)")
    p.add_argument(
        "--modules",
        choices=["attention", "all"],
        default="attention",
        help="attention: the attention projections (the trainer's LoRA targets); all: every Linear and Conv layer "
        "(3x3 convs as LoCon)",
    )
    p.add_argument("--no-text-encoder", action="store_true", help="leave the text encoders out")
    p.add_argument("--keep-share", type=float, default=None, help=share_help)
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16", help=precision_help)
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors, kohya format)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_extract_lora)

    p = sub.add_parser("merge-lora", help="a new checkpoint with LoRAs merged into its weights")
    p.add_argument("--checkpoint", required=True, help="the checkpoint (.safetensors, SD1.5 or SDXL single file)")
    p.add_argument(
        "--lora",
        action="append",
        required=True,
        metavar="FILE[:STRENGTH]",
        help="a LoRA (kohya, diffusers or PEFT) and its strength (default 1); repeat for several",
    )
    p.add_argument("--out", required=True, help="the checkpoint file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("resize-lora", help="a LoRA at a lower rank (SVD of each module), with the share kept")
    p.add_argument("--lora", required=True, help="the LoRA (.safetensors: kohya, diffusers or PEFT)")
    p.add_argument("--rank", type=int, required=True, help="the new rank")
    p.add_argument("--keep-share", type=float, default=None, help=share_help)
    p.add_argument(
        "--precision",
        choices=["fp16", "bf16", "fp32"],
        default=None,
        help=precision_help + " (default: as the input's)",
    )
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors, kohya format)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_resize_lora)


def _add_lab_commands(sub) -> None:
    """demo, bench, pretrain-tiny and quality: the recipes in trainer/lab."""
    p = sub.add_parser("demo", help="the whole fabric pipeline on the built-in tiny-fabric model")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument(
        "--base-model", default="tiny-fabric", help="tiny-fabric (pretrained), tiny (random weights) or an SD1.5 file"
    )
    p.add_argument("--steps", type=int, default=None, help="override the demo's training steps")
    p.add_argument("--ti-steps", type=int, default=None, help="textual inversion's steps (default: --steps, or 600)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster demo (used by the tests)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench",
        help="training s/step, page faults, CPU time and peak memory of ours against the tutorial's loop (and "
        "diffusers' example script), each in a fresh process; batched vs per-frame morph",
    )
    p.add_argument("--base-model", default="tiny")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (at least 1)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every contender in a fresh process")
    p.add_argument("--resolution", type=int, default=0, help="default: 64 for tiny, 512 otherwise")
    p.add_argument("--skip-morph", action="store_true")
    p.add_argument(
        "--compile", action="store_true", help="ours with torch.compile on the UNet (compile time is in the warm-up)"
    )
    p.add_argument(
        "--malloc",
        choices=["tuned", "default", "both", "all"],
        default=None,
        help="glibc allocator: tuned (ours and the tutorial loop with the GLIBC_TUNABLES training gets on a CPU; "
        "diffusers' script in the default environment), default (glibc's defaults for all), both (tuned, and ours "
        "also with glibc's defaults) or all (both, and diffusers' script also tuned); default: both on a Linux "
        "CPU, else tuned",
    )
    p.add_argument(
        "--compare-diffusers",
        metavar="TRAIN_DREAMBOOTH_LORA_PY",
        default=None,
        help="also run diffusers' examples/dreambooth/train_dreambooth_lora.py (unchanged) at the same settings",
    )
    p.add_argument(
        "--mixed-precision",
        choices=["auto", "no", "fp16", "bf16"],
        default="auto",
        help="precision of every contender; auto: fp16 on a GPU (the memory budgets' setting), fp32 on a CPU",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="every contender with gradient checkpointing")
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="ours and the bare UNet with cuDNN's algorithm search (CUDA only; diffusers' script and the tutorial as "
        "they are)",
    )
    p.add_argument(
        "--half-frozen-convs",
        choices=["auto", "true", "false"],
        default="auto",
        help="ours and the bare UNet: frozen conv weights kept in the checkpoint's fp16/bf16 under fp32 training "
        "(auto: on for fp32 on a CPU, as train does)",
    )
    p.add_argument("--json", default="bench.json", help="where to write the JSON result")
    p.add_argument(
        "--compare-buckets",
        action="store_true",
        help="instead: ours on images of mixed shapes (landscape, portrait, square) at their aspect-ratio buckets "
        "against the same images centre-cropped square, both with cached latents",
    )
    p.add_argument("--run-one", choices=["prepare", "ours", "tutorial", "unet", "square"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "doctor", help="versions, device and free memory; the settings DreamLoom would choose and the predicted peak"
    )
    p.add_argument(
        "--base-model",
        default="sd15",
        help="sd15 or sdxl (the architecture, no file), tiny-fabric, or a checkpoint or diffusers folder path",
    )
    p.add_argument("--resolution", type=int, default=0, help="default: the model's native size (SD1.5 512, SDXL 1024)")
    p.add_argument("--method", default="lora", choices=["lora", "ti", "full"])
    p.add_argument("--train-batch-size", type=int, default=1)
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--use-8bit-adam", action="store_true", help="full: 8-bit AdamW (bitsandbytes, CUDA)")
    p.add_argument("--use-ema", action="store_true", help="full: an EMA of the weights on the GPU")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument(
        "--gradient-checkpointing",
        default="auto",
        choices=["auto", "true", "false"],
        help="auto: decided by free memory",
    )
    p.set_defaults(func=cmd_doctor)

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
        prog="python -m trainer",
        description="DreamLoom: DreamBooth LoRA, textual inversion and full DreamBooth fine-tunes for SD1.5 and SDXL.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_class_images(sub)
    _add_generate(sub)
    _add_morph(sub)
    _add_lora_tools(sub)
    _add_lab_commands(sub)
    p = sub.add_parser("worker")  # the pack's training job (jobs/worker.py); no help, so --help leaves it out
    p.add_argument("job")
    p.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..base_models.offline import hide_known_noise, set_offline
    from ..stop_signals import Terminated, terminate_as_interrupt

    set_offline()
    hide_known_noise()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with terminate_as_interrupt():  # SIGTERM stops as Ctrl-C does: clean-up runs; `train` checkpoints first
            return args.func(args)
    except DreamLoomError as err:
        print(f"error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"fix: {err.hint}", file=sys.stderr)
        return 2
    except Terminated:
        print("stopped by SIGTERM", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a shell reports a process it ended
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
