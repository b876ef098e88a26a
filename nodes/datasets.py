"""Load Training Images and Generate Class Images."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..trainer.errors import DreamLoomError
from . import comfy, runner
from .images import batch_to_uint8, files_to_batch
from .widgets import bool_widget, choice_widget, float_widget, int_widget, string_widget

SAMPLE_SET = "dreamloom_fabric"  # generated into ComfyUI's input folder on first use
CATEGORY = "DreamLoom/data"


@dataclass(frozen=True)
class TrainingImages:
    """What flows along a DL_DATASET link: a folder plus how to read it."""

    folder: str
    use_captions: bool
    resolution: int
    center_crop: bool
    random_flip: bool
    count: int
    fingerprint: str
    aspect_buckets: bool = True
    masked_loss: bool = False
    mask_from_alpha: bool = False


MASK_CHOICES = ["off", "mask files", "mask files or alpha"]


def resolve_folder(folder: str) -> Path:
    folder = folder.strip()
    if not folder:
        raise DreamLoomError(
            "No folder given.", f"Type a folder inside ComfyUI's input folder (e.g. {SAMPLE_SET}) or an absolute path."
        )
    path = Path(folder).expanduser()
    if not path.is_absolute():
        path = Path(comfy.input_directory()) / folder
    if folder == SAMPLE_SET and not path.exists():
        from ..trainer.data.sample_set import write_fabric_samples

        write_fabric_samples(path)
    return path


def _mask_arrays(mask, images):
    """ComfyUI MASK [B, H, W] (or [H, W]) floats, 1 = learn -> uint8 [N, H, W], one per image of the batch."""
    import numpy as np

    arr = mask.detach().cpu().float().clamp(0, 1).numpy()
    arr = arr[None] if arr.ndim == 2 else arr
    n, height, width = images.shape[0], images.shape[1], images.shape[2]
    if arr.ndim != 3 or arr.shape[1:] != (height, width):
        raise DreamLoomError(
            f"The mask is {'x'.join(map(str, arr.shape[::-1][:2]))} pixels (width x height) but the images are "
            f"{width}x{height}.",
            "Connect a MASK made from the same images (the same size), e.g. from Load Image or the mask editor.",
        )
    if arr.shape[0] not in (1, n):
        raise DreamLoomError(
            f"The MASK batch has {arr.shape[0]} masks for {n} images.", "Give one mask per image, or one for all."
        )
    arr = np.broadcast_to(arr, (n, height, width))
    return (arr * 255.0 + 0.5).astype(np.uint8)


def _save_batch(images, captions: str, mask=None) -> Path:
    """Save an IMAGE batch (one caption per line, and a MASK as <name>_mask.png) as PNGs in a content-addressed
    folder."""
    from PIL import Image

    from ..trainer.files.atomic import atomic_save

    arr = batch_to_uint8(images)
    masks = _mask_arrays(mask, images) if mask is not None else None
    lines = [ln.strip() for ln in captions.splitlines()] if captions else []
    blob = arr.tobytes() + "\n".join(lines).encode() + (b"mask" + masks.tobytes() if masks is not None else b"")
    digest = hashlib.sha256(blob).hexdigest()[:16]
    folder = Path(comfy.dreamloom_directory()) / "datasets" / digest
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arr):
        path = folder / f"image_{i:03d}.png"
        if not path.exists():
            atomic_save(
                path,
                lambda tmp, a=a: Image.fromarray(a[..., :3] if a.shape[-1] >= 3 else a[..., 0]).save(tmp, format="PNG"),
            )
        if i < len(lines) and lines[i]:
            (folder / f"image_{i:03d}.txt").write_text(lines[i], encoding="utf-8")
        mask_path = folder / f"image_{i:03d}_mask.png"
        if masks is not None and not mask_path.exists():
            atomic_save(mask_path, lambda tmp, m=masks[i]: Image.fromarray(m, "L").save(tmp, format="PNG"))
    return folder


class LoadTrainingImages:
    DESCRIPTION = (
        "Loads 5-20 training images from a folder (jpg/png/webp, with optional .txt captions) or from an IMAGE "
        "batch. The folder 'dreamloom_fabric' is the bundled fabric sample set, created on first use."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("DL_DATASET", "IMAGE")
    RETURN_NAMES = ("dataset", "preview")
    OUTPUT_TOOLTIPS = ("The training images, for a training node.", "The images as loaded, centre-cropped for preview.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": string_widget(
                    SAMPLE_SET,
                    "Folder inside ComfyUI's input folder, or an absolute path. 'dreamloom_fabric' "
                    "is the bundled sample set.",
                ),
                "resolution": int_widget(
                    0,
                    0,
                    2048,
                    "Training resolution in pixels (square); 0 = the base model's native size (512 for SD1.5, "
                    "1024 for SDXL, 128 for tiny-fabric, 64 for tiny and tiny-sdxl).",
                    step=8,
                ),
                "crop": choice_widget(
                    ["center", "random"],
                    "center",
                    "Where the crop sits: centred (latents are cached, faster) or random every step. With buckets "
                    "on it is only the few pixels that fit an image to its bucket; off, the square crop.",
                ),
                "flip": bool_widget(
                    False, "Randomly mirror images left-right (good for patterns, bad for text or logos)."
                ),
                "use_captions": bool_widget(
                    False,
                    "Use each image's .txt caption as its prompt instead of the instance prompt. '{token}' in a "
                    "caption becomes the token; a caption without the token gets it in front.",
                ),
                "aspect_buckets": bool_widget(
                    True,
                    "Keep each image's shape: portrait and landscape photos train uncropped at sizes of about "
                    "resolution x resolution pixels (aspect-ratio buckets, 64 px steps). Off: centre-cropped "
                    "squares.",
                ),
                "masked_loss": choice_widget(
                    MASK_CHOICES,
                    "off",
                    "Learn only where a mask is white: <name>_mask.png beside each image (white = learn, black = "
                    "ignore, grey = partly), or the image's transparency for cut-outs. A MASK input turns it on.",
                ),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "An IMAGE batch to train on instead of the folder."}),
                "captions": string_widget("", "One caption per line for the IMAGE batch (optional).", multiline=True),
                "mask": (
                    "MASK",
                    {
                        "tooltip": "Masks for the IMAGE batch (1 = learn, 0 = ignore; one per image or one for "
                        "all); turns masked loss on. Load Image's mask is 1 where a picture is transparent: for a "
                        "cut-out, put Invert Mask in between."
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, folder, **kwargs):
        # Edited, added or removed images change the hash, so downstream training re-runs.
        try:
            from ..trainer.jobs.parent import folder_fingerprint

            return folder_fingerprint(resolve_folder(folder))
        except Exception:  # noqa: BLE001 - let execution report the real error
            return float("nan")

    def load(
        self,
        folder,
        resolution,
        crop,
        flip,
        use_captions,
        aspect_buckets=True,
        masked_loss="off",
        images=None,
        captions="",
        mask=None,
    ):
        from ..trainer.data.images import list_image_files, load_image_folder
        from ..trainer.jobs.parent import folder_fingerprint

        if mask is not None and images is None:
            raise DreamLoomError(
                "A MASK is connected but no IMAGE batch: the mask belongs to the images input.",
                "Connect the images too; for a folder, put <name>_mask.png beside each image and pick masked_loss "
                "'mask files'.",
            )
        if masked_loss not in MASK_CHOICES:
            raise DreamLoomError(f"Unknown masked_loss {masked_loss!r}.", f"Use one of {', '.join(MASK_CHOICES)}.")
        masked = mask is not None or masked_loss != "off"
        from_alpha = masked_loss == "mask files or alpha"
        path = _save_batch(images, captions, mask) if images is not None else resolve_folder(folder)
        # with 0 the native size is the training node's to know (the model is connected there, not here); this node
        # only checks the files and previews them, at most 512 px
        check_size = int(resolution) or runner.SD15_RESOLUTION
        # every bad file (and mask) is reported here, early
        loaded = load_image_folder(path, check_size, use_captions, masks=masked, mask_from_alpha=from_alpha)
        dataset = TrainingImages(
            str(path),
            bool(use_captions or (images is not None and bool(captions.strip()))),
            int(resolution),
            crop == "center",
            bool(flip),
            len(loaded),
            folder_fingerprint(path),
            bool(aspect_buckets),
            masked,
            from_alpha,
        )
        preview = files_to_batch(list_image_files(path), square=min(check_size, runner.PREVIEW_MAX_PX))
        return (dataset, preview)


class GenerateClassImages:
    DESCRIPTION = (
        "Generates prior-preservation (class) images with the base model, in a worker process with progress and "
        "cancel. Images are cached by model, prompt and settings; an interrupted set resumes."
    )
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("DL_DATASET", "IMAGE")
    RETURN_NAMES = ("class_images", "preview")
    OUTPUT_TOOLTIPS = (
        "The class images, for the class_images input of Train DreamBooth LoRA.",
        "Up to 16 of the images.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        from ..trainer.inference.pipelines import SCHEDULERS

        return {
            "required": {
                "ckpt_name": (
                    runner.checkpoint_choices(),
                    {"tooltip": "The SD1.5 or SDXL checkpoint you will train on; base_model overrides it."},
                ),
                "class_prompt": string_widget(
                    "a fabric pattern", "The class your subject belongs to, without the token."
                ),
                "negative_prompt": string_widget("", "Negative prompt for the class images."),
                "count": int_widget(100, 1, 10000, "How many class images (the tutorial uses 100)."),
                "resolution": int_widget(
                    0,
                    0,
                    2048,
                    "Size in pixels; use the training resolution. 0 = the model's native size (512 for SD1.5, 1024 "
                    "for SDXL, 128 for tiny-fabric, 64 for tiny and tiny-sdxl).",
                    step=8,
                ),
                "steps": int_widget(20, 1, 200, "Sampling steps per image (20 suits dpmpp_2m)."),
                "cfg": float_widget(7.5, 0.0, 30.0, 0.1, "Classifier-free guidance scale."),
                "sampler": choice_widget(SCHEDULERS, "dpmpp_2m", "Sampler (diffusers scheduler) for the class images."),
                "seed": int_widget(
                    42,
                    0,
                    0xFFFFFFFFFFFFFFFF,
                    "Base seed; image i uses a seed derived from it and i.",
                    control_after_generate=True,
                ),
                "batch_size": int_widget(4, 1, 64, "Images generated at once (lower it if you run out of memory)."),
            },
            "optional": {"base_model": runner.BASE_MODEL_INPUT},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def generate(
        self,
        ckpt_name,
        class_prompt,
        negative_prompt,
        count,
        resolution,
        steps,
        cfg,
        sampler,
        seed,
        batch_size,
        base_model=None,
        unique_id=None,
    ):
        from ..trainer.data.class_images import ClassImageSpec, class_dir_for
        from ..trainer.jobs.parent import prepare_run_dir

        if not class_prompt.strip():
            raise DreamLoomError("The class prompt is empty.", "Describe the class, e.g. 'a fabric pattern'.")
        base = runner.resolve_checkpoint(base_model or ckpt_name)
        resolution = int(resolution) or runner.native_resolution(base)
        model_fp = runner.model_fingerprint(base)
        spec_fields = dict(
            prompt=class_prompt,
            negative_prompt=negative_prompt,
            sampler=sampler,
            steps=int(steps),
            guidance=float(cfg),
            resolution=int(resolution),
            seed=int(seed) % (2**63),
        )
        folder = class_dir_for(comfy.dreamloom_directory(), ClassImageSpec(model_fingerprint=model_fp, **spec_fields))
        request = {
            "kind": "class_images",
            "base_model": base,
            "spec": spec_fields,
            "count": int(count),
            "folder": str(folder),
            "batch_size": int(batch_size),
        }
        run_dir = prepare_run_dir(
            Path(comfy.dreamloom_directory()) / "runs", request, {"model": model_fp}, name_hint="class"
        )
        outputs = runner.run_with_progress(run_dir, int(count), unique_id)
        images = outputs["images"]
        missing = [p for p in images if not os.path.exists(p)]
        if missing:
            raise DreamLoomError(
                f"{len(missing)} class images are missing after generation.", f"Run again; see {run_dir / 'log.txt'}."
            )
        from ..trainer.jobs.parent import folder_fingerprint

        dataset = TrainingImages(
            str(folder), False, int(resolution), True, False, len(images), folder_fingerprint(folder)
        )
        return (dataset, files_to_batch(images[:16], square=min(int(resolution), 256)))
