"""Build the shipped workflows (workflows/*.json, UI format) and their API twins (tests/workflows/*.api.json): the
fabric ones on SD1.5 (tiny-fabric by default) and the SDXL ones (tiny-sdxl by default).

python tools/build_workflows.py          # write both
python tools/build_workflows.py --check  # fail if the committed files differ from what this builds
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workflow_format import ROOT, Workflow, object_info, ui_to_api  # noqa: E402

sys.path.insert(0, str(ROOT))
from trainer.inference.prompts import GRID_CONTEXTS  # noqa: E402

SUBJECT = "sks african fabric pattern"
CONTEXTS = GRID_CONTEXTS
STYLES = [
    ("Photorealistic", "professional photograph of {s}, studio lighting, high detail"),
    ("Oil Painting", "oil painting of {s}, impressionist style, brush strokes visible"),
    ("Watercolor", "watercolor painting of {s}, soft edges, paper texture"),
    ("Anime", "{s} in anime style, cel shading, vibrant"),
    ("Cyberpunk", "{s}, cyberpunk style, neon colors, futuristic"),
    ("Vintage", "vintage photograph of {s}, 1970s aesthetic, faded colors"),
    ("Minimalist", "minimalist design inspired by {s}, simple shapes, clean"),
    ("Psychedelic", "psychedelic art featuring {s}, trippy colors, swirling"),
    ("Line Art", "detailed line drawing of {s}, black and white, intricate"),
]
SEEDS = [1, 42, 100, 256, 512, 777, 999, 1234, 2048]
GUIDANCE = [1.5, 3.0, 7.5, 12.0, 20.0]
NEGATIVE = "blurry, low quality, distorted"

# Layout. Nodes are 320 px wide, in columns COLUMN px apart; the editor draws a 30 px title bar above `pos`.
# Training and class-image nodes draw their sample previews inside themselves (up to ~512 px tall) and grow:
# nothing goes below them in their column. Image outputs get a fixed size the preview is fitted into.
COLUMN = 380
CHAIN_Y = 400  # the top of the training chain, below the first note
PREVIEW = (360, 360)  # PreviewImage / SaveImage nodes
SAVE_GRID = (420, 460)

ONE_WIDGET = (
    "ONE WIDGET CHOOSES THE MODEL: 'Load Checkpoint (DreamLoom)' loads it for the whole workflow - its base_model "
    "output drives the training and class-image nodes (their own ckpt_name widget is then ignored) and its model, "
    "clip and vae drive the rendering. The built-in tiny-fabric (the default) runs on any CPU in minutes; for real "
    "results pick your SD1.5 checkpoint there. Sizes of 0 (resolution, width, height) mean the model's native size: "
    "128 px for tiny-fabric, 512 px for SD1.5."
)


SDXL_ONE_WIDGET = (
    "ONE WIDGET CHOOSES THE MODEL: 'Load Checkpoint (DreamLoom)' loads it for the whole workflow - its base_model "
    "output drives the training and class-image nodes (their own ckpt_name widget is then ignored) and its model, "
    "clip and vae drive the rendering. The default, the built-in tiny-sdxl, is SDXL's architecture (two text "
    "encoders, size conditioning) at toy size with random weights: the whole graph runs on any CPU in minutes, but "
    "what it draws is noise. For real results pick your SDXL checkpoint there (e.g. sd_xl_base_1.0.safetensors); "
    "training SDXL at 1024 px wants a GPU (Training Settings: gradient checkpointing, 8-bit Adam). Sizes of 0 "
    "(resolution, width, height) mean the model's native size: 64 px for tiny-sdxl, 1024 px for SDXL."
)
# What the SDXL workflows train and render: settings for SDXL itself (shorter runs than SD1.5's tutorial, as SDXL
# LoRAs are usually trained), small enough that the graph runs unchanged on tiny-sdxl on a CPU.
SDXL_LORA = dict(class_images=50, steps=500, sample_every=250, output_name="sks_fabric_sdxl", cfg=7.0)
SDXL_TI = dict(learning_rate=1e-3, steps=500, sample_every=250, output_name="sks_fabric_sdxl_ti")
FABRIC_LORA = dict(class_images=100, steps=800, sample_every=400, output_name="sks_fabric", cfg=7.5)
# TI at the quality benchmark's setting (README, "The quality benchmark": fidelity +0.186 over the base, far above
# seed noise) and A1111's default rate: 5e-3 for 800 one-image steps. The tutorial's 5e-4 takes 4 images a step for
# 750 steps (3,000 image passes); this learns the style in 800, under 3 minutes on 2 cores.
FABRIC_TI = dict(learning_rate=5e-3, steps=800, sample_every=400, output_name="sks_fabric_ti")
# Explore trains its own LoRA at the tutorial's rank, rate and steps without class images: nothing it renders uses the
# class prompt that prior preservation protects, and the batch of one halves the step (under 3 minutes on 2 cores).
FABRIC_EXPLORE = dict(class_images=0, steps=800, sample_every=400, output_name="sks_fabric_explore")
# The full fine-tune: the DreamBooth paper's learning rate and prior weight; the same class images as the LoRA
# workflow (same prompt, count and settings: one cache serves both)
FULL = dict(class_images=100, steps=800, sample_every=200, output_name="sks_fabric_full", learning_rate=5e-6)


def builtin_model(info) -> str:
    """The loader's default choice: the built-in tiny-fabric, present on every machine."""
    return info["DreamLoomLoadCheckpoint"]["input"]["required"]["ckpt_name"][1]["default"]


def sdxl_model(info) -> str:
    """The built-in tiny-sdxl, as the loader lists it (present on every machine)."""
    return next(c for c in info["DreamLoomLoadCheckpoint"]["input"]["required"]["ckpt_name"][0] if "tiny-sdxl" in c)


def first_note(wf: Workflow, title: str, text: str, height: int = 360, one_widget: str = ONE_WIDGET) -> int:
    return wf.note(f"{title}\n\n{one_widget}\n\n{text}", (0, -40), (740, height))


def load_checkpoint(wf: Workflow, x: int, y: int, model: str | None = None) -> int:
    return wf.add("DreamLoomLoadCheckpoint", (x, y), {"ckpt_name": model or builtin_model(wf.info)})


def training_images(wf: Workflow, x: int, y: int) -> int:
    images = wf.add("DreamLoomLoadTrainingImages", (x, y), {"folder": "dreamloom_fabric", "resolution": 0})
    preview = wf.add("PreviewImage", (x, y + 400), title="Training images", size=PREVIEW)
    wf.link(images, "preview", preview, "images")
    return images


def class_images(wf: Workflow, ckpt: int, x: int, y: int, model: str, count: int, cfg: float) -> int:
    """Generate Class Images of 'a fabric pattern' fed by the loader's base_model: the same settings in every
    workflow, so one cached set serves them all."""
    classes = wf.add(
        "DreamLoomGenerateClassImages",
        (x, y),
        {
            "ckpt_name": model,
            "class_prompt": "a fabric pattern",
            "negative_prompt": "",
            "count": count,
            "resolution": 0,
            "steps": 20,
            "cfg": cfg,
            "sampler": "dpmpp_2m",
            "seed": 42,
            "batch_size": 4,
        },
    )
    wf.link(ckpt, "base_model", classes, "base_model")
    return classes


def training_chain(
    wf: Workflow, x: int = 0, y: int = CHAIN_Y, model: str | None = None, run: dict = FABRIC_LORA
) -> dict:
    """Load Checkpoint, the training images, class images (none when run["class_images"] is 0: no prior
    preservation), Train DreamBooth LoRA and Load DreamLoom LoRA. "next_x" in the result: where the graph goes on."""
    tiny = model or builtin_model(wf.info)
    ckpt = load_checkpoint(wf, x, y, tiny)
    images = training_images(wf, x, y + 220)
    prior = run["class_images"] > 0
    train_x = x + (2 if prior else 1) * COLUMN
    classes = class_images(wf, ckpt, x + COLUMN, y, tiny, run["class_images"], run["cfg"]) if prior else None
    train = wf.add(
        "DreamLoomTrainLoRA",
        (train_x, y),
        {
            "ckpt_name": tiny,
            "instance_prompt": "a sks african fabric pattern",
            "token": "sks",
            "class_prompt": "a fabric pattern",
            "prior_preservation": prior,
            "prior_loss_weight": 1.0,
            "num_class_images": run["class_images"] or 100,  # the widget's default; unused without prior
            "rank": 4,
            "alpha": 4.0,
            "learning_rate": 1e-4,
            "max_train_steps": run["steps"],
            "seed": 42,
            "sample_every": run["sample_every"],
            "output_name": run["output_name"],
        },
    )
    wf.link(ckpt, "base_model", train, "base_model")
    wf.link(images, "dataset", train, "instance_images")
    if prior:
        wf.link(classes, "class_images", train, "class_images")
    loss = wf.add("PreviewImage", (train_x + COLUMN, y), title="Loss", size=PREVIEW)
    wf.link(train, "loss_plot", loss, "images")
    lora = wf.add(
        "DreamLoomLoadLoRA", (train_x + COLUMN, y + PREVIEW[1] + 60), {"strength_model": 1.0, "strength_clip": 1.0}
    )
    wf.link(ckpt, "model", lora, "model")
    wf.link(ckpt, "clip", lora, "clip")
    wf.link(train, "lora_name", lora, "lora_path")
    return {"ckpt": ckpt, "lora": lora, "train": train, "images": images, "next_x": train_x + 2 * COLUMN + 40}


def encode_pair(wf: Workflow, clip_src, x: int, y: int, text: str) -> tuple[int, int]:
    """A positive CLIPTextEncode and the shared negative prompt, both fed by `clip_src`."""
    pos = wf.add("CLIPTextEncode", (x, y), {"text": text})
    neg = wf.add("CLIPTextEncode", (x, y + 220), {"text": NEGATIVE}, title="Negative prompt")
    for node in (pos, neg):
        wf.link(*clip_src, node, "clip")
    return pos, neg


def empty_latent(wf: Workflow, vae_src, x: int, y: int) -> int:
    """Empty Latent (DreamLoom) at the model's native size, shaped by the VAE (tiny-fabric's scales by 4)."""
    latent = wf.add("DreamLoomEmptyLatent", (x, y), {"width": 0, "height": 0, "batch_size": 1})
    wf.link(*vae_src, latent, "vae")
    return latent


def decode_grid_save(
    wf: Workflow, latent_src, vae_src, x: int, y: int, grid_widgets: dict, prefix: str, labels_link=None
) -> int:
    """VAE Decode -> Image Grid -> Save Image: the tail of every comparison grid."""
    decode = wf.add("VAEDecode", (x, y))
    wf.link(*latent_src, decode, "samples")
    wf.link(*vae_src, decode, "vae")
    grid = wf.add("DreamLoomImageGrid", (x, y + 120), grid_widgets)
    wf.link(decode, "IMAGE", grid, "images")
    if labels_link:
        wf.link(*labels_link, grid, "labels")
    save = wf.add("SaveImage", (x + 360, y), {"filename_prefix": prefix}, size=SAVE_GRID)
    wf.link(grid, "grid", save, "images")
    return save


def prompt_grid(
    wf, clip_src, model_src, vae_src, x, y, prompts, subject, title, prefix, seed=42, cfg=7.5, subject_link=None
):
    batch = wf.add(
        "DreamLoomPromptBatch",
        (x, y),
        {"prompts": "\n".join(f"{label}: {text}" for label, text in prompts), "subject": subject},
    )
    wf.link(*clip_src, batch, "clip")
    if subject_link:
        wf.link(*subject_link, batch, "subject")
    negative = wf.add("CLIPTextEncode", (x, y + 260), {"text": NEGATIVE}, title="Negative prompt")
    wf.link(*clip_src, negative, "clip")
    latent = empty_latent(wf, vae_src, x, y + 440)
    wf.link(batch, "count", latent, "batch_size")
    sampler = wf.add(
        "KSampler",
        (x + 360, y),
        {"seed": seed, "steps": 30, "cfg": cfg, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0},
    )
    wf.link(*model_src, sampler, "model")
    wf.link(batch, "conditioning", sampler, "positive")
    wf.link(negative, "CONDITIONING", sampler, "negative")
    wf.link(latent, "latent", sampler, "latent_image")
    return decode_grid_save(
        wf,
        (sampler, "LATENT"),
        vae_src,
        x + 720,
        y,
        {"columns": 3, "title": title},
        prefix,
        labels_link=(batch, "labels"),
    )


def fabric_dreambooth_lora(info) -> dict:
    wf = Workflow(info)
    first_note(
        wf,
        "DreamLoom - DreamBooth LoRA on the fabric sample set",
        "1. Load Training Images: 'dreamloom_fabric' is the bundled sample set (10 woven-strip fabrics), created in "
        "ComfyUI's input folder on first run. Point it at your own folder of 5-20 images to train on them.\n"
        "2. Generate Class Images: 100 images of 'a fabric pattern' from the base model, for prior preservation. "
        "They are cached; a cancelled run resumes.\n"
        "3. Train DreamBooth LoRA: the tutorial's settings - rank 4, learning rate 1e-4, 800 steps, prior weight 1.0. "
        "Training runs in a separate process; the node shows the newest sample grid. Cancel keeps a checkpoint, "
        "and queueing again resumes. The same inputs reuse the finished LoRA instead of training again.",
    )
    t = training_chain(wf)
    x = t["next_x"]
    wf.note(
        "4. Generation with the trained LoRA (tutorial exercise 1): Load DreamLoom LoRA takes the LoRA name from the "
        "training node, so one queue trains and then uses it. Prompt Batch encodes the nine contexts; one KSampler "
        "renders all nine; Image Grid labels them.",
        (x, CHAIN_Y - 240),
        (700, 180),
    )
    prompt_grid(
        wf,
        (t["lora"], "clip"),
        (t["lora"], "model"),
        (t["ckpt"], "vae"),
        x,
        CHAIN_Y,
        CONTEXTS,
        SUBJECT,
        "sks african fabric pattern in nine contexts (LoRA)",
        "dreamloom/fabric_contexts",
    )
    return wf.to_ui()


def fabric_textual_inversion(info) -> dict:
    wf = Workflow(info)
    run = FABRIC_TI
    first_note(
        wf,
        "DreamLoom - Textual Inversion on the fabric sample set",
        "Train Textual Inversion learns one new token's embedding (a file of a few KB) into ComfyUI's embeddings "
        "folder. Its prompt_token output is 'embedding:<name>', which Prompt Batch puts where each prompt says {s}. "
        f"Learning rate {run['learning_rate']:g}, {run['steps']} steps, one image a step (the tutorial's 5e-4 with "
        "four images a step needs 3,000 image passes); style templates suit a pattern. Cancel keeps a checkpoint; "
        "queueing again resumes.",
    )
    ckpt = load_checkpoint(wf, 0, CHAIN_Y)
    images = training_images(wf, 0, CHAIN_Y + 220)
    train = wf.add(
        "DreamLoomTrainTextualInversion",
        (COLUMN, CHAIN_Y),
        {
            "ckpt_name": builtin_model(info),
            "placeholder_token": "<sks-fabric>",
            "initializer_token": "pattern",
            "learning_rate": run["learning_rate"],
            "max_train_steps": run["steps"],
            "seed": 42,
            "sample_every": run["sample_every"],
            "output_name": run["output_name"],
        },
    )
    wf.link(ckpt, "base_model", train, "base_model")
    wf.link(images, "dataset", train, "instance_images")
    loss = wf.add("PreviewImage", (2 * COLUMN, CHAIN_Y), title="Loss", size=PREVIEW)
    wf.link(train, "loss_plot", loss, "images")
    prompts = [(label, text.replace("{s}", "{s} fabric")) for label, text in CONTEXTS]
    prompt_grid(
        wf,
        (ckpt, "clip"),
        (ckpt, "model"),
        (ckpt, "vae"),
        3 * COLUMN + 40,
        CHAIN_Y,
        prompts,
        "embedding:sks_fabric_ti",
        "the learned embedding in nine contexts (TI)",
        "dreamloom/fabric_ti_contexts",
        subject_link=(train, "prompt_token"),
    )
    return wf.to_ui()


def fabric_explore(info) -> dict:
    wf = Workflow(info)
    first_note(
        wf,
        "DreamLoom - exploring a trained LoRA (tutorial exercise 2)",
        "Train DreamBooth LoRA trains a style LoRA to explore: the tutorial's rank 4, learning rate 1e-4 and 800 "
        "steps, without class images. Prior preservation keeps the class prompt ('a fabric pattern') from "
        "drifting, and nothing here renders it; without it each step is half the work and no class images are "
        "made, so the whole workflow takes about 2-3 minutes on a 2-core CPU. To explore the LoRA "
        "fabric_dreambooth_lora trained instead, delete the link into Load DreamLoom LoRA's lora_path and pick "
        "sks_fabric there.\n"
        "A: guidance sweep 1.5 / 3 / 7.5 / 12 / 20 at seed 42. B: nine artistic styles at seed 123. C: nine seeds "
        "(1, 42, 100, 256, 512, 777, 999, 1234, 2048); SLERP Noise with one frame per keyframe gives exactly each "
        "seed's own noise.",
        height=380,
    )
    t = training_chain(wf, run=FABRIC_EXPLORE)
    model, clip, vae = (t["lora"], "model"), (t["lora"], "clip"), (t["ckpt"], "vae")
    # A: guidance sweep
    x, y, step = t["next_x"], 0, 360
    pos, neg = encode_pair(
        wf, clip, x, y, "a sks african fabric pattern, beautiful textile design, intricate details, vibrant colors"
    )
    empty = empty_latent(wf, vae, x, y + 440)
    batch = None
    for i, cfg in enumerate(GUIDANCE):
        ks = wf.add(
            "KSampler",
            (x + 360, y + step * i),
            {"seed": 42, "steps": 30, "cfg": cfg, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0},
            title=f"KSampler cfg {cfg:g}",
        )
        wf.link(*model, ks, "model")
        wf.link(pos, "CONDITIONING", ks, "positive")
        wf.link(neg, "CONDITIONING", ks, "negative")
        wf.link(empty, "latent", ks, "latent_image")
        if batch is None:
            batch = ks
        else:
            joined = wf.add("LatentBatch", (x + 720, y + step * i))
            wf.link(batch, "LATENT", joined, "samples1")
            wf.link(ks, "LATENT", joined, "samples2")
            batch = joined
    decode_grid_save(
        wf,
        (batch, "LATENT"),
        vae,
        x + 1080,
        y,
        {"columns": 5, "labels": "\n".join(f"guidance {g:g}" for g in GUIDANCE), "title": "guidance sweep, seed 42"},
        "dreamloom/fabric_guidance",
    )
    # B: styles
    y = 5 * step + 80
    prompt_grid(
        wf, clip, model, vae, x, y, STYLES, SUBJECT, "nine styles, seed 123", "dreamloom/fabric_styles", seed=123
    )
    # C: seeds
    y += 800
    posc, negc = encode_pair(wf, clip, x, y, "a sks african fabric pattern, beautiful colors, detailed")
    noise = wf.add(
        "DreamLoomSlerpNoise",
        (x, y + 440),
        {
            "seeds": ", ".join(map(str, SEEDS)),
            "frames_per_transition": 1,
            "easing": "linear",
            "hold_frames": 0,
            "loop": True,
            "width": 0,
            "height": 0,
        },
    )
    wf.link(*vae, noise, "vae")
    guider = wf.add("CFGGuider", (x + 360, y), {"cfg": 7.5})
    wf.link(*model, guider, "model")
    wf.link(posc, "CONDITIONING", guider, "positive")
    wf.link(negc, "CONDITIONING", guider, "negative")
    select = wf.add("KSamplerSelect", (x + 360, y + 180), {"sampler_name": "dpmpp_2m"})
    sched = wf.add("BasicScheduler", (x + 360, y + 300), {"scheduler": "karras", "steps": 30, "denoise": 1.0})
    wf.link(*model, sched, "model")
    adv = wf.add("SamplerCustomAdvanced", (x + 720, y))
    wf.link(noise, "noise", adv, "noise")
    wf.link(guider, "GUIDER", adv, "guider")
    wf.link(select, "SAMPLER", adv, "sampler")
    wf.link(sched, "SIGMAS", adv, "sigmas")
    wf.link(noise, "latent", adv, "latent_image")
    decode_grid_save(
        wf,
        (adv, "output"),
        vae,
        x + 1080,
        y,
        {"columns": 3, "labels": "\n".join(f"seed {s}" for s in SEEDS), "title": "nine seeds"},
        "dreamloom/fabric_seeds",
    )
    return wf.to_ui()


def fabric_morph(info) -> dict:
    wf = Workflow(info)
    first_note(
        wf,
        "DreamLoom - seamless SLERP morph through the learned style (tutorial step 5)",
        "SLERP Noise makes the initial noise of all 450 frames: 5 keyframe seeds x 90 frames, a closed loop with no "
        "duplicated frame at the seam. At each keyframe it equals ComfyUI's own noise for that seed. Render Morph "
        "samples 8 frames at a time (lower chunk_size if memory is short) with 15 steps of the deterministic "
        "DPM-Solver++ 2M (the tutorial's sampler), and "
        "Save Animation writes a looping GIF at 30 fps that lasts exactly 15 s.",
        height=380,
    )
    t = training_chain(wf)
    model, clip, vae = (t["lora"], "model"), (t["lora"], "clip"), (t["ckpt"], "vae")
    x, y = t["next_x"], CHAIN_Y
    pos, neg = encode_pair(wf, clip, x, y, "a sks african fabric pattern")
    noise = wf.add(
        "DreamLoomSlerpNoise",
        (x, y + 440),
        {
            "seeds": "1, 42, 100, 256, 512",
            "frames_per_transition": 90,
            "easing": "linear",
            "hold_frames": 0,
            "loop": True,
            "width": 0,
            "height": 0,
        },
    )
    wf.link(*vae, noise, "vae")
    # 15 DPM-Solver++ 2M steps end as close to a 50-step render as 20 Euler steps (mean pixel difference on
    # tiny-fabric 7.3 vs 7.8 of 255) for 3/4 of the UNet passes: 450 frames are 13,500 batched passes with guidance
    select = wf.add("KSamplerSelect", (x + 360, y), {"sampler_name": "dpmpp_2m"})
    sched = wf.add("BasicScheduler", (x + 360, y + 120), {"scheduler": "normal", "steps": 15, "denoise": 1.0})
    wf.link(*model, sched, "model")
    render = wf.add("DreamLoomRenderMorph", (x + 720, y), {"cfg": 7.5, "chunk_size": 8})
    wf.link(*model, render, "model")
    wf.link(pos, "CONDITIONING", render, "positive")
    wf.link(neg, "CONDITIONING", render, "negative")
    wf.link(select, "SAMPLER", render, "sampler")
    wf.link(sched, "SIGMAS", render, "sigmas")
    wf.link(*vae, render, "vae")
    wf.link(noise, "noise", render, "noise")
    wf.link(noise, "latent", render, "latent")
    save = wf.add(
        "DreamLoomSaveAnimation",
        (x + 1080, y),
        {"fps": 30.0, "format": "gif", "loop": True, "filename_prefix": "dreamloom/fabric_morph"},
        size=SAVE_GRID,
    )
    wf.link(render, "frames", save, "images")
    return wf.to_ui()


def sdxl_dreambooth_lora(info) -> dict:
    wf = Workflow(info)
    tiny = sdxl_model(info)
    run = SDXL_LORA
    first_note(
        wf,
        "DreamLoom - SDXL DreamBooth LoRA on the fabric sample set",
        "1. Load Training Images: 'dreamloom_fabric' is the bundled sample set (10 woven-strip fabrics). Point it at "
        "your own folder of 5-20 images to train on them.\n"
        f"2. Generate Class Images: {run['class_images']} images of 'a fabric pattern' from the base model, for "
        "prior preservation; cached, and a cancelled run resumes.\n"
        f"3. Train DreamBooth LoRA: rank 4, learning rate 1e-4, {run['steps']} steps, prior weight 1.0, on the UNet "
        "(Training Settings can add both text encoders). The LoRA is written in kohya's SDXL format, which ComfyUI, "
        "A1111 and kohya read. Cancel keeps a checkpoint; queueing again resumes.",
        one_widget=SDXL_ONE_WIDGET,
    )
    t = training_chain(wf, model=tiny, run=run)
    x = t["next_x"]
    wf.note(
        "4. Generation with the trained LoRA: Load DreamLoom LoRA takes the LoRA from the training node and refuses "
        "one of another model family (an SD1.5 LoRA on SDXL) before anything is rendered. Prompt Batch encodes the "
        "nine contexts with both of SDXL's text encoders; one KSampler renders all nine; Image Grid labels them.",
        (x, CHAIN_Y - 240),
        (700, 180),
    )
    prompt_grid(
        wf,
        (t["lora"], "clip"),
        (t["lora"], "model"),
        (t["ckpt"], "vae"),
        x,
        CHAIN_Y,
        CONTEXTS,
        SUBJECT,
        "sks african fabric pattern in nine contexts (SDXL LoRA)",
        "dreamloom/sdxl_contexts",
        cfg=run["cfg"],
    )
    return wf.to_ui()


def sdxl_textual_inversion(info) -> dict:
    wf = Workflow(info)
    tiny = sdxl_model(info)
    run = SDXL_TI
    first_note(
        wf,
        "DreamLoom - SDXL Textual Inversion on the fabric sample set",
        "Train Textual Inversion learns one new token in both of SDXL's text encoders at once: the file holds its "
        "clip_l and clip_g vectors, as ComfyUI and A1111 read SDXL embeddings. Its prompt_token output is "
        "'embedding:<name>', which Prompt Batch puts where each prompt says {s}; an embedding of another model family "
        f"is refused there. Learning rate {run['learning_rate']:g}, {run['steps']} steps. Cancel keeps a checkpoint; "
        "queueing again resumes.",
        one_widget=SDXL_ONE_WIDGET,
    )
    ckpt = load_checkpoint(wf, 0, CHAIN_Y, tiny)
    images = training_images(wf, 0, CHAIN_Y + 220)
    train = wf.add(
        "DreamLoomTrainTextualInversion",
        (COLUMN, CHAIN_Y),
        {
            "ckpt_name": tiny,
            "placeholder_token": "<sks-fabric>",
            "initializer_token": "pattern",
            "learning_rate": run["learning_rate"],
            "max_train_steps": run["steps"],
            "seed": 42,
            "sample_every": run["sample_every"],
            "output_name": run["output_name"],
        },
    )
    wf.link(ckpt, "base_model", train, "base_model")
    wf.link(images, "dataset", train, "instance_images")
    loss = wf.add("PreviewImage", (2 * COLUMN, CHAIN_Y), title="Loss", size=PREVIEW)
    wf.link(train, "loss_plot", loss, "images")
    prompts = [(label, text.replace("{s}", "{s} fabric")) for label, text in CONTEXTS]
    prompt_grid(
        wf,
        (ckpt, "clip"),
        (ckpt, "model"),
        (ckpt, "vae"),
        3 * COLUMN + 40,
        CHAIN_Y,
        prompts,
        f"embedding:{run['output_name']}",
        "the learned SDXL embedding in nine contexts (TI)",
        "dreamloom/sdxl_ti_contexts",
        cfg=SDXL_LORA["cfg"],
        subject_link=(train, "prompt_token"),
    )
    return wf.to_ui()


def dreambooth_full_finetune(info) -> dict:
    wf = Workflow(info)
    run, tiny = FULL, builtin_model(info)
    first_note(
        wf,
        "DreamLoom - DreamBooth full fine-tune on the fabric sample set",
        "1. Load Training Images: 'dreamloom_fabric' is the bundled sample set (10 woven-strip fabrics).\n"
        f"2. Generate Class Images: {run['class_images']} images of 'a fabric pattern' for prior preservation (the "
        "same cached set the LoRA workflow uses).\n"
        f"3. Train DreamBooth (full fine-tune): the whole UNet, as the DreamBooth paper does - learning rate "
        f"{run['learning_rate']:g}, prior weight 1.0, {run['steps']} steps. The result is one checkpoint file "
        "published into ComfyUI's checkpoints folder (fp16, never over another file), so core Load Checkpoint lists "
        "it too. SD1.5 wants a GPU with about 10 GB (Training Settings: mixed precision fp16, gradient "
        "checkpointing, 8-bit Adam) and about 10 GB of disk for the run's checkpoint; the run says what it needs.",
        height=400,
    )
    base = load_checkpoint(wf, 0, CHAIN_Y, tiny)
    images = training_images(wf, 0, CHAIN_Y + 220)
    classes = class_images(wf, base, COLUMN, CHAIN_Y, tiny, run["class_images"], 7.5)
    train = wf.add(
        "DreamLoomTrainFull",
        (2 * COLUMN, CHAIN_Y),
        {
            "ckpt_name": tiny,
            "instance_prompt": "a sks african fabric pattern",
            "token": "sks",
            "class_prompt": "a fabric pattern",
            "prior_preservation": True,
            "prior_loss_weight": 1.0,
            "num_class_images": run["class_images"],
            "train_text_encoder": False,
            "text_encoder_lr": 1e-6,
            "use_ema": False,
            "learning_rate": run["learning_rate"],
            "max_train_steps": run["steps"],
            "seed": 42,
            "sample_every": run["sample_every"],
            "output_name": run["output_name"],
        },
    )
    wf.link(base, "base_model", train, "base_model")
    wf.link(images, "dataset", train, "instance_images")
    wf.link(classes, "class_images", train, "class_images")
    loss = wf.add("PreviewImage", (3 * COLUMN, CHAIN_Y), title="Loss", size=PREVIEW)
    wf.link(train, "loss_plot", loss, "images")
    x = 4 * COLUMN + 40
    wf.note(
        "4. The fine-tuned checkpoint, sampled with core nodes: Load Checkpoint (DreamLoom) takes its name from the "
        "training node (ckpt_path), so one queue trains and then renders. For an SD1.5 or SDXL base, core Load "
        "Checkpoint loads the same file; a fine-tune of a built-in model needs DreamLoom's loader.",
        (x, CHAIN_Y - 240),
        (700, 180),
    )
    tuned = wf.add("DreamLoomLoadCheckpoint", (x, CHAIN_Y), {"ckpt_name": tiny}, title="Load the fine-tuned checkpoint")
    wf.link(train, "ckpt_name", tuned, "ckpt_path")
    pos, neg = encode_pair(wf, (tuned, "clip"), x, CHAIN_Y + 200, "a dress made of sks african fabric pattern")
    latent = empty_latent(wf, (tuned, "vae"), x, CHAIN_Y + 660)
    sampler = wf.add(
        "KSampler",
        (x + 360, CHAIN_Y),
        {"seed": 42, "steps": 30, "cfg": 7.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0},
    )
    wf.link(tuned, "model", sampler, "model")
    wf.link(pos, "CONDITIONING", sampler, "positive")
    wf.link(neg, "CONDITIONING", sampler, "negative")
    wf.link(latent, "latent", sampler, "latent_image")
    decode = wf.add("VAEDecode", (x + 720, CHAIN_Y))
    wf.link(sampler, "LATENT", decode, "samples")
    wf.link(tuned, "vae", decode, "vae")
    save = wf.add("SaveImage", (x + 720, CHAIN_Y + 120), {"filename_prefix": "dreamloom/full_finetune"}, size=PREVIEW)
    wf.link(decode, "IMAGE", save, "images")
    return wf.to_ui()


WORKFLOWS = {
    "fabric_dreambooth_lora": fabric_dreambooth_lora,
    "fabric_textual_inversion": fabric_textual_inversion,
    "fabric_explore": fabric_explore,
    "fabric_morph": fabric_morph,
    "sdxl_dreambooth_lora": sdxl_dreambooth_lora,
    "sdxl_textual_inversion": sdxl_textual_inversion,
    "dreambooth_full_finetune": dreambooth_full_finetune,
}


def build() -> dict[str, tuple[dict, dict]]:
    info = object_info()
    out = {}
    for name, fn in WORKFLOWS.items():
        ui = fn(info)
        out[name] = (ui, ui_to_api(ui, info))
    return out


def dump(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, (ui, api) in build().items():
        for path, obj in (
            (ROOT / "workflows" / f"{name}.json", ui),
            (ROOT / "tests" / "workflows" / f"{name}.api.json", api),
        ):
            text = dump(obj)
            if check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path.relative_to(ROOT)))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("out of date (run python tools/build_workflows.py):\n  " + "\n  ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
