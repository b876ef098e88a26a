"""Train DreamBooth LoRA, Train Textual Inversion and Train DreamBooth (full fine-tune) (their advanced options:
nodes/settings.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..trainer.errors import DreamLoomError
from . import comfy, runner
from .images import files_to_batch
from .widgets import bool_widget, float_widget, int_widget, string_widget

if TYPE_CHECKING:
    from ..trainer.config import TrainConfig

CATEGORY = "DreamLoom/training"
SEED_MAX = 2**63 - 1


def _train_config():
    """TrainConfig, imported on first use: trainer.config is the pack's largest module, and ComfyUI times the pack's
    import at start-up (INPUT_TYPES and the nodes' work come later)."""
    from ..trainer.config import TrainConfig

    return TrainConfig


def _common_inputs(method: str) -> dict:
    d = _train_config()(method=method).validate()
    return {
        "ckpt_name": (
            runner.checkpoint_choices(),
            {
                "tooltip": "SD1.5 or SDXL checkpoint to personalise (from models/checkpoints; the family is read from "
                "the file); base_model overrides it."
            },
        ),
        "instance_images": ("DL_DATASET", {"tooltip": "Your 5-20 images, from Load Training Images."}),
        "output_name": string_widget(
            "sks_fabric" if method == "lora" else "sks_fabric_ti",
            "File name for the result (no folders). An existing different file is never overwritten: a _v2 suffix "
            "is added.",
        ),
        "learning_rate": float_widget(
            d.learning_rate, 1e-7, 1.0, 1e-5, "Learning rate (tutorial: LoRA 1e-4, TI 5e-4).", round=False
        ),
        "max_train_steps": int_widget(800 if method == "lora" else 1500, 1, 100000, "Optimizer steps."),
        "seed": int_widget(
            42,
            0,
            SEED_MAX,
            "Seed for the whole run: same seed and inputs give the same result.",
            control_after_generate=True,
        ),
        "sample_every": int_widget(
            100,
            0,
            100000,
            "A preview grid every N steps, and at the start and the end; 0 = no previews at all (each grid costs "
            "minutes for SD1.5 on a CPU, more for SDXL; the run's log says how long).",
        ),
    }


CONCEPTS_INPUT = (
    "DL_CONCEPTS",
    {
        "tooltip": "Several subjects from Add Concept nodes, in place of instance_images: each brings its images, "
        "prompt and token, class images, repeats and prior weight (the node's own prompt widgets are then unused)."
    },
)


def _dreambooth_optional_inputs(common: dict) -> dict:
    """The optional inputs Train DreamBooth LoRA and Train DreamBooth (full fine-tune) share, in their order."""
    return {
        "instance_images": common["instance_images"],
        "base_model": runner.BASE_MODEL_INPUT,
        "class_images": (
            "DL_DATASET",
            {"tooltip": "Class images from Generate Class Images (otherwise they are generated here)."},
        ),
        "settings": ("DL_TRAIN_SETTINGS", {"tooltip": "Advanced options from DreamLoom Training Settings."}),
        "concepts": CONCEPTS_INPUT,
    }


def _config(method: str, ckpt_name, dataset, settings, base_model=None, concepts=None, **fields) -> TrainConfig:
    """The run's TrainConfig. With a concept list (Add Concept), the first concept's images set the size, crop,
    flip and captions of all, and each concept brings its own folders and prompts."""
    base = runner.resolve_checkpoint(base_model or ckpt_name)
    if concepts:
        dataset = concepts[0].images
        fields["concepts"] = [entry.as_config() for entry in concepts]
    if dataset is None:
        raise DreamLoomError(
            "No training images connected.",
            "Connect Load Training Images to instance_images (or a list of Add Concept nodes to concepts).",
        )
    extra = dict(settings or {})
    data = dict(
        method=method,
        base_model=base,
        instance_dir="" if concepts else dataset.folder,
        resolution=dataset.resolution or runner.native_resolution(base),
        center_crop=dataset.center_crop,
        random_flip=dataset.random_flip,
        use_captions=dataset.use_captions,
        aspect_buckets=getattr(dataset, "aspect_buckets", True),  # a link made before buckets: their default
        masked_loss=getattr(dataset, "masked_loss", False),
        mask_from_alpha=getattr(dataset, "mask_from_alpha", False),
        checkpoint_every=100,
        **fields,
    )
    data.update(extra)
    if data.get("mixed_precision") == "fp16" and not _cuda():
        data["mixed_precision"] = "no"  # stated in the settings tooltip
    return _train_config().from_dict(data).validate()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _data_fingerprint(dataset, concepts) -> str:
    """What identifies the run's images: the dataset's, or every concept's images and class images."""
    if not concepts:
        return dataset.fingerprint
    parts = [(e.images.fingerprint, e.class_images.fingerprint if e.class_images else "") for e in concepts]
    return "+".join(f"{a}/{b}" for a, b in parts)


def _run(cfg: TrainConfig, dataset, class_dataset, unique_id, concepts=None):
    from ..trainer.jobs.parent import prepare_run_dir

    request = {
        "kind": "train",
        "config": cfg.to_dict(),
        "cache_root": comfy.dreamloom_directory(),
        "class_dir": class_dataset.folder if class_dataset is not None else None,
    }
    fingerprints = {
        "model": runner.model_fingerprint(cfg.base_model),
        "data": _data_fingerprint(dataset, concepts),
        "class": class_dataset.fingerprint if class_dataset is not None else None,
    }
    run_dir = prepare_run_dir(
        Path(comfy.dreamloom_directory()) / "runs", request, fingerprints, name_hint=cfg.output_name
    )
    return run_dir, runner.run_with_progress(run_dir, cfg.max_train_steps, unique_id)


def _read_back(path: str) -> None:
    """Success only after the file exists and reads back as safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            if not list(f.keys()):
                raise ValueError("no tensors")
    except Exception as err:  # noqa: BLE001
        raise DreamLoomError(
            f"The trained file {path} cannot be read back ({err}).",
            "Run the node again; the job resumes from its last checkpoint.",
        ) from err


def _train_and_publish(
    cfg: TrainConfig, dataset, class_dataset, unique_id, concepts, output_key: str, folder_kind: str
):
    """Runs the training job, checks that its `output_key` file reads back and publishes it into ComfyUI's
    `folder_kind` folder (a _v2 suffix where another file has the name): (the published path, the job's outputs)."""
    from ..trainer.files.atomic import publish

    _run_dir, outputs = _run(cfg, dataset, class_dataset, unique_id, concepts)
    _read_back(outputs[output_key])
    folders = comfy.folder_paths_for(folder_kind)
    if not folders:
        raise DreamLoomError(f"ComfyUI has no {folder_kind} folder configured.", "Check extra_model_paths.yaml.")
    return publish(outputs[output_key], folders[0], cfg.output_name, ".safetensors"), outputs


def _train_dreambooth(method: str, output_key: str, folder_kind: str, inputs: dict, **method_fields):
    """What Train DreamBooth LoRA and Train DreamBooth (full fine-tune) share: their common inputs (`inputs`, the
    node's arguments by name: its `locals()`) and `method_fields` make the config; the trained file is published."""
    concepts = inputs["concepts"]
    class_images = None if concepts else inputs["class_images"]  # each concept brings its own
    prior_preservation = inputs["prior_preservation"]
    cfg = _config(
        method,
        inputs["ckpt_name"],
        inputs["instance_images"],
        inputs["settings"],
        inputs["base_model"],
        concepts,
        instance_prompt=inputs["instance_prompt"],
        token=inputs["token"],
        class_prompt=inputs["class_prompt"],
        with_prior_preservation=bool(prior_preservation),
        prior_loss_weight=float(inputs["prior_loss_weight"]),
        num_class_images=int(class_images.count if class_images is not None else inputs["num_class_images"]),
        learning_rate=float(inputs["learning_rate"]),
        max_train_steps=int(inputs["max_train_steps"]),
        seed=int(inputs["seed"]),
        sample_every=int(inputs["sample_every"]),
        output_name=inputs["output_name"].strip(),
        **method_fields,
    )
    class_dataset = class_images if prior_preservation else None
    published, outputs = _train_and_publish(
        cfg, inputs["instance_images"], class_dataset, inputs["unique_id"], concepts, output_key, folder_kind
    )
    return _ui_result(outputs, (published.name,))


def _ui_result(outputs: dict, names: tuple):
    """The node's result: `names`, then the loss plot and the sample grids; the UI shows the last grid, the plot
    and the settings `auto` chose."""
    result = (*names, files_to_batch([outputs["loss_plot"]]), files_to_batch(outputs.get("samples", [])))
    previews = [p for p in outputs.get("samples", [])[-1:]] + [outputs["loss_plot"]]
    try:
        ui = {"images": runner.ui_images(previews)}
    except ValueError:  # run dir outside the output folder (custom setups): no UI preview
        ui = {}
    if outputs.get("settings"):  # what `auto` chose (precision, checkpointing, TF32), also in the run's log
        ui["text"] = ["; ".join(f"{k}: {v}" for k, v in outputs["settings"].items())]
    return {"ui": ui, "result": result}


class TrainDreamBoothLoRA:
    DESCRIPTION = (
        "DreamBooth LoRA training with prior preservation, in a separate worker process: live progress with sample "
        "previews, cancel (a checkpoint is kept) and resume. Publishes a kohya-format LoRA into ComfyUI's loras folder."
    )
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("lora_name", "loss_plot", "samples")
    OUTPUT_TOOLTIPS = (
        "The LoRA's file name in the loras folder; connect it to Load DreamLoom LoRA.",
        "Instance and prior loss per step.",
        "The sample grids made during training, oldest first.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        d = _train_config()()
        common = _common_inputs("lora")
        return {
            "required": {
                "ckpt_name": common["ckpt_name"],
                "instance_prompt": string_widget(d.instance_prompt, "Prompt for your images; must contain the token."),
                "token": string_widget(d.token, "The rare word that will mean your subject (e.g. sks)."),
                "class_prompt": string_widget(
                    d.class_prompt,
                    "The same description without the token; used for prior preservation and drift samples.",
                ),
                "prior_preservation": bool_widget(True, "Train on class images too, so the class keeps its meaning."),
                "prior_loss_weight": float_widget(1.0, 0.0, 10.0, 0.05, "Weight of the class-image loss."),
                "num_class_images": int_widget(
                    100, 1, 10000, "Class images to generate when class_images is not connected."
                ),
                "rank": int_widget(d.rank, 1, 256, "LoRA rank (tutorial: 4)."),
                "alpha": float_widget(
                    d.alpha,
                    0.01,
                    1024.0,
                    0.5,
                    "LoRA alpha; the LoRA is applied at scale alpha/rank, stored in the file.",
                ),
                **{k: common[k] for k in ("learning_rate", "max_train_steps", "seed", "sample_every", "output_name")},
            },
            "optional": _dreambooth_optional_inputs(common),
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(
        self,
        ckpt_name,
        instance_prompt,
        token,
        class_prompt,
        prior_preservation,
        prior_loss_weight,
        num_class_images,
        rank,
        alpha,
        learning_rate,
        max_train_steps,
        seed,
        sample_every,
        output_name,
        instance_images=None,
        class_images=None,
        settings=None,
        base_model=None,
        concepts=None,
        unique_id=None,
    ):
        return _train_dreambooth("lora", "lora", "loras", locals(), rank=int(rank), alpha=float(alpha))


class TrainTextualInversion:
    DESCRIPTION = (
        "Textual Inversion: learns a new token's embedding (a file of a few KB), in a worker process with progress, "
        "cancel and resume. Publishes into ComfyUI's embeddings folder; use it in prompts as embedding:<name>."
    )
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("embedding_name", "prompt_token", "loss_plot", "samples")
    OUTPUT_TOOLTIPS = (
        "The embedding's name in the embeddings folder.",
        "Text to put in prompts: embedding:<name>.",
        "Loss per step.",
        "The sample grids made during training, oldest first.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        d = _train_config()(method="ti")
        common = _common_inputs("ti")
        return {
            "required": {
                **{k: common[k] for k in ("ckpt_name", "instance_images")},
                "placeholder_token": string_widget(
                    d.placeholder_token,
                    "A made-up token for training, e.g. <sks-fabric>. In ComfyUI prompts you then write "
                    "embedding:<name>.",
                ),
                "initializer_token": string_widget(
                    d.initializer_token, "One existing word the embedding starts from (e.g. pattern)."
                ),
                **{k: common[k] for k in ("learning_rate", "max_train_steps", "seed", "sample_every", "output_name")},
            },
            "optional": {
                "base_model": runner.BASE_MODEL_INPUT,
                "settings": ("DL_TRAIN_SETTINGS", {"tooltip": "Advanced options from DreamLoom Training Settings."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(
        self,
        ckpt_name,
        instance_images,
        placeholder_token,
        initializer_token,
        learning_rate,
        max_train_steps,
        seed,
        sample_every,
        output_name,
        settings=None,
        base_model=None,
        unique_id=None,
    ):
        cfg = _config(
            "ti",
            ckpt_name,
            instance_images,
            settings,
            base_model,
            placeholder_token=placeholder_token.strip(),
            initializer_token=initializer_token.strip(),
            learning_rate=float(learning_rate),
            max_train_steps=int(max_train_steps),
            seed=int(seed),
            sample_every=int(sample_every),
            with_prior_preservation=False,
            output_name=output_name.strip(),
        )
        published, outputs = _train_and_publish(cfg, instance_images, None, unique_id, None, "embedding", "embeddings")
        return _ui_result(outputs, (published.stem, f"embedding:{published.stem}"))


class TrainDreamBoothFull:
    DESCRIPTION = (
        "DreamBooth as the paper does it: the whole UNet (and optionally the text encoder) fine-tuned with prior "
        "preservation, in a worker process with progress, sample previews, cancel and resume. Publishes one "
        "checkpoint file (SD1.5/SDXL original layout, fp16 by default) into ComfyUI's checkpoints folder, where Load "
        "Checkpoint lists it. Needs a GPU with about 10 GB for SD1.5 (fp16, gradient checkpointing, 8-bit AdamW) "
        "and disk room for one checkpoint of about 10 GB; the run says what it needs before it starts."
    )
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("ckpt_name", "loss_plot", "samples")
    OUTPUT_TOOLTIPS = (
        "The checkpoint's file name in the checkpoints folder; connect it to ckpt_path of Load Checkpoint "
        "(DreamLoom), or pick it in core Load Checkpoint.",
        "Instance and prior loss per step.",
        "The sample grids made during training, oldest first.",
    )
    # these widgets of the node win over the same options of a connected Training Settings (a LoRA's defaults)
    OWN_SETTINGS = ("train_text_encoder", "text_encoder_lr")

    @classmethod
    def INPUT_TYPES(cls):
        d = _train_config()(method="full").validate()
        common = _common_inputs("full")
        return {
            "required": {
                "ckpt_name": common["ckpt_name"],
                "instance_prompt": string_widget(d.instance_prompt, "Prompt for your images; must contain the token."),
                "token": string_widget(d.token, "The rare word that will mean your subject (e.g. sks)."),
                "class_prompt": string_widget(
                    d.class_prompt,
                    "The same description without the token; used for prior preservation and drift samples.",
                ),
                "prior_preservation": bool_widget(
                    True, "Train on class images too, so the class keeps its meaning (the paper's prior loss)."
                ),
                "prior_loss_weight": float_widget(1.0, 0.0, 10.0, 0.05, "Weight of the class-image loss (paper: 1)."),
                "num_class_images": int_widget(
                    100, 1, 10000, "Class images to generate when class_images is not connected."
                ),
                "train_text_encoder": bool_widget(
                    False, "Also fine-tune the text encoder(s): better likeness, more memory (about +2 GB for SD1.5)."
                ),
                "text_encoder_lr": float_widget(
                    d.text_encoder_lr, 1e-8, 1.0, 1e-7, "Learning rate of the text encoder (Colab: 1e-6).", round=False
                ),
                "use_ema": bool_widget(
                    False, "Keep a moving average of the weights and export it (smoother; +4 bytes per weight)."
                ),
                "learning_rate": float_widget(
                    d.learning_rate,
                    1e-8,
                    1.0,
                    1e-7,
                    "UNet learning rate (paper: 5e-6; the Colab: 2e-6, or 1e-6 with the text encoder).",
                    round=False,
                ),
                "max_train_steps": int_widget(800, 1, 100000, "Optimizer steps (about 100-200 per instance image)."),
                **{k: common[k] for k in ("seed", "sample_every")},
                "output_name": string_widget(
                    "sks_fabric_full",
                    "File name for the checkpoint (no folders). An existing different file is never overwritten: a "
                    "_v2 suffix is added.",
                ),
            },
            "optional": _dreambooth_optional_inputs(common),
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(
        self,
        ckpt_name,
        instance_prompt,
        token,
        class_prompt,
        prior_preservation,
        prior_loss_weight,
        num_class_images,
        train_text_encoder,
        text_encoder_lr,
        use_ema,
        learning_rate,
        max_train_steps,
        seed,
        sample_every,
        output_name,
        instance_images=None,
        class_images=None,
        settings=None,
        base_model=None,
        concepts=None,
        unique_id=None,
    ):
        inputs = dict(locals())
        inputs["settings"] = {k: v for k, v in (settings or {}).items() if k not in self.OWN_SETTINGS}
        return _train_dreambooth(
            "full",
            "checkpoint",
            "checkpoints",
            inputs,
            train_text_encoder=bool(train_text_encoder),
            text_encoder_lr=float(text_encoder_lr),
            use_ema=bool(use_ema),
        )
