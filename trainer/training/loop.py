"""The training loop shared by every method (DreamBooth LoRA, Textual Inversion).

Trainer.run reads as the steps of a run: set up, place on device, build caches, build optimizer, resume,
then for every optimizer step its micro-batches (`_micro_batch`) and what follows the step (`_end_of_step`),
and finish. The method object (training/methods) decides what is trained and exported; the model family
(base_models/family.py) how prompts become conditioning.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler

from .. import cpu_malloc
from ..base_models.load import load_base_model, stored_dtype
from ..config import DEFAULT_CACHE_DIR, TrainConfig
from ..data.batches import BatchLayout
from ..data.buckets import plan_buckets
from ..data.caches import LatentSource, PromptEmbeddings
from ..data.class_images import prepare_class_images
from ..data.concepts import ClassSets, describe_concepts, epoch_entries, load_concept_images
from ..data.images import ImageSet, load_image_folder
from ..errors import OUT_OF_MEMORY_HINT, DreamLoomError, StopRequested
from ..events import Events
from ..files.atomic import atomic_save, atomic_write_text
from ..files.job_file import read_job_file
from ..inference.gpu_memory import free_cuda_bytes, to_device
from ..inference.pipelines import generate, make_pipeline
from ..pictures.grid import labelled_grid
from .checkpoint import (
    checkpoints_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    train_id_for,
    versions,
)
from .half_convs import free_buffers, resolve_half_frozen_convs
from .loss import diffusion_loss
from .loss_log import LossLog
from .memory import GIB, phase_warnings
from .methods import make_method
from .parking import ParkedModules
from .precision import (
    CudnnBenchmark,
    enable_checkpointing,
    enable_tf32,
    make_accelerator,
    make_optimizer,
    place_modules,
    place_trainable_module,
    resolve_gradient_checkpointing,
    resolve_mixed_precision,
    weight_dtype,
)
from .timing import PhaseTimer, untimed
from .validation import ValidationLoss, hold_out, samples_from

SAMPLE_SAMPLER = "dpmpp_2m"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    outputs: dict
    resumed_from: int | None = None
    losses: list = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        events: Events | None = None,
        should_stop: Callable[[], bool] | None = None,
        comps=None,
        instance_set: ImageSet | None = None,
        cache_root: str | Path | None = None,
        class_dir: str | Path | None = None,
        timer: PhaseTimer | None = None,
        bench: bool = False,
    ):
        self.cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.events = events or Events(self.run_dir)
        self.should_stop = should_stop or (lambda: False)
        self.comps = comps  # the plain modules; never replaced by compiled or DDP-wrapped ones
        self.instance = instance_set
        self.cache_root = Path(cache_root) if cache_root else DEFAULT_CACHE_DIR
        self.class_dir = Path(class_dir) if class_dir else (Path(cfg.class_dir) if cfg.class_dir else None)
        self.timer = timer  # per-phase timing for `python -m trainer bench`
        self.phase = timer if timer is not None else untimed
        self.bench = bench  # bench runs skip samples, checkpoints and export
        self.loss_log = LossLog()
        self.offloaded: list[str] = []
        self.parked: ParkedModules | None = None  # a CPU run's VAE and text encoder, while on disk
        self.validation: ValidationLoss | None = None  # held-out images' loss (training/validation.py)
        self.cudnn_benchmark: CudnnBenchmark | None = None  # set_up

    # -- the run, step by step ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:  # the components are handed back whole, also after a stop or an error
            if self.parked is not None:
                self.parked.close()
            free_buffers()  # half_frozen_convs' widening buffer (up to 118 MB for SD1.5)
            if self.cudnn_benchmark is not None:
                self.cudnn_benchmark.restore()

    def _run(self) -> TrainResult:
        self.set_up()
        self.check_disk_space()
        self.place_on_device()
        self.build_caches()
        self.build_optimizer()
        start_step = self.resume()
        self.record_job()
        if start_step == 0 and not self.bench:
            self._sample(0)
        if self.acc.device.type == "cpu":  # after loading and parking: the steps' large blocks stay in the heap
            cpu_malloc.keep_large_blocks_in_heap()
        self.t0, self.start_step = time.perf_counter(), start_step
        step = start_step
        try:
            for step in range(start_step + 1, self.cfg.max_train_steps + 1):
                step_t0 = time.perf_counter()
                for micro in range(self.cfg.gradient_accumulation_steps):
                    self._micro_batch(step, micro)
                self._end_of_step(step, time.perf_counter() - step_t0)
        except torch.cuda.OutOfMemoryError as err:
            raise DreamLoomError(
                f"Out of GPU memory at step {step}: {err}",
                OUT_OF_MEMORY_HINT,
            ) from None
        return self.finish()

    def set_up(self) -> None:
        """Accelerator, base model, images, class images and the method's trainable parameters."""
        cfg, events = self.cfg, self.events
        self.run_dir.mkdir(parents=True, exist_ok=True)
        precision, precision_why = resolve_mixed_precision(
            cfg.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu"
        )
        self.acc = make_accelerator(precision, cfg.gradient_accumulation_steps, self.run_dir)
        events.enabled = events.enabled and self.acc.is_main_process
        cfg.check_device(self.acc.device.type)
        self.weight_dtype = weight_dtype(self.acc)
        self.cudnn_benchmark = CudnnBenchmark(cfg.cudnn_benchmark, self.acc.device)
        self.settings = {
            "mixed_precision": f"{precision} ({precision_why})",
            "gradient_checkpointing": "",  # decided once the model's family is known
            "tf32": "on" if enable_tf32(self.acc.device) else "off",
            "cudnn_benchmark": f"{'on' if self.cudnn_benchmark.on else 'off'} ({self.cudnn_benchmark.why})",
            # place_modules: SD1.5's and SDXL's VAEs overflow in fp16, so under fp16 it encodes and decodes in fp32
            "vae": "fp32 (the VAE overflows in fp16)" if precision == "fp16" else str(self.weight_dtype).split(".")[-1],
        }
        if self.acc.device.type == "cpu":
            self.settings["malloc"] = cpu_malloc.describe()
        torch.manual_seed(cfg.seed)

        events.emit("progress", phase="loading", step=0, total=cfg.max_train_steps)
        # In the dtype the file stores (fp16 for most checkpoints): place_modules casts the frozen weights to the
        # weight dtype on the device and the trained ones to fp32 there, so no fp32 copy of the model is ever held
        # on the host (SDXL: about 21 GB). The values are the same as loading in fp32 (tests/test_load_dtype.py).
        self.comps = self.comps or load_base_model(cfg.base_model, dtype=stored_dtype(cfg.base_model))
        if cfg.prediction_type != "auto":  # a fine-tune whose file does not say what it predicts
            self.comps.scheduler_config = {**self.comps.scheduler_config, "prediction_type": cfg.prediction_type}
        checkpointing, checkpointing_why = resolve_gradient_checkpointing(
            cfg.gradient_checkpointing, self.acc.device, self._memory_run(precision)
        )
        self.gradient_checkpointing = checkpointing
        self.settings["gradient_checkpointing"] = f"{'on' if checkpointing else 'off'} ({checkpointing_why})"
        self._warn_phases_that_may_not_fit(precision, checkpointing)
        prediction = self.comps.scheduler_config.get("prediction_type", "epsilon")
        self.settings["prediction_type"] = f"{prediction} ({'set' if cfg.prediction_type != 'auto' else 'auto'})"
        self.half_frozen_convs, half_why = resolve_half_frozen_convs(
            cfg.half_frozen_convs, self.acc.device, self.weight_dtype, cfg.torch_compile
        )
        self.settings["half_frozen_convs"] = f"{'on' if self.half_frozen_convs else 'off'} ({half_why})"
        events.log("settings: " + "; ".join(f"{k} {v}" for k, v in self.settings.items()))
        self.concepts = cfg.concept_list()
        self.instance = self.instance or load_concept_images(cfg)
        self.dataset_fingerprint = self.instance.fingerprint()  # of every image given, held-out ones included
        self.instance, self.validation_set = self._validation_images()
        for note in self.instance.warnings + self.validation_set.warnings + cfg.notes():
            events.log(note, level="warning")

        self.method = make_method(cfg)
        self.method.n_images = len(self.instance)
        self.method.concept_of = list(self.instance.concept_of)
        self.entries = epoch_entries(self.instance, self.concepts)  # one epoch: each concept's images x repeats
        if cfg.concepts:
            events.log(describe_concepts(self.instance, self.concepts, self.entries))
        shown = [self.method.instance_prompt(i, c, i) for i, c in enumerate(self.instance.captions[:3])]
        events.log("instance prompts (first images, first epoch): " + " | ".join(repr(p) for p in shown))
        self.use_prior = (
            cfg.with_prior_preservation
            and any(c.prior_loss_weight > 0 for c in self.concepts)
            and self.method.uses_prior_preservation
        )
        self.class_sets = self._class_sets() if self.use_prior else None
        self.class_images = self.class_sets.images if self.use_prior else []
        torch.manual_seed(cfg.seed)  # LoRA init is seeded
        self.method.setup(self.comps)
        if self.gradient_checkpointing:
            enable_checkpointing(self.comps, text_encoder_too=self.method.trains_text_encoder)
        # Modules that train are in train mode: transformers checkpoints a text encoder only in train mode. SD1.5's
        # UNet and CLIP have no dropout, so the numbers are the same as in eval mode.
        for module in self.method.trainable_modules(self.comps).values():
            module.train()

    def _warn_phases_that_may_not_fit(self, precision: str, checkpointing: bool) -> None:
        """On a GPU, say before anything runs which phase is predicted not to fit its free memory (memory.py)."""
        if self.acc.device.type != "cuda" or not self.acc.is_main_process:
            return
        cfg = self.cfg
        # a class folder given (the node's or the CLI's, or each concept's) is used as it is: nothing to make
        given = [self.class_dir] if not cfg.concepts else [c.class_dir for c in cfg.concept_list()]
        free_gib = free_cuda_bytes(self.acc.device) / GIB
        run = self._memory_run(precision)
        for note in phase_warnings(free_gib, run, checkpointing, cfg.sample_every > 0, not all(given)):
            self.events.log(f"GPU memory: {note}", "warning")

    def _class_sets(self) -> ClassSets:
        """Each concept's class images: its class_dir as given, or generated and cached for its class prompt. The
        folder a node or the CLI passes (class_dir) is the single concept's."""
        cfg, sets = self.cfg, ClassSets([], [], [], [], [], [])
        for concept in self.concepts:
            settings = dataclasses.replace(
                cfg,
                class_prompt=concept.class_prompt,
                num_class_images=concept.num_class_images,
                class_dir=concept.class_dir,
            )
            given = self.class_dir if not cfg.concepts else (Path(concept.class_dir) if concept.class_dir else None)
            images, folder = prepare_class_images(
                settings,
                self.comps,
                given,
                self.cache_root,
                self.acc,
                self.weight_dtype,
                self.events,
                self.should_stop,
            )
            if not images:
                raise DreamLoomError(
                    f"No class images for {concept.name!r} in {folder}.",
                    "Put class images in that folder, set num_class_images above 0, or turn off prior preservation.",
                )
            sets.offsets.append(len(sets.images))
            sets.counts.append(len(images))
            sets.images += images
            sets.folders.append(folder)
            sets.prompts.append(concept.class_prompt)
            sets.weights.append(concept.prior_loss_weight)
        return sets

    def _validation_images(self) -> tuple[ImageSet, ImageSet]:
        """(training images, held-out images): validation_images of each concept, plus validation_dir's."""
        cfg = self.cfg
        names = [c.name for c in self.concepts]
        training, held = hold_out(self.instance, cfg.validation_images, cfg.seed, names)
        if cfg.validation_dir:
            extra = load_image_folder(cfg.validation_dir, cfg.resolution, cfg.use_captions)
            notes = [n for n in extra.warnings if "DreamBooth needs at least" not in n]  # one image is fine here
            held = ImageSet(held.images + extra.images, held.captions + extra.captions, held.paths + extra.paths, notes)
        if held.paths:
            names = ", ".join(Path(p).name for p in held.paths)
            self.events.log(f"validation: {len(held)} held-out image(s) ({names}), every {cfg.validation_every} steps")
        return training, held

    def check_disk_space(self) -> None:
        """A full fine-tune's checkpoints hold every trained weight and its optimizer state (SD1.5: about 10 GB
        each): the log says what the run will write, and a disk without room refuses the run before it starts."""
        estimate = self.method.disk_estimate(self.comps)
        if estimate is None or not self.acc.is_main_process:
            return
        folder = checkpoints_dir(self.run_dir)
        present = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
        needed = max(0, estimate["checkpoints"] + estimate["result"] - present)  # a resumed run reuses its room
        free = shutil.disk_usage(self.run_dir).free
        keep = self.cfg.checkpoints_keep
        what = (
            f"{_gb(needed)}: {keep + 1} checkpoint(s) of {_gb(estimate['checkpoint'])} at once (checkpoints_keep "
            f"{keep}, plus the next while it is written) and a result of {_gb(estimate['result'])}"
        )
        self.events.log(f"disk: this run needs about {what}; {_gb(free)} free in {self.run_dir}")
        if free < needed:
            raise DreamLoomError(
                f"Not enough disk space for this run in {self.run_dir}: it needs about {what}, and {_gb(free)} "
                "is free.",
                "Free some space, choose an output folder on a larger disk, or write fewer bytes: checkpoints_keep 1, "
                "use_8bit_adam (CUDA), use_ema off, export_diffusers off, export_precision fp16.",
            )

    def place_on_device(self) -> None:
        """The VAE and text encoders now; the UNet once the caches are built (build_caches)."""
        place_modules(self.comps, self.acc.device, self.weight_dtype, unet=False)

    def build_caches(self) -> None:
        """Latents of the instance and class images, and text embeddings when the text encoder is frozen."""
        cfg, comps, device = self.cfg, self.comps, self.acc.device
        self.noise_scheduler = comps.noise_scheduler()
        self.events.emit("progress", phase="caching latents", step=0, total=cfg.max_train_steps)
        if cfg.cache_latents and not cfg.center_crop:
            self.events.log(
                "random crop is on, so latents are encoded every step (the latent cache needs center crop)", "warning"
            )
        self.layout = BatchLayout(cfg.train_batch_size, self.acc.num_processes, self.acc.process_index, self.use_prior)
        self.buckets = plan_buckets(
            [im.size for im in self.instance.images],
            self.instance.paths,
            cfg.resolution,
            cfg.bucket_pixels,
            cfg.max_aspect,
            self.layout.global_instances,
            enabled=cfg.aspect_buckets,
        )
        if cfg.aspect_buckets:
            self.events.log("aspect-ratio buckets (width x height: images): " + self.buckets.table())
        for note in self.buckets.notes:
            self.events.log(note, "warning")
        self.instance_latents = LatentSource(
            comps.vae,
            self.instance.images,
            cfg.resolution,
            center_crop=cfg.center_crop,
            use_flip=cfg.random_flip,
            cache=cfg.cache_latents and cfg.center_crop,
            device=device,
            seed=cfg.seed,
            bucket_of=self.buckets.bucket_of,
            masks=self.instance.masks if cfg.masked_loss else None,
            unmasked_weight=cfg.unmasked_weight,
        )
        self.class_latents = None
        if self.use_prior:  # at every bucket in use: a batch's class rows take its instance rows' shape
            self.class_latents = LatentSource(
                comps.vae,
                self.class_images,
                cfg.resolution,
                center_crop=True,
                use_flip=cfg.random_flip,
                cache=cfg.cache_latents,
                device=device,
                seed=cfg.seed + 1,
                buckets=self.buckets.buckets,
            )
        self.validation = self._validation_loss()
        cached = self.method.prompts_to_cache(self.instance.captions)
        if cached is not None and self.use_prior:
            cached = cached + sorted(set(self.class_sets.prompts))
        if cached is not None and self.validation is not None:
            cached = sorted(set(cached) | set(self.validation.prompts))
        self.prompt_embeddings = PromptEmbeddings(comps, device, self.weight_dtype, cached)
        self._offload_cached_modules()
        kept = place_trainable_module(comps.unet, device, self.weight_dtype, self.half_frozen_convs)
        if self.half_frozen_convs:
            self.events.log(
                f"half_frozen_convs: {kept / 1e6:.0f} M frozen conv weights kept in the checkpoint's 16-bit dtype "
                f"({kept * 2 / 2**30:.2f} GiB less than fp32)"
                if kept
                else "half_frozen_convs: no frozen conv weight is stored in fp16/bf16 here, so all stay fp32"
            )

    def _validation_loss(self) -> ValidationLoss | None:
        """The held-out images' clean latents (posterior means, unflipped, centred, each at its own bucket) and
        prompts, encoded now while the VAE is on the device."""
        cfg, held = self.cfg, self.validation_set
        if not held.images or self.bench:
            return None
        sizes = [im.size for im in held.images]
        buckets = plan_buckets(
            sizes, held.paths, cfg.resolution, cfg.bucket_pixels, cfg.max_aspect, 1, cfg.aspect_buckets
        )
        source = LatentSource(
            self.comps.vae,
            held.images,
            cfg.resolution,
            center_crop=True,
            use_flip=False,
            cache=True,
            device=self.acc.device,
            seed=cfg.seed,
            bucket_of=buckets.bucket_of,
        )
        prompts = [self.method.validation_prompt(c, held.concept(i)) for i, c in enumerate(held.captions)]
        return ValidationLoss(samples_from(source, prompts), self.noise_scheduler.config.num_train_timesteps, cfg.seed)

    def _validate(self, step: int) -> None:
        """Measure the validation loss after `step` (main process only: every rank holds the same weights)."""
        if not self.acc.is_main_process:
            return
        modules = [self.comps.unet, *self.comps.text_encoders().values()]
        training = [m for m in modules if m.training]
        for module in training:
            module.eval()
        with self.acc.autocast():
            value = self.validation.measure(
                self.comps.unet,
                self.noise_scheduler,
                self.prompt_embeddings,
                self.comps.family,
                self.acc.device,
                self.weight_dtype,
            )
        for module in training:
            module.train()
        self.loss_log.add_validation(step, value)
        self.events.emit("validation", step=step, loss=round(value, 6))

    def _offload_cached_modules(self) -> None:
        """Put away the VAE (all latents cached) and a frozen text encoder (all prompts cached), which the steps
        never read: on a GPU to the CPU (about 0.6 GB of SD1.5 weights in fp16), on a CPU to a file in the run
        folder (about 0.8 GB in fp32; parking.py). Samples bring them back for a moment."""
        self.offloaded = []
        if self.instance_latents.cache and (self.class_latents is None or self.class_latents.cache):
            self.offloaded.append("vae")
        if self.prompt_embeddings.cached:
            self.offloaded.extend(self.comps.text_encoders())
        if self.acc.device.type == "cpu":
            modules = {name: getattr(self.comps, name) for name in self.offloaded}
            # one file per process: the ranks of a CPU (gloo) run share the run folder
            name = f".parked-weights-{self.acc.process_index}.safetensors"
            self.parked = ParkedModules(self.run_dir / name, modules)
        self._put_away()

    def _bring_back(self) -> None:
        """What a sample grid needs back: the VAE, and on a CPU the text encoders. On a GPU a frozen text encoder
        stays on the CPU: generate() takes it to the GPU only to encode the prompts."""
        if self.parked is not None:
            self.parked.restore()
        on_gpu = self.acc.device.type == "cuda"
        for name in self.offloaded:
            if name == "vae" or not on_gpu:
                getattr(self.comps, name).to(self.acc.device)

    def _put_away(self) -> None:
        if self.parked is not None:
            self.parked.park()
            return
        for name in self.offloaded:
            getattr(self.comps, name).to("cpu")
        if self.offloaded and self.acc.device.type == "cuda":
            torch.cuda.empty_cache()

    def build_optimizer(self) -> None:
        """Optimizer and LR schedule over the method's parameters; accelerate wraps the trainable modules.

        The wrapped handles (compiled and/or DDP) are kept in self.wrapped for the forward and backward
        passes only; everything else reads the plain modules in self.comps.
        """
        cfg, method, comps = self.cfg, self.method, self.comps
        self.param_groups = method.param_groups(comps)
        self.n_trainable = sum(p.numel() for g in self.param_groups for p in g["params"])
        optimizer = make_optimizer(cfg, self.param_groups)
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.max_train_steps,
        )
        modules = method.trainable_modules(comps)
        if cfg.torch_compile and "unet" in modules:
            # Compiled once for the training shape; sampling uses the plain module (other batch sizes).
            modules["unet"] = torch.compile(modules["unet"])
        *prepared, self.optimizer = self.acc.prepare(*modules.values(), optimizer)
        self.wrapped = dict(zip(modules, prepared))

    def resume(self) -> int:
        """Restore the newest checkpoint of this run, if any; return the step it was taken at (0 if none)."""
        cfg, comps = self.cfg, self.comps
        self.train_id = train_id_for(cfg, self.dataset_fingerprint, comps.fingerprint)
        self.noise_gen = torch.Generator().manual_seed(cfg.seed)
        self.resumed_from = None
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return 0
        ckpt = load_checkpoint(path)
        if ckpt["meta"].get("train_id") != self.train_id:
            raise DreamLoomError(
                f"{self.run_dir} holds checkpoints of a different run (other settings, images or base model).",
                "Run it with the settings, images and base model it had to resume it, or use a new output folder "
                "(the old one keeps its checkpoints and any result).",
            )
        self.method.load_trainable_state(comps, ckpt["trainable"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["scheduler"])
        self.noise_gen.set_state(ckpt["rng"]["noise"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.acc.scaler is not None and ckpt["rng"].get("scaler"):
            self.acc.scaler.load_state_dict(ckpt["rng"]["scaler"])
        self.resumed_from = ckpt["step"]
        self.loss_log = LossLog.resumed(self.run_dir, self.resumed_from)
        self.events.log(f"resumed from checkpoint at step {self.resumed_from}")
        return self.resumed_from

    def record_job(self) -> None:
        """job.json: the settings, fingerprints and versions of this run (merged into what the parent wrote)."""
        cfg, comps, acc = self.cfg, self.comps, self.acc
        self.job = {
            "config": cfg.to_dict(),
            "dataset_fingerprint": self.dataset_fingerprint,
            "base_fingerprint": comps.fingerprint,
            "base_source": comps.source,
            "instance_images": self.instance.paths,
            "class_dir": str(self.class_sets.folders[0]) if self.use_prior else None,
            "class_dirs": [str(f) for f in self.class_sets.folders] if self.use_prior else [],
            "trainable_parameters": self.n_trainable,
            "settings": self.settings,
            "versions": versions(),
            "train_id": self.train_id,
        }
        if acc.is_main_process:
            job_file = self.run_dir / "job.json"
            existing = read_job_file(job_file)
            atomic_write_text(job_file, json.dumps({**existing, **self.job}, indent=2, default=str))
        prior = f" + {len(self.class_images)} class images" if self.use_prior else ""
        self.events.log(
            f"training {self.method.name} on {len(self.instance)} images{prior}; "
            f"{self.n_trainable:,} trainable parameters; device {acc.device.type}, "
            f"precision {acc.mixed_precision}, processes {acc.num_processes}"
        )

    def _micro_batch(self, step: int, micro: int) -> None:
        """Draw micro-batch k of the data stream, run the UNet once over it, backward, and step the optimizer
        (accelerate makes the optimizer step a no-op until the last micro-batch of the optimizer step)."""
        cfg, layout, device, dtype = self.cfg, self.layout, self.acc.device, self.weight_dtype
        k = (step - 1) * cfg.gradient_accumulation_steps + micro  # global micro-batch index
        with self.phase("data"):
            bucket, picks = layout.instance_batch(cfg.seed, self.entries, self.buckets.bucket_of, k)
            shape = self.instance_latents.latent_shape(bucket)  # every row of the micro-batch: one bucket
            # The randomness of every row of the global micro-batch, drawn in the same order on every process.
            n_rows = layout.rows
            eps = torch.randn((n_rows, *shape), generator=self.noise_gen)
            noise = torch.randn((n_rows, *shape), generator=self.noise_gen)
            if cfg.noise_offset:
                offset = torch.randn((n_rows, shape[0], 1, 1), generator=self.noise_gen)
                noise = noise + cfg.noise_offset * offset
            timesteps = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (n_rows,), generator=self.noise_gen
            )
            positions = layout.positions(k)
            latents = self.instance_latents.latents(
                picks, to_device(eps[layout.own_instance_rows()], device), positions, bucket
            )
            size_ids = self.instance_latents.size_ids(picks, positions, bucket)
            weights = self.instance_latents.weights(picks, positions, bucket)
            prompts = [
                self.method.instance_prompt(i, self.instance.captions[i], pos) for (i, _), pos in zip(picks, positions)
            ]
            if self.use_prior:
                concepts = [self.instance.concept(i) for i, _ in picks]
                class_picks = self.class_sets.picks(cfg.seed, concepts, positions)
                class_latents = self.class_latents.latents(
                    class_picks, to_device(eps[layout.own_class_rows()], device), positions, bucket
                )
                latents = torch.cat([latents, class_latents])
                size_ids = torch.cat([size_ids, self.class_latents.size_ids(class_picks, positions, bucket)])
                prompts += [self.class_sets.prompts[c] for c in concepts]
        own = layout.own_rows()
        text_encoders = {name: self.wrapped[name] for name in self.comps.text_encoders() if name in self.wrapped}
        with self.acc.accumulate(*self.wrapped.values()):
            with self.acc.autocast():
                with self.phase("text_encoder"):
                    embeddings = self.prompt_embeddings(prompts, text_encoders)
                with self.phase("unet_forward"):
                    unet = self.wrapped.get("unet", self.comps.unet)
                    hidden, unet_kwargs = self.comps.family.unet_conditioning(
                        embeddings, to_device(size_ids, device), dtype
                    )
                    losses = diffusion_loss(
                        unet,
                        self.noise_scheduler,
                        latents.to(device, dtype),
                        to_device(noise[own], device),  # fp32: the noisy input is made in fp32
                        to_device(timesteps[own], device),
                        hidden,
                        n_instance=len(picks),
                        prior_weight=self._prior_weight(picks),
                        snr_gamma=cfg.snr_gamma,
                        unet_kwargs=unet_kwargs,
                        instance_weights=None if weights is None else to_device(weights, device),
                    )
            with self.phase("backward"):
                self.acc.backward(losses[0])
            with self.phase("optimizer"):
                if self.acc.sync_gradients and cfg.max_grad_norm > 0:
                    self.acc.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.cudnn_benchmark.after_step(tuple(latents.shape))
        self.loss_log.add(step, *losses)

    def _memory_run(self, precision: str) -> dict | None:
        """This run as memory.predict_memory takes it; None for a built-in model (not modelled)."""
        if self.comps.kind == "tiny":
            return None
        cfg = self.cfg
        return dict(
            method=cfg.method,
            resolution=cfg.resolution,
            batch_size=cfg.train_batch_size,
            train_text_encoder=cfg.train_text_encoder,
            precision=precision,
            prior=cfg.with_prior_preservation,
            family=self.comps.family.name,
            use_8bit_adam=cfg.use_8bit_adam,
            use_ema=cfg.use_ema,
        )

    def _prior_weight(self, picks: list[tuple[int, bool]]):
        """The prior loss weight: one number when every concept has the same, else one per class row (its
        instance row's concept's)."""
        if not self.use_prior or self.class_sets.same_weight():
            return self.class_sets.weights[0] if self.use_prior else self.cfg.prior_loss_weight
        weights = [self.class_sets.weights[self.instance.concept(i)] for i, _ in picks]
        return torch.tensor(weights, device=self.acc.device)

    def _end_of_step(self, step: int, seconds: float) -> None:
        """After an optimizer step: LR schedule, the method's hook, loss read-back, stop, samples, checkpoints."""
        cfg = self.cfg
        self.loss_log.end_step(step, self.lr_scheduler.get_last_lr()[0])
        # fp16's GradScaler skips a step whose gradients overflow: no weight moved, so the schedule and the method's
        # hook (EMA, TI's norm clamp) wait with it
        if not self.optimizer.step_was_skipped:
            self.lr_scheduler.step()
            self.method.after_optimizer_step(self.comps)
        if self.validation is not None and (step % cfg.validation_every == 0 or step == cfg.max_train_steps):
            self._validate(step)
        if self.timer is not None:
            self.timer.step_times.append(seconds)
        if self.acc.device.type != "cuda" or step % 10 == 0 or step == cfg.max_train_steps:
            self._flush(step)  # on CUDA a read-back syncs the device, so only every 10 steps
        if self._stop_requested():
            self._flush(step)
            path = self._checkpoint(step)
            self._write_loss()
            self.events.emit("stopped", step=step, checkpoint=str(path))
            raise StopRequested(step, str(path), announced=True)
        if self.bench or step == cfg.max_train_steps:
            return
        if cfg.sample_every and step % cfg.sample_every == 0:
            self._sample(step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self._checkpoint(step)
            self._write_loss()

    def finish(self) -> TrainResult:
        """Final samples, checkpoint and the method's export into result/; the `done` event."""
        final = self.cfg.max_train_steps
        self._flush(final)
        if self.bench:
            return TrainResult(self.run_dir, final, {}, self.resumed_from, self.loss_log.rows)
        self._sample(final)
        self._checkpoint(final)  # every rank enters its barrier; only the main process writes
        outputs = {}
        if self.acc.is_main_process:
            result_dir = self.run_dir / "result"
            result_dir.mkdir(exist_ok=True)
            outputs = self._export(result_dir, final)
            self._write_loss()
            outputs["loss_plot"] = str(self.run_dir / "loss.png")
            outputs["loss_csv"] = str(self.run_dir / "loss.csv")
            outputs["samples"] = [str(p) for p in sorted((self.run_dir / "samples").glob("step_*.png"))]
            outputs["settings"] = self.settings
        self.acc.wait_for_everyone()
        self.events.emit("done", step=final, outputs=outputs)
        return TrainResult(self.run_dir, final, outputs, self.resumed_from, self.loss_log.rows)

    # -- helpers ------------------------------------------------------------------------------------------
    def _export(self, result_dir: Path, step: int) -> dict:
        """The method's files; a CPU run's parked VAE and text encoder come back first (a full fine-tune writes
        them into its checkpoint file)."""
        if self.parked is not None:
            self.parked.restore()
        return self.method.export(self.comps, result_dir, step)

    def _stop_requested(self) -> bool:
        """The main process decides, so every rank of a distributed run stops at the same step."""
        stop = bool(self.should_stop())
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast

            stop = bool(broadcast(torch.tensor([int(stop)], device=self.acc.device), from_process=0).item())
        return stop

    def _flush(self, step: int) -> None:
        """Read the pending losses back (one host sync) and report progress."""
        last = self.loss_log.flush()
        if last is None:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.cfg.max_train_steps - step)
        self.events.emit(
            "progress",
            phase="training",
            step=step,
            total=self.cfg.max_train_steps,
            loss=round(last["loss"], 6),
            lr=last["lr"],
            eta_s=round(eta, 1),
            steps_per_s=round(done / elapsed, 3) if elapsed > 0 else None,
        )

    def _write_loss(self) -> None:
        if self.acc.is_main_process:
            self.loss_log.write(self.run_dir, title=f"{self.cfg.method} loss ({self.cfg.output_name})")

    def _checkpoint(self, step: int):
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return None
        rng = {"noise": self.noise_gen.get_state(), "torch": torch.get_rng_state()}
        if self.acc.scaler is not None:
            rng["scaler"] = self.acc.scaler.state_dict()
        path = save_checkpoint(
            self.run_dir,
            step,
            self.method.trainable_state(self.comps),
            self.optimizer.state_dict(),
            self.lr_scheduler.state_dict(),
            rng,
            {"train_id": self.train_id},
            self.cfg.checkpoints_keep,
        )
        self.events.emit("checkpoint", step=step, path=str(path))
        return path

    def _sample(self, step: int) -> None:
        """A labelled grid of the sample prompts at a fixed seed; the training RNG is untouched."""
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process and cfg.sample_every > 0:  # 0: no samples at all, not even the first and last
            started = time.perf_counter()
            training = [m for m in (self.comps.unet, *self.comps.text_encoders().values()) if m.training]
            for module in training:
                module.eval()
            self._bring_back()
            pipe = make_pipeline(self.comps, SAMPLE_SAMPLER)
            prompts = self.method.sample_prompts()
            with torch.no_grad(), acc.autocast():
                images = generate(
                    pipe,
                    prompts,
                    [cfg.sample_seed] * len(prompts),
                    cfg.sample_steps,
                    cfg.sample_guidance,
                    cfg.resolution,
                )
            grid = labelled_grid(
                images, prompts, cols=min(4, len(images)), tile=max(128, cfg.resolution), title=f"step {step}"
            )
            path = self.run_dir / "samples" / f"step_{step:05d}.png"
            atomic_save(path, lambda tmp: grid.save(tmp, format="PNG"))
            for module in training:
                module.train()
            self._put_away()
            # a grid costs minutes for SD1.5 on a CPU: the log says how long, so a user can weigh sample_every
            self.events.emit("sample", step=step, path=str(path), seconds=round(time.perf_counter() - started, 1))
        acc.wait_for_everyone()


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def train(cfg: TrainConfig, run_dir: str | Path, **kwargs) -> TrainResult:
    return Trainer(cfg, run_dir, **kwargs).run()
