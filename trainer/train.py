"""The training loop shared by DreamBooth-LoRA and Textual Inversion."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import TrainConfig
from .errors import DreamLoomError, StopRequested
from .events import Events

DEFAULT_CACHE = Path.home() / ".cache" / "dreamloom"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    outputs: dict
    resumed_from: int | None = None
    losses: list = field(default_factory=list)


# --------------------------------------------------------------------------- loss
def snr_weights(noise_scheduler, timesteps, gamma: float):
    """Min-SNR-gamma loss weights (Hang et al. 2023) for eps or v prediction."""
    import torch

    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(unet, noise_scheduler, latents, noise, timesteps, encoder_hidden_states, n_instance: int,
                   prior_weight: float = 1.0, snr_gamma: float = 0.0):
    """One UNet pass over [instance; class] rows, split after: loss = mse(instance) + w * mse(class).

    Returns (loss, instance_loss, prior_loss or None), all 0-dim tensors.
    """
    import torch.nn.functional as F

    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma > 0:
        per_sample = per_sample * snr_weights(noise_scheduler, timesteps, snr_gamma)
    instance_loss = per_sample[:n_instance].mean()
    if per_sample.shape[0] > n_instance:
        prior_loss = per_sample[n_instance:].mean()
        return instance_loss + prior_weight * prior_loss, instance_loss, prior_loss
    return instance_loss, instance_loss, None


# --------------------------------------------------------------------------- data order
def stream_indices(seed: int, n: int, start: int, count: int) -> list[tuple[int, bool]]:
    """Positions start..start+count of an endless stream of shuffled epochs: (index, flip) pairs.

    A pure function of its arguments, so a resumed run and every rank of a distributed run agree.
    """
    out = []
    for pos in range(start, start + count):
        epoch, within = divmod(pos, n)
        rng = random.Random(f"{seed}:{epoch}")
        order = list(range(n))
        rng.shuffle(order)
        flips = [rng.random() < 0.5 for _ in range(n)]
        out.append((order[within], flips[within]))
    return out


# --------------------------------------------------------------------------- latent / text caches
class LatentSource:
    """Latents for a set of images: cached posterior (mean, std) per image and flip, or encoded on the fly."""

    def __init__(self, vae, images: list, resolution: int, center_crop: bool, use_flip: bool, cache: bool, device, dtype, seed: int):
        self.vae, self.images, self.resolution = vae, images, resolution
        self.center_crop, self.use_flip, self.cache = center_crop, use_flip, cache
        self.device, self.dtype, self.seed = device, dtype, seed
        self.scaling = vae.config.scaling_factor
        self.cached: dict[tuple[int, bool], tuple] = {}
        if cache:
            self._fill_cache()

    def _pixels(self, index: int, flip: bool, position: int):
        import torch

        from .data import crop_resize, pil_to_tensor

        rng = None if self.center_crop else random.Random(f"crop:{self.seed}:{position}")
        im = crop_resize(self.images[index], self.resolution, center=self.center_crop, rng=rng)
        t = pil_to_tensor(im)
        return torch.flip(t, dims=[2]) if flip else t

    def _encode(self, pixels):
        import torch

        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _fill_cache(self, batch: int = 8) -> None:
        import torch

        keys = [(i, f) for i in range(len(self.images)) for f in ((False, True) if self.use_flip else (False,))]
        for start in range(0, len(keys), batch):
            chunk = keys[start : start + batch]
            pixels = torch.stack([self._pixels(i, f, 0) for i, f in chunk])
            mean, std = self._encode(pixels)
            for j, key in enumerate(chunk):
                self.cached[key] = (mean[j], std[j])

    def latents(self, picks: list[tuple[int, bool]], eps, positions: list[int]):
        """Sample latents for (index, flip) picks: (mean + std * eps) * scaling_factor."""
        import torch

        picks = [(i, f and self.use_flip) for i, f in picks]
        if self.cache:
            mean = torch.stack([self.cached[p][0] for p in picks])
            std = torch.stack([self.cached[p][1] for p in picks])
        else:
            pixels = torch.stack([self._pixels(i, f, pos) for (i, f), pos in zip(picks, positions)])
            mean, std = self._encode(pixels)
        return (mean + std * eps.to(mean.device)) * self.scaling


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device):
    import torch

    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


# --------------------------------------------------------------------------- fingerprints
def dataset_fingerprint(paths: list[str], images: list, captions: list) -> str:
    h = hashlib.sha256()
    for im, cap in zip(images, captions):
        h.update(str(im.size).encode())
        h.update(im.tobytes())
        h.update((cap or "").encode())
    return h.hexdigest()[:16]


def run_id_for(cfg: TrainConfig, dataset_fp: str, model_fp: str) -> str:
    blob = json.dumps({"config": cfg.to_dict(), "data": dataset_fp, "model": model_fp}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------- phase timing (bench only)
class PhaseTimer:
    """Wall time per phase of the step; synchronises CUDA around each phase, so enable it only to measure."""

    def __init__(self, device_type: str = "cpu"):
        import collections

        self.device_type = device_type
        self.totals = collections.defaultdict(float)
        self.step_times: list[float] = []

    def _sync(self) -> None:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize()

    def reset(self) -> None:
        self.totals.clear()
        self.step_times.clear()

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - t0


@contextlib.contextmanager
def _no_timer(name: str):
    yield


# --------------------------------------------------------------------------- the loop
class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, events: Events | None = None,
                 should_stop: Callable[[], bool] | None = None, comps=None, instance_set=None,
                 cache_root: str | Path | None = None, class_dir: str | Path | None = None,
                 timer: PhaseTimer | None = None, bench: bool = False):
        self.cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.events = events or Events(self.run_dir)
        self.should_stop = should_stop or (lambda: False)
        self.comps = comps
        self.instance_set = instance_set
        self.cache_root = Path(cache_root) if cache_root else DEFAULT_CACHE
        self.class_dir = Path(class_dir) if class_dir else (Path(cfg.class_dir) if cfg.class_dir else None)
        self.timer = timer  # per-phase timing for `python -m trainer bench`
        self.bench = bench  # bench runs skip samples, checkpoints and export

    # -- setup -------------------------------------------------------------
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration

        # accelerate keeps a process-wide singleton; a second run in the same process (tests, API
        # callers) may use another precision. The distributed part (PartialState) is kept.
        AcceleratorState._reset_state()
        import torch

        # Without cpu=True accelerate never forms a multi-process CPU group (gloo) under torchrun.
        on_cpu = not torch.cuda.is_available() and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
        return Accelerator(
            cpu=on_cpu,
            mixed_precision=self.cfg.mixed_precision,
            gradient_accumulation_steps=self.cfg.gradient_accumulation_steps,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir)),
        )

    def _weight_dtype(self, acc):
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)

    def _optimizer(self, groups, device_type: str):
        import torch

        cfg = self.cfg
        kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        if cfg.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise DreamLoomError(
                    f"use_8bit_adam is on but bitsandbytes cannot be imported ({err}).",
                    "pip install bitsandbytes (CUDA only), or turn use_8bit_adam off.",
                ) from None
            return bnb.optim.AdamW8bit(groups, **kw)
        # The fused kernel (CPU and CUDA) does the whole update in one pass: measured 3x faster than the
        # per-tensor loop on the tiny model's 64 LoRA tensors.
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError):  # older torch or a device without the fused kernel
            return torch.optim.AdamW(groups, foreach=True, **kw)

    def _class_images(self, acc, comps, weight_dtype):
        """Class images: an explicit folder of existing images is used as it is; otherwise the cached set
        for these settings is generated (or completed) first."""
        from .class_images import MANIFEST, ClassImageSpec, class_dir_for, generate_class_images
        from .data import list_image_files, load_image_folder

        cfg = self.cfg
        spec = ClassImageSpec(comps.fingerprint, cfg.class_prompt, cfg.class_negative_prompt, cfg.class_sampler,
                              cfg.class_steps, cfg.class_guidance, cfg.resolution, cfg.seed)
        folder = self.class_dir or class_dir_for(self.cache_root, spec)
        manifest = folder / MANIFEST
        ours = manifest.exists() and json.loads(manifest.read_text()).get("spec") == dataclasses.asdict(spec)
        given = self.class_dir is not None and folder.is_dir() and bool(list_image_files(folder)) and not ours
        if not given and acc.is_main_process:
            generate_class_images(comps, spec, cfg.num_class_images, folder, cfg.class_batch_size, device=acc.device,
                                  events=self.events, should_stop=self.should_stop)
        acc.wait_for_everyone()
        images = load_image_folder(folder, cfg.resolution, use_captions=False)
        n = min(len(images), cfg.num_class_images) if cfg.num_class_images else len(images)
        return images.images[:n], folder

    def run(self) -> TrainResult:
        import torch
        from diffusers.optimization import get_scheduler

        from .checkpoint import latest_checkpoint, load_checkpoint
        from .data import load_image_folder
        from .methods import make_method
        from .models import load_base_model

        cfg, events = self.cfg, self.events
        self.run_dir.mkdir(parents=True, exist_ok=True)
        acc = self._accelerator()
        events.enabled = events.enabled and acc.is_main_process
        cfg.check_device(acc.device.type)
        weight_dtype = self._weight_dtype(acc)
        torch.manual_seed(cfg.seed)

        events.emit("progress", phase="loading", step=0, total=cfg.max_train_steps)
        comps = self.comps or load_base_model(cfg.base_model, dtype=torch.float32)
        instance = self.instance_set or load_image_folder(cfg.instance_dir, cfg.resolution, cfg.use_captions)
        for note in instance.warnings:
            events.log(note, level="warning")
        data_fp = dataset_fingerprint(instance.paths, instance.images, instance.captions)

        class_images, class_folder = [], None
        # TI leaves the model unchanged for prompts without its token, so a prior loss would teach nothing.
        use_prior = cfg.with_prior_preservation and cfg.prior_loss_weight > 0 and cfg.method == "lora"
        if use_prior:
            class_images, class_folder = self._class_images(acc, comps, weight_dtype)

        method = make_method(cfg)
        method.n_images = len(instance)
        torch.manual_seed(cfg.seed)  # LoRA init is seeded
        method.setup(comps)
        if cfg.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
            if method.trains_text_encoder:
                comps.text_encoder.gradient_checkpointing_enable()
        device = acc.device
        # Frozen weights in the training dtype; trainable parameters stay fp32.
        for module in (comps.unet, comps.vae, comps.text_encoder):
            for p in module.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(device, weight_dtype)
                else:
                    p.data = p.data.to(device)
            for b in module.buffers():
                b.data = b.data.to(device)
        comps.vae.to(device, torch.float32 if weight_dtype == torch.float16 else weight_dtype)  # fp16 VAE encode overflows

        if cfg.torch_compile and method.name == "lora":
            # Compiled once for the training shape; sampling uses the plain module (other batch sizes).
            comps.unet = torch.compile(comps.unet)
        noise_scheduler = comps.noise_scheduler()
        res = cfg.resolution
        events.emit("progress", phase="caching latents", step=0, total=cfg.max_train_steps)
        inst_src = LatentSource(comps.vae, instance.images, res, cfg.center_crop, cfg.random_flip, cfg.cache_latents and cfg.center_crop, device, weight_dtype, cfg.seed)
        class_src = LatentSource(comps.vae, class_images, res, True, cfg.random_flip, cfg.cache_latents, device, weight_dtype, cfg.seed + 1) if use_prior else None
        if cfg.cache_latents and not cfg.center_crop:
            events.log("random crop is on, so latents are encoded every step (the latent cache needs center crop)", "warning")

        text_cache = {}
        if not method.trains_text_encoder:
            with torch.no_grad():
                prompts = method.all_instance_prompts(instance.captions) + ([cfg.class_prompt] if use_prior else [])
                for p in prompts:
                    text_cache[p] = encode_prompts(comps.tokenizer, comps.text_encoder, [p], device)[0].to(weight_dtype)

        groups = method.param_groups(comps)
        n_trainable = sum(p.numel() for g in groups for p in g["params"])
        optimizer = self._optimizer(groups, device.type)
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                     num_training_steps=cfg.max_train_steps)
        models = method.models_to_prepare(comps)
        prepared = acc.prepare(*models.values(), optimizer)
        for name, module in zip(models, prepared[:-1]):
            setattr(comps, name, module)
        optimizer = prepared[-1]
        self.acc, self.comps, self.method = acc, comps, method

        model_fp = comps.fingerprint
        job = {"config": cfg.to_dict(), "dataset_fingerprint": data_fp, "base_fingerprint": model_fp,
               "base_source": comps.source, "instance_images": instance.paths, "class_dir": str(class_folder) if class_folder else None,
               "trainable_parameters": n_trainable, "versions": _versions(), "train_id": run_id_for(cfg, data_fp, model_fp)}
        start_step, resumed_from, losses = 0, None, []
        gen = torch.Generator().manual_seed(cfg.seed)
        ckpt_path = latest_checkpoint(self.run_dir)
        if ckpt_path is not None:
            ckpt = load_checkpoint(ckpt_path)
            if ckpt["meta"].get("train_id") != job["train_id"]:
                raise DreamLoomError(
                    f"{self.run_dir} holds checkpoints of a different run (other settings, images or base model).",
                    "Use a new output folder, or delete its checkpoints/ folder to start over.",
                )
            method.load_trainable_state(comps, ckpt["trainable"])
            optimizer.load_state_dict(ckpt["optimizer"])
            lr_scheduler.load_state_dict(ckpt["scheduler"])
            gen.set_state(ckpt["rng"]["noise"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if acc.scaler is not None and ckpt["rng"].get("scaler"):
                acc.scaler.load_state_dict(ckpt["rng"]["scaler"])
            start_step = resumed_from = ckpt["step"]
            from .plots import read_loss_csv

            losses = [r for r in read_loss_csv(self.run_dir / "loss.csv") if r["step"] <= start_step]
            events.log(f"resumed from checkpoint at step {start_step}")
        if acc.is_main_process:
            from .fsutil import atomic_write_text

            job_file = self.run_dir / "job.json"
            existing = json.loads(job_file.read_text()) if job_file.exists() else {}
            atomic_write_text(job_file, json.dumps({**existing, **job}, indent=2, default=str))
        events.log(f"training {method.name} on {len(instance)} images"
                   f"{f' + {len(class_images)} class images' if use_prior else ''}; {n_trainable:,} trainable parameters; "
                   f"device {device.type}, precision {acc.mixed_precision}, processes {acc.num_processes}")
        self.job, self.gen, self.optimizer, self.lr_scheduler, self.losses = job, gen, optimizer, lr_scheduler, losses

        if start_step == 0 and not self.bench:
            self._sample(0)

        world, rank = acc.num_processes, acc.process_index
        B, accum = cfg.train_batch_size, cfg.gradient_accumulation_steps
        GB = B * world
        lat_shape = None
        pending = []  # (step, loss, inst, prior, lr) tensors not yet read back
        t0, step = time.perf_counter(), start_step
        trainable_modules = list(models.values())
        phase = self.timer if self.timer is not None else _no_timer
        try:
            for step in range(start_step + 1, cfg.max_train_steps + 1):
                step_t0 = time.perf_counter()
                for micro in range(accum):
                    k = (step - 1) * accum + micro  # global micro-batch index
                    data_phase = phase("data")
                    data_phase.__enter__()
                    inst_picks = stream_indices(cfg.seed, len(instance), k * GB, GB)
                    positions = list(range(k * GB, (k + 1) * GB))
                    if lat_shape is None:
                        c = comps.vae.config.latent_channels
                        s = res // (2 ** (len(comps.vae.config.block_out_channels) - 1))
                        lat_shape = (c, s, s)
                    # Every rank draws the global batch's randomness and keeps its own slice.
                    n_rows = 2 * GB if use_prior else GB
                    eps_lat = torch.randn((n_rows, *lat_shape), generator=gen)
                    noise = torch.randn((n_rows, *lat_shape), generator=gen)
                    if cfg.noise_offset:
                        noise = noise + cfg.noise_offset * torch.randn((n_rows, lat_shape[0], 1, 1), generator=gen)
                    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n_rows,), generator=gen)
                    mine = slice(rank * B, (rank + 1) * B)
                    rows = list(range(n_rows))
                    my_rows = rows[mine] + ([GB + r for r in rows[mine]] if use_prior else [])
                    my_inst = inst_picks[mine]
                    lat = inst_src.latents(my_inst, eps_lat[rows[mine]], positions[mine])
                    prompts = [method.instance_prompt(i, instance.captions[i], pos) for (i, _), pos in zip(my_inst, positions[mine])]
                    if use_prior:
                        class_picks = stream_indices(cfg.seed + 7919, len(class_images), k * GB, GB)[mine]
                        lat = torch.cat([lat, class_src.latents(class_picks, eps_lat[[GB + r for r in rows[mine]]], positions[mine])])
                        prompts += [cfg.class_prompt] * len(class_picks)
                    data_phase.__exit__(None, None, None)
                    with acc.accumulate(*trainable_modules):
                        with acc.autocast():
                            with phase("text_encoder"):
                                if text_cache:
                                    enc = torch.stack([text_cache[p] for p in prompts])
                                else:
                                    enc = encode_prompts(comps.tokenizer, comps.text_encoder, prompts, device)
                            with phase("unet_forward"):
                                loss, inst_loss, prior_loss = diffusion_loss(
                                    comps.unet, noise_scheduler, lat.to(device, weight_dtype), noise[my_rows].to(device, weight_dtype),
                                    timesteps[my_rows].to(device), enc.to(weight_dtype), len(my_inst), cfg.prior_loss_weight, cfg.snr_gamma)
                        with phase("backward"):
                            acc.backward(loss)
                        with phase("optimizer"):
                            if acc.sync_gradients and cfg.max_grad_norm > 0:
                                acc.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.max_grad_norm)
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                    pending.append((step, micro, loss.detach(), inst_loss.detach(), None if prior_loss is None else prior_loss.detach()))
                lr = lr_scheduler.get_last_lr()[0]
                lr_scheduler.step()
                method.after_optimizer_step(comps)
                if self.timer is not None:
                    self.timer.step_times.append(time.perf_counter() - step_t0)
                if device.type != "cuda" or step % 10 == 0 or step == cfg.max_train_steps:
                    self._flush(pending, lr, step, t0, start_step)
                    pending = []
                if self._stop_requested():
                    self._flush(pending, lr, step, t0, start_step)
                    path = self._checkpoint(step)
                    self._write_loss()
                    events.emit("stopped", step=step, checkpoint=str(path))
                    raise StopRequested(step, str(path))
                if self.bench:
                    continue
                if cfg.sample_every and step % cfg.sample_every == 0 and step != cfg.max_train_steps:
                    self._sample(step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != cfg.max_train_steps:
                    self._checkpoint(step)
                    self._write_loss()
        except torch.cuda.OutOfMemoryError as err:
            raise DreamLoomError(
                f"Out of GPU memory at step {step}: {err}",
                "Turn on gradient_checkpointing and use_8bit_adam, use mixed_precision fp16/bf16, lower the resolution or batch size, or close other GPU programs.",
            ) from None
        self._flush(pending, lr_scheduler.get_last_lr()[0], cfg.max_train_steps, t0, start_step)
        final = cfg.max_train_steps
        if self.bench:
            return TrainResult(self.run_dir, final, {}, resumed_from, self.losses)
        self._sample(final)
        self._checkpoint(final)  # every rank enters its barrier; only the main process writes
        outputs = {}
        if acc.is_main_process:
            result_dir = self.run_dir / "result"
            result_dir.mkdir(exist_ok=True)
            outputs = method.export(comps, result_dir, final)
            self._write_loss()
            outputs["loss_plot"] = str(self.run_dir / "loss.png")
            outputs["loss_csv"] = str(self.run_dir / "loss.csv")
            samples = sorted((self.run_dir / "samples").glob("step_*.png"))
            outputs["samples"] = [str(p) for p in samples]
        acc.wait_for_everyone()
        events.emit("done", step=final, outputs=outputs)
        return TrainResult(self.run_dir, final, outputs, resumed_from, self.losses)

    # -- helpers -----------------------------------------------------------
    def _stop_requested(self) -> bool:
        """The main process decides, so every rank of a distributed run stops at the same step."""
        stop = bool(self.should_stop())
        if self.acc.num_processes > 1:
            import torch
            from accelerate.utils import broadcast

            stop = bool(broadcast(torch.tensor([int(stop)], device=self.acc.device), from_process=0).item())
        return stop

    def _flush(self, pending, lr, step, t0, start_step) -> None:
        """Read losses back to the host (one sync), record them per optimizer step, stop on NaN/inf."""
        import torch

        if not pending:
            return
        by_step: dict[int, list] = {}
        values = torch.stack([torch.stack([l, i, p if p is not None else torch.full_like(l, float("nan"))]) for _, _, l, i, p in pending]).float().cpu()
        for (s, _, _, _, p), row in zip(pending, values.tolist()):
            by_step.setdefault(s, []).append((row, p is not None))
        for s, items in by_step.items():
            loss = sum(r[0] for r, _ in items) / len(items)
            if not math.isfinite(loss):
                raise DreamLoomError(
                    f"The loss became {loss} at step {s}; training stopped so the result is not silently broken.",
                    "Lower learning_rate (e.g. by 10x), set max_grad_norm to 1.0, or use bf16 instead of fp16.",
                )
            row = {"step": s, "loss": loss, "instance_loss": sum(r[1] for r, _ in items) / len(items), "lr": float(lr)}
            if items[0][1]:
                row["prior_loss"] = sum(r[2] for r, _ in items) / len(items)
            self.losses.append(row)
        last = self.losses[-1]
        done = step - start_step
        elapsed = time.perf_counter() - t0
        eta = elapsed / max(done, 1) * (self.cfg.max_train_steps - step)
        self.events.emit("progress", phase="training", step=step, total=self.cfg.max_train_steps, loss=round(last["loss"], 6),
                         lr=last["lr"], eta_s=round(eta, 1), steps_per_s=round(done / elapsed, 3) if elapsed > 0 else None)

    def _write_loss(self) -> None:
        from .plots import plot_loss, write_loss_csv

        if not self.acc.is_main_process:
            return
        write_loss_csv(self.run_dir / "loss.csv", self.losses)
        plot_loss(self.run_dir / "loss.png", self.losses, title=f"{self.cfg.method} loss ({self.cfg.output_name})")

    def _checkpoint(self, step: int):
        from .checkpoint import save_checkpoint

        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return None
        import torch

        rng = {"noise": self.gen.get_state(), "torch": torch.get_rng_state()}
        if self.acc.scaler is not None:
            rng["scaler"] = self.acc.scaler.state_dict()
        path = save_checkpoint(self.run_dir, step, self.method.trainable_state(self.comps), self.optimizer.state_dict(),
                               self.lr_scheduler.state_dict(), rng, {"train_id": self.job["train_id"]}, self.cfg.checkpoints_keep)
        self.events.emit("checkpoint", step=step, path=str(path))
        return path

    def _sample(self, step: int) -> None:
        """A labelled grid of the sample prompts at a fixed seed; training RNG is untouched."""
        import torch

        from .fsutil import atomic_save
        from .sampling import generate, labelled_grid, make_pipeline

        acc = self.acc
        if acc.is_main_process and self.cfg.sample_every >= 0:
            unet = acc.unwrap_model(self.comps.unet, keep_torch_compile=False)
            text_encoder = acc.unwrap_model(self.comps.text_encoder, keep_torch_compile=False)
            was_training = unet.training
            unet.eval()
            text_encoder.eval()
            pipe = make_pipeline(self.comps, "dpmpp_2m", unet=unet, text_encoder=text_encoder)
            prompts = self.method.sample_prompts()
            with torch.no_grad(), acc.autocast():
                images = generate(pipe, prompts, [self.cfg.sample_seed] * len(prompts), self.cfg.sample_steps,
                                  self.cfg.sample_guidance, self.cfg.resolution)
            grid = labelled_grid(images, prompts, cols=min(4, len(images)), tile=max(128, self.cfg.resolution),
                                 title=f"step {step}")
            path = self.run_dir / "samples" / f"step_{step:05d}.png"
            atomic_save(path, lambda tmp: grid.save(tmp, format="PNG"))
            if was_training:
                unet.train()
            self.events.emit("sample", step=step, path=str(path))
        acc.wait_for_everyone()


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "peft", "accelerate", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def train(cfg: TrainConfig, run_dir: str | Path, **kwargs) -> TrainResult:
    return Trainer(cfg, run_dir, **kwargs).run()
