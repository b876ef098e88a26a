"""DreamBooth as the paper does it: the whole UNet (and optionally the text encoders) fine-tuned with prior
preservation, exported as one checkpoint file (formats/full_checkpoint.py).

Every trained weight stays fp32 (the master weights; place_trainable_module never casts a parameter that trains)
and the steps run under autocast. An optional EMA keeps a moving average of the trained weights, saved in every
checkpoint (resume is exact) and exported instead of the raw weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import DreamLoomError
from ...formats.full_checkpoint import (
    EXPORT_DTYPES,
    export_weights,
    full_checkpoint_metadata,
    write_diffusers_folder,
    write_full_checkpoint,
)
from ...inference.pipelines import make_scheduler
from .base import Method, subject_phrase

# Bytes per trained parameter held in a checkpoint besides its fp32 weight: AdamW's two fp32 moments, or
# bitsandbytes' two 8-bit moments (plus block scales, which the estimate leaves out)
OPTIMIZER_BYTES = {False: 8, True: 2}
EXPORT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


class ParameterEMA:
    """An exponential moving average of named parameters, in fp32 beside them. The decay warms up as diffusers'
    EMAModel's does, min(decay, (1 + n) / (10 + n)) after n updates, so the first steps are not averaged with
    the base model's weights for thousands of steps."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.updates += 1
        weight = 1.0 - self.current_decay()
        for name, p in params.items():
            shadow = self.shadow[name]
            if shadow.device != p.device:  # the shadow follows its parameter onto the device once
                shadow = self.shadow[name] = shadow.to(p.device)
            shadow.lerp_(p.detach().float(), weight)

    def state(self) -> dict[str, torch.Tensor]:
        return {"ema.updates": torch.tensor(self.updates), **{f"ema.{k}": v for k, v in self.shadow.items()}}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        names = {k[len("ema.") :] for k in state if k.startswith("ema.") and k != "ema.updates"}
        if "ema.updates" not in state or names != set(self.shadow):
            raise DreamLoomError(
                "The checkpoint's EMA weights do not fit this run.",
                "Resume with the same use_ema and train_text_encoder settings, or start a new run.",
            )
        self.updates = int(state["ema.updates"])
        self.shadow = {name: state[f"ema.{name}"].float().clone() for name in self.shadow}


class FullFineTuneMethod(Method):
    name = "full"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ema: ParameterEMA | None = None

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.train_text_encoder

    # -- parameters ------------------------------------------------------------------------------------
    def setup(self, comps) -> None:
        for name, module in self.trainable_modules(comps).items():
            module.requires_grad_(True)
            unused = tuple(m + "." for m in comps.family.unused_text_modules(name, module))
            for key, param in module.named_parameters():
                if unused and key.removeprefix("text_model.").startswith(unused):
                    param.requires_grad_(False)  # its output is never used: no gradient would reach it
        if self.cfg.use_ema:
            self.ema = ParameterEMA(self.named_trainables(comps), self.cfg.ema_decay)

    def trainable_modules(self, comps) -> dict:
        texts = comps.text_encoders() if self.cfg.train_text_encoder else {}
        return {"unet": comps.unet, **texts}

    def named_trainables(self, comps) -> dict[str, torch.nn.Parameter]:
        """ "<Components attribute>.<parameter name>" -> every parameter that trains."""
        return {
            f"{name}.{key}": p
            for name, module in self.trainable_modules(comps).items()
            for key, p in module.named_parameters()
            if p.requires_grad
        }

    def param_groups(self, comps) -> list[dict]:
        groups = []
        for name, module in self.trainable_modules(comps).items():
            lr = self.cfg.learning_rate if name == "unet" else self.cfg.text_encoder_lr
            groups.append({"params": [p for p in module.parameters() if p.requires_grad], "lr": lr})
        return groups

    def after_optimizer_step(self, comps) -> None:
        if self.ema is not None:
            self.ema.update(self.named_trainables(comps))

    def trainable_state(self, comps) -> dict:
        state = dict(self.named_trainables(comps))
        if self.ema is not None:
            state.update(self.ema.state())
        return state

    @torch.no_grad()
    def load_trainable_state(self, comps, state: dict) -> None:
        params = self.named_trainables(comps)
        given = {k for k in state if not k.startswith("ema.")}
        if given != set(params):
            raise DreamLoomError(
                f"The checkpoint does not fit this full fine-tune ({len(set(params) - given)} weights missing, "
                f"{len(given - set(params))} unexpected).",
                "Resume with the same base model and train_text_encoder setting, or start a new run.",
            )
        for name, p in params.items():
            p.copy_(state[name])
        if self.ema is not None:
            self.ema.load(state)

    def disk_estimate(self, comps) -> dict[str, int]:
        """Bytes on disk: one checkpoint (fp32 weights, optimizer state, EMA), the checkpoints present at once
        (checkpoints_keep, plus the new one while it is written) and the result file (and folder)."""
        cfg = self.cfg
        trained = sum(p.numel() for m in self.trainable_modules(comps).values() for p in m.parameters())
        total = sum(p.numel() for m in comps.modules().values() for p in m.parameters())
        checkpoint = trained * (4 + OPTIMIZER_BYTES[cfg.use_8bit_adam] + (4 if cfg.use_ema else 0))
        result = total * EXPORT_BYTES[cfg.export_precision] * (2 if cfg.export_diffusers else 1)
        return {"checkpoint": checkpoint, "checkpoints": checkpoint * (cfg.checkpoints_keep + 1), "result": result}

    # -- prompts ---------------------------------------------------------------------------------------
    def default_sample_prompts(self) -> list[str]:
        subject = subject_phrase(self.cfg.instance_prompt)
        return [self.cfg.instance_prompt, f"a dress made of {subject}", f"a watercolor painting of {subject}"]

    # -- result ----------------------------------------------------------------------------------------
    def export_replacements(self) -> dict[str, torch.Tensor]:
        """The weights exported in place of the trained ones: the EMA's, when it is on."""
        return dict(self.ema.shadow) if self.ema is not None else {}

    def export(self, comps, result_dir: Path, step: int) -> dict:
        cfg = self.cfg
        outputs = {}
        with export_weights(comps.modules(), self.export_replacements(), EXPORT_DTYPES[cfg.export_precision]):
            path = result_dir / f"{cfg.output_name}.safetensors"
            outputs["checkpoint"] = str(write_full_checkpoint(path, comps, full_checkpoint_metadata(cfg, step, comps)))
            if cfg.export_diffusers:
                scheduler = make_scheduler("dpmpp_2m", comps.scheduler_config)
                outputs["diffusers"] = str(write_diffusers_folder(result_dir / "diffusers", comps, scheduler))
        return outputs
