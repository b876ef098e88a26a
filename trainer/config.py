"""TrainConfig: every training option in one dataclass, checked before anything runs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import DreamLoomError
from .files.names import safe_name

METHODS = ("lora", "ti", "full")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")  # auto: bf16 where the GPU has it, else fp16; no on a CPU
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SAMPLERS = ("dpmpp_2m", "euler", "euler_a", "ddim", "pndm")
TI_TEMPLATES = ("style", "object", "captions")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# full: the DreamBooth paper's 5e-6 (ShivamShrirao's Colab uses 2e-6, and 1e-6 when the text encoder trains too)
DEFAULT_LR = {"lora": 1e-4, "ti": 5e-4, "full": 5e-6}
# The text encoder's rate when it trains: a LoRA's 5e-5; the full method's whole encoder the Colab's 1e-6 (a fully
# trained CLIP forgets words fast)
DEFAULT_TEXT_ENCODER_LR = {"lora": 5e-5, "ti": 5e-5, "full": 1e-6}
# Resumable checkpoints kept per run: a full fine-tune's hold the whole UNet and its optimizer state (SD1.5 about
# 10 GB each), so only the newest is kept
DEFAULT_CHECKPOINTS_KEEP = {"lora": 2, "ti": 2, "full": 1}
EXPORT_PRECISIONS = ("fp16", "bf16", "fp32")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "dreamloom"  # class images, when no folder is given
# What one concept of a multi-concept run may set (a TOML [[concepts]] table, or the Concept node); unset keys take
# the run's value of the same name, repeats defaults to 1.
CONCEPT_KEYS = (
    "name", "instance_dir", "instance_prompt", "token", "class_prompt", "class_dir", "num_class_images", "repeats",
    "prior_loss_weight",
)  # fmt: skip
# Built-in model -> native size in pixels. The same table as base_models/builtin.py:BUILTIN_RESOLUTION, kept here
# so the CLI can pick the size without importing torch; tests/test_config.py checks that the two agree.
BUILTIN_RESOLUTION = {"tiny": 64, "tiny-fabric": 128, "tiny-sdxl": 64}


@dataclass(frozen=True)
class Concept:
    """One subject of a run: its images, prompts, class images, repeats and prior weight (all resolved)."""

    name: str
    instance_dir: str
    instance_prompt: str
    token: str
    class_prompt: str
    class_dir: str
    num_class_images: int
    repeats: int
    prior_loss_weight: float


@dataclass
class TrainConfig:
    """A DreamBooth-LoRA, Textual-Inversion or full DreamBooth fine-tune run. Defaults follow the fabric tutorial."""

    # What to train on
    method: str = "lora"
    base_model: str = "tiny"
    instance_dir: str = ""
    instance_prompt: str = "a sks african fabric pattern"
    token: str = "sks"
    use_captions: bool = False
    caption_shuffle: bool = False  # shuffle comma-separated tags after the first caption_keep_tokens
    caption_keep_tokens: int = 1
    caption_dropout: float = 0.0  # probability of an empty prompt (trains the unconditional case)
    resolution: int = 512
    center_crop: bool = True  # the fit crop (buckets) or the square crop (no buckets): centred, else random
    random_flip: bool = False
    # Several subjects in one run (the seed Colab's concepts_list): each a dict of CONCEPT_KEYS; empty: the one
    # concept the fields above describe.
    concepts: list[dict] = field(default_factory=list)
    aspect_buckets: bool = True  # images keep their shape: buckets of about resolution² pixels
    bucket_step: int = 0  # bucket sides are multiples of this; 0: an eighth of the resolution, at most 64
    max_aspect: float = 2.0  # longest / shortest side of a bucket; wider images are cropped to it
    masked_loss: bool = False  # weight the loss by <stem>_mask.png (white = learn, black = ignore)
    mask_from_alpha: bool = False  # with masked_loss: an image's alpha channel where it has no mask file
    unmasked_weight: float = 0.0  # the loss weight where a mask is black

    # Prior preservation
    with_prior_preservation: bool = True
    class_prompt: str = "a fabric pattern"
    class_negative_prompt: str = ""
    class_dir: str = ""
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_sampler: str = "dpmpp_2m"
    class_steps: int = 20  # DPM-Solver++ 2M has converged by 20 (ComfyUI's KSampler default too)
    class_guidance: float = 7.5
    class_batch_size: int = 4

    # LoRA
    rank: int = 4
    alpha: float = 4.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # None: the method's default (LoRA 5e-5, full 1e-6)

    # Textual inversion
    placeholder_token: str = "<sks-fabric>"
    initializer_token: str = "pattern"
    num_vectors: int = 1
    ti_templates: str = "style"
    clamp_norm: bool = False

    # Full fine-tune (method "full": the whole UNet, and the text encoders with train_text_encoder)
    use_ema: bool = False  # an exponential moving average of the trained weights, exported instead of them
    ema_decay: float = 0.9999
    export_precision: str = "fp16"  # the single-file checkpoint's dtype: fp16, bf16 or fp32
    export_diffusers: bool = False  # also write the fine-tuned model as a diffusers folder

    # Optimisation
    learning_rate: float | None = None  # None: the method's default (LoRA 1e-4, TI 5e-4, full 5e-6)
    max_train_steps: int = 800
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    snr_gamma: float = 0.0
    noise_offset: float = 0.0
    prediction_type: str = "auto"  # auto: what the checkpoint declares (ComfyUI's v_pred marker), else epsilon
    mixed_precision: str = "auto"
    gradient_checkpointing: bool | None = None  # None: on when the GPU's free memory is small (see precision.py)
    half_frozen_convs: bool | None = None  # None: on for fp32 training on a CPU (training/half_convs.py)
    cudnn_benchmark: bool = False  # CUDA: cuDNN times its convolution algorithms per shape (precision.py)
    torch_compile: bool = False
    cache_latents: bool = True
    seed: int = 42

    # Samples, checkpoints, logging
    sample_every: int = 100
    sample_steps: int = 25
    sample_guidance: float = 7.5
    sample_seed: int = 1234
    sample_prompts: list[str] = field(default_factory=list)
    checkpoint_every: int = 100
    checkpoints_keep: int | None = None  # None: the method's default (2; a full fine-tune's are large: 1)
    output_name: str = "sks_fabric"

    # Validation: held-out images measured at fixed noise and timesteps (training/validation.py)
    validation_images: int = 0  # instance images held out of training (a seeded pick; 1 or 2 is typical)
    validation_dir: str = ""  # or/and a folder of held-out images of the subject
    validation_every: int = 50

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank

    @property
    def bucket_pixels(self) -> int:
        """The bucket step in pixels: bucket_step, or for 0 an eighth of the resolution in multiples of 8, at most 64
        (kohya's 64 at SD1.5 and SDXL sizes; 16 for the 128 px built-in model, whose buckets a 64 px step would
        leave square only)."""
        return self.bucket_step or min(64, max(8, self.resolution // 64 * 8))

    def concept_list(self) -> list[Concept]:
        """The run's concepts, every value resolved: `concepts`, or the one the top-level fields describe."""
        top = {k: getattr(self, k) for k in CONCEPT_KEYS if k not in ("name", "repeats")}
        if not self.concepts:
            return [Concept(name=Path(self.instance_dir).name or "images", repeats=1, **top)]
        out = []
        for i, raw in enumerate(self.concepts):
            values = {**top, "repeats": 1, "class_dir": "", **raw}
            values.setdefault("name", Path(values["instance_dir"]).name or f"concept {i + 1}")
            out.append(Concept(**values))
        return out

    # ---------------------------------------------------------------- validation
    def validate(self) -> TrainConfig:
        """Check every field; raise DreamLoomError naming the field, the value and the fix."""
        self._choice("method", METHODS)
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LR[self.method]
        if self.text_encoder_lr is None:
            self.text_encoder_lr = DEFAULT_TEXT_ENCODER_LR[self.method]
        if self.checkpoints_keep is None:
            self.checkpoints_keep = DEFAULT_CHECKPOINTS_KEEP[self.method]
        self._choice("export_precision", EXPORT_PRECISIONS)
        self._choice("mixed_precision", MIXED_PRECISION)
        self._choice("prediction_type", PREDICTION_TYPES)
        self._choice("lr_scheduler", LR_SCHEDULERS)
        self._choice("class_sampler", SAMPLERS)
        self._choice("ti_templates", TI_TEMPLATES)
        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise self._bad(
                "base_model",
                "Give 'tiny-fabric' or 'tiny' (built in), a .safetensors SD1.5 checkpoint, or a diffusers folder.",
            )
        self._check_numbers()
        self._check_lists_and_names()
        self._check_concepts()
        self._check_method_settings()
        self._expand_home()
        return self

    def _expand_home(self) -> None:
        """'~' in a folder setting is the home folder, as a shell would read it: a TOML file, a quoted flag or a
        node's text box has no shell to expand it."""
        for name in ("instance_dir", "class_dir", "validation_dir"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, os.path.expanduser(getattr(self, name)))
        for concept in self.concepts:
            for name in ("instance_dir", "class_dir"):
                if isinstance(concept.get(name), str):
                    concept[name] = os.path.expanduser(concept[name])

    # -- the checks validate() runs ------------------------------------------------------------------------
    def _bad(self, name: str, fix: str) -> DreamLoomError:
        return DreamLoomError(f"Invalid setting {name} = {getattr(self, name)!r}.", fix)

    def _choice(self, name: str, options: tuple[str, ...]) -> None:
        if getattr(self, name) not in options:
            raise self._bad(name, f"Use one of: {', '.join(options)}.")

    def _whole(self, name: str, minimum: int = 1, maximum: int | None = None) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
            allowed = f"between {minimum} and {maximum}" if maximum else f"{minimum} or more"
            raise self._bad(name, f"Use a whole number {allowed}.")

    def _number(self, name: str, low: float, high: float, low_open: bool = False) -> None:
        value = getattr(self, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low) and value <= high
        if not ok:
            lowest = f"more than {low}" if low_open else f"at least {low}"
            raise self._bad(name, f"Use a number {lowest} and at most {high}.")

    def _check_numbers(self) -> None:
        self._whole("resolution", 64, 2048)
        if self.resolution % 8:
            raise self._bad("resolution", f"Use a multiple of 8, for example {self.resolution // 8 * 8 or 64}.")
        self._whole("bucket_step", 0, 512)
        if self.bucket_step % 8 or 0 < self.bucket_step < 8:
            example = self.bucket_step // 8 * 8 or 64
            raise self._bad("bucket_step", f"Use a multiple of 8 (a VAE latent cell), for example {example}.")
        for name, low, high in (
            ("max_train_steps", 1, 1_000_000),
            ("train_batch_size", 1, 64),
            ("gradient_accumulation_steps", 1, 1024),
            ("rank", 1, 1024),
            ("lr_warmup_steps", 0, 1_000_000),
            ("class_steps", 1, 1000),
            ("sample_steps", 1, 1000),
            ("class_batch_size", 1, 256),
            ("num_class_images", 0, 100_000),
            ("sample_every", 0, 1_000_000),
            ("checkpoint_every", 0, 1_000_000),
            ("checkpoints_keep", 1, 1000),
            ("num_vectors", 1, 16),
            ("caption_keep_tokens", 0, 1000),
            ("validation_images", 0, 1000),
            ("validation_every", 1, 1_000_000),
        ):
            self._whole(name, low, high)
        for name in ("alpha", "learning_rate", "text_encoder_lr", "adam_epsilon"):
            self._number(name, 0.0, {"alpha": 1e6}.get(name, 1.0), low_open=True)
        for name, low, high in (
            ("max_grad_norm", 0.0, 1e6),
            ("adam_beta1", 0.0, 0.999999),
            ("adam_beta2", 0.0, 0.999999),
            ("adam_weight_decay", 0.0, 10.0),
            ("snr_gamma", 0.0, 100.0),
            ("noise_offset", 0.0, 1.0),
            ("prior_loss_weight", 0.0, 100.0),
            ("class_guidance", 0.0, 50.0),
            ("sample_guidance", 0.0, 50.0),
            ("caption_dropout", 0.0, 0.99),
            ("ema_decay", 0.0, 0.999999),
            ("max_aspect", 1.0, 8.0),
            ("unmasked_weight", 0.0, 1.0),
        ):
            self._number(name, low, high)
        for name in ("seed", "sample_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise self._bad(name, "Use a whole number from 0 to 2**63-1.")
        if self.lr_warmup_steps >= self.max_train_steps and self.lr_scheduler != "constant":
            raise self._bad(
                "lr_warmup_steps", f"Use fewer warm-up steps than max_train_steps ({self.max_train_steps})."
            )

    def _check_lists_and_names(self) -> None:
        targets = self.lora_targets
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise self._bad("lora_targets", f"Give a non-empty list of module names, for example {list(LORA_TARGETS)}.")
        if not isinstance(self.sample_prompts, list) or not all(isinstance(p, str) for p in self.sample_prompts):
            raise self._bad("sample_prompts", "Give a list of prompt strings.")
        try:
            safe_name(self.output_name, "output_name")
        except DreamLoomError as err:
            raise DreamLoomError(
                f"Invalid setting output_name = {self.output_name!r}: {err.message}", err.hint
            ) from None

    def _check_concepts(self) -> None:
        """Each [[concepts]] table: known keys of the right types and ranges; the subject checks run per concept."""
        if not isinstance(self.concepts, list) or not all(isinstance(c, dict) for c in self.concepts):
            raise self._bad("concepts", "Give a list of tables: [[concepts]] in the TOML file, one per subject.")
        if not self.concepts:
            return
        if self.instance_dir:
            raise DreamLoomError(
                f"Both instance_dir = {self.instance_dir!r} and {len(self.concepts)} concept(s) are set.",
                "Give the images either as instance_dir (one subject) or in [[concepts]] tables (each with its own "
                "instance_dir), not both.",
            )
        if self.method == "ti" and len(self.concepts) > 1:
            raise DreamLoomError(
                f"Textual inversion learns one token, and {len(self.concepts)} concepts are set.",
                "Train one embedding per concept (one run each), or use method lora for several subjects.",
            )
        kinds = {"num_class_images": int, "repeats": int, "prior_loss_weight": (int, float)}
        for i, concept in enumerate(self.concepts):
            where = f"concepts[{i}]"
            unknown = sorted(set(concept) - set(CONCEPT_KEYS))
            if unknown:
                close = {u: _closest(u, dict.fromkeys(CONCEPT_KEYS)) for u in unknown}
                names = ", ".join(f"{u!r} (did you mean {c!r}?)" if c else repr(u) for u, c in close.items())
                raise DreamLoomError(
                    f"Unknown key(s) in {where}: {names}.", f"A concept may set: {', '.join(CONCEPT_KEYS)}."
                )
            if not isinstance(concept.get("instance_dir"), str) or not concept["instance_dir"].strip():
                raise DreamLoomError(
                    f"{where} has no instance_dir.", "Give each concept the folder of its images: instance_dir = '...'."
                )
            for key, value in concept.items():
                kind = kinds.get(key, str)
                if isinstance(value, bool) or not isinstance(value, kind):
                    raise DreamLoomError(
                        f"Invalid setting {where}.{key} = {value!r}.",
                        f"Give {key} as a {'number' if key == 'prior_loss_weight' else kind.__name__}.",
                    )
            limits = {"repeats": (1, 1000), "num_class_images": (0, 100_000), "prior_loss_weight": (0.0, 100.0)}
            for key, (low, high) in limits.items():
                if key in concept and not low <= concept[key] <= high:
                    raise DreamLoomError(
                        f"Invalid setting {where}.{key} = {concept[key]!r}.", f"Use a value from {low} to {high}."
                    )
        names = [c.name for c in self.concept_list()]
        if len(set(names)) < len(names):
            raise DreamLoomError(
                f"Two concepts have the same name ({', '.join(sorted(n for n in set(names) if names.count(n) > 1))}).",
                "Give each concept its own name = '...' (it labels the log and the samples).",
            )

    def _check_method_settings(self) -> None:
        if self.method != "full":
            for name in ("use_ema", "export_diffusers"):
                if getattr(self, name):
                    raise self._bad(name, "It applies to the full fine-tune only: use method 'full', or turn it off.")
        for i, concept in enumerate(self.concept_list()):
            self._check_concept(concept, f"concepts[{i}]" if self.concepts else "")
        if self.method == "ti":
            tok = self.placeholder_token
            if not tok or any(c.isspace() for c in tok):
                raise self._bad("placeholder_token", "Use one word with no spaces, for example '<sks-fabric>'.")
            if not self.initializer_token.strip() or any(c.isspace() for c in self.initializer_token.strip()):
                raise self._bad("initializer_token", "Use one existing word, for example 'pattern'.")

    def _check_concept(self, concept: Concept, where: str) -> None:
        """A subject's token, instance prompt and class settings (`where`: '' for the top-level fields, else
        'concepts[i]', which prefixes the setting names in messages)."""

        def bad(name: str, fix: str) -> DreamLoomError:
            label = f"{where}.{name}" if where else name
            return DreamLoomError(f"Invalid setting {label} = {getattr(concept, name)!r}.", fix)

        if self.method != "ti":
            if not concept.token.strip():
                raise bad("token", "Give the rare word that stands for your subject, for example 'sks'.")
            if not self.use_captions and not _has_word(concept.instance_prompt, concept.token):
                raise bad(
                    "instance_prompt",
                    f"The instance prompt must contain the token {concept.token!r}, for example "
                    f"'a {concept.token} {concept.class_prompt.removeprefix('a ').strip() or 'fabric pattern'}'.",
                )
        if self.with_prior_preservation and self.method in ("lora", "full") and concept.prior_loss_weight > 0:
            if concept.num_class_images == 0 and not concept.class_dir:
                raise bad(
                    "num_class_images",
                    "Prior preservation needs class images: set num_class_images above 0 (100 is typical), "
                    "give class_dir, or turn off with_prior_preservation.",
                )
            if not concept.class_prompt.strip():
                raise bad("class_prompt", "Give the class your subject belongs to, for example 'a fabric pattern'.")
            self._check_class_prompt_differs(concept, where)

    def _check_class_prompt_differs(self, concept: Concept, where: str) -> None:
        """Prior preservation teaches the model that the class prompt still means the plain class. The same
        prompt as the instance prompt, or one containing the token, teaches the opposite of what is trained."""
        instance, klass, token = concept.instance_prompt, concept.class_prompt, concept.token
        example = _without_word(instance, token) or "a fabric pattern"
        prefix = f"{where}." if where else ""
        if " ".join(klass.lower().split()) == " ".join(instance.lower().split()):
            raise DreamLoomError(
                f"Invalid setting {prefix}class_prompt = {klass!r}: it is the same as {prefix}instance_prompt = "
                f"{instance!r}, so prior preservation would train the subject and undo it on the same prompt.",
                f"Make class_prompt the plain class without the token {token!r}, for example {example!r}; "
                "or turn off with_prior_preservation.",
            )
        if _has_word(klass, token, ignore_case=True):
            raise DreamLoomError(
                f"Invalid setting {prefix}class_prompt = {klass!r}: it contains the token {token!r} of "
                f"{prefix}instance_prompt = {instance!r}, so the class images would be trained as the subject.",
                f"Remove the token from class_prompt, for example {example!r}; or turn off with_prior_preservation.",
            )

    def notes(self) -> list[str]:
        """Warnings for settings that are valid but most likely not what was meant (logged when a run starts)."""
        notes = self._class_prompt_notes()
        if self.mask_from_alpha and not self.masked_loss:
            notes.append(
                "mask_from_alpha is on but masked_loss is off, so no mask is used. Turn masked_loss on "
                "(--masked-loss true) to weight the loss by the images' alpha."
            )
        return notes

    def _class_prompt_notes(self) -> list[str]:
        """A class prompt that shares no word with its instance prompt (past the token and small words): most often
        the default 'a fabric pattern' left in place for another subject, which would make prior images of fabric
        for a dog."""
        if not (self.method in ("lora", "full") and self.with_prior_preservation and self.prior_loss_weight > 0):
            return []
        notes = []
        for concept in self.concept_list():
            instance_words = _content_words(_without_word(concept.instance_prompt, concept.token))
            if instance_words and not instance_words & _content_words(concept.class_prompt):
                where = f" of concept {concept.name!r}" if self.concepts else ""
                suggestion = _without_word(concept.instance_prompt, concept.token)
                notes.append(
                    f"class_prompt{where} {concept.class_prompt!r} shares no word with instance_prompt "
                    f"{concept.instance_prompt!r}: the class images should show the class the subject belongs "
                    f"to (perhaps {suggestion!r}). Set class_prompt (--class-prompt) if this is not intended."
                )
        return notes

    def check_device(self, device_type: str) -> None:
        """Options that depend on the device the run will use."""
        if self.use_8bit_adam and device_type != "cuda":
            raise DreamLoomError(
                f"Invalid setting use_8bit_adam = True: 8-bit AdamW (bitsandbytes) needs a CUDA GPU, and this run "
                f"is on {device_type}.",
                "Turn use_8bit_adam off (plain AdamW is used), or run on an NVIDIA GPU with bitsandbytes installed.",
            )
        if self.mixed_precision == "fp16" and device_type == "cpu":
            raise DreamLoomError(
                "Invalid setting mixed_precision = 'fp16': fp16 training is not supported on the CPU.",
                "Use mixed_precision 'no' (or 'bf16') on the CPU; fp16 is for CUDA GPUs.",
            )

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What makes this run differ from another: the settings not at their defaults (config_identity)."""
        return config_identity(self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            close = {u: _closest(u, known) for u in unknown}
            hints = ", ".join(f"{u!r} (did you mean {c!r}?)" if c else repr(u) for u, c in close.items())
            raise DreamLoomError(
                f"Unknown setting(s): {hints}.",
                "Check the spelling; `python -m trainer train --help` lists every setting.",
            )
        kwargs = {}
        for name, value in data.items():
            kwargs[name] = _coerce(name, known[name], value)
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib

        path = Path(path).expanduser()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DreamLoomError(f"Config file not found: {path}", "Check the path passed to --config.") from None
        except IsADirectoryError:
            raise DreamLoomError(f"--config {path} is a folder.", "Give the TOML file itself.") from None
        except PermissionError:
            raise DreamLoomError(
                f"Config file {path} cannot be read: this user has no permission to read it.",
                "Change the file's permissions, or copy it somewhere you can read.",
            ) from None
        except UnicodeDecodeError as err:
            raise DreamLoomError(
                f"Config file {path} is not UTF-8 text ({err.reason} at byte {err.start}).",
                "Save it as UTF-8 (TOML files are UTF-8; some editors save UTF-16 by default).",
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise DreamLoomError(
                f"Config file {path} is not valid TOML: {err}", "Fix the syntax at the position shown."
            ) from None
        # Allow an optional [train] table, holding every setting.
        if "train" in data and isinstance(data["train"], dict):
            if set(data) != {"train"}:
                others = ", ".join(sorted(k for k in data if k != "train"))
                raise DreamLoomError(
                    f"Config file {path} has settings both in a [train] table and outside it ({others}).",
                    "Put every setting under [train], or drop the [train] line and keep them all at the top.",
                )
            data = data["train"]
        return cls.from_dict(data)


def config_identity(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings of a config dict that differ from their field's default. Run folders and checkpoints are keyed by
    this, so an option a newer DreamLoom adds, left at its default, keeps the identity of every earlier run: an
    interrupted run still resumes and a finished one is still found after an update."""
    defaults = TrainConfig().to_dict()
    return {k: v for k, v in settings.items() if k not in defaults or defaults[k] != v}


def _word_pattern(word: str) -> str:
    import re

    return rf"(?<![\w]){re.escape(word)}(?![\w])"


def _has_word(text: str, word: str, ignore_case: bool = False) -> bool:
    import re

    return re.search(_word_pattern(word), text, flags=re.IGNORECASE if ignore_case else 0) is not None


SMALL_WORDS = {"a", "an", "the", "of", "in", "on", "with", "and", "photo", "picture", "image", "style"}


def _content_words(text: str) -> set[str]:
    import re

    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in SMALL_WORDS}


def _without_word(text: str, word: str) -> str:
    """`text` with every whole-word `word` taken out (the class prompt an instance prompt suggests)."""
    import re

    if not word.strip():
        return ""
    rest = " ".join(re.sub(_word_pattern(word), " ", text, flags=re.IGNORECASE).split())
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", rest)  # "a sks african ..." -> "an african ..."


def _closest(name: str, options: dict) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, list(options), n=1)
    return match[0] if match else None


def _coerce(name: str, f: dataclasses.Field, value: Any) -> Any:
    """Convert TOML/CLI values to the field's type; wrong types are a DreamLoomError."""
    type_name = str(f.type)
    try:
        if type_name.endswith(" | None") and isinstance(value, str) and value.strip().lower() == "none":
            return None  # --help shows these as TYPE | NONE
        if type_name == "bool | None" and (value is None or (isinstance(value, str) and value.lower() == "auto")):
            return None
        if type_name in ("bool", "bool | None"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if type_name == "int | None" and value is None:
            return None
        if type_name in ("int", "int | None"):
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if type_name in ("float", "float | None"):
            if value is None and type_name.endswith("None"):
                return None
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if type_name == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
        if type_name == "list[dict]":
            if isinstance(value, str):  # the CLI flag: JSON; a TOML file's [[concepts]] tables arrive as dicts
                value = json.loads(value)
            if isinstance(value, list) and all(isinstance(v, dict) for v in value):
                return list(value)
            raise ValueError
        if type_name == "list[str]":
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()] if name != "sample_prompts" else [value]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        return value
    if name == "concepts":
        raise DreamLoomError(
            f"Invalid setting concepts = {value!r}.",
            "Give the concepts as [[concepts]] tables in a TOML file (--config), or --concepts as a JSON list of "
            'objects, e.g. \'[{"instance_dir": "dog", "instance_prompt": "a sks dog"}]\'.',
        )
    wanted = TYPE_WORDS.get(type_name, type_name)
    raise DreamLoomError(f"Invalid setting {name} = {value!r}: expected {wanted}.", f"Give {name} as {wanted}.")


# what each field type takes, in words, for the message of a value of the wrong type
TYPE_WORDS = {
    "int": "a whole number",
    "int | None": "a whole number (or none for the default)",
    "float": "a number",
    "float | None": "a number (or none for the default)",
    "bool": "true or false",
    "bool | None": "true, false or auto",
    "str": "text",
    "list[str]": "a comma-separated list",
}
