"""DreamBooth LoRA: low-rank adapters on the UNet's attention projections (and optionally the text encoder)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from ...config import LORA_TARGETS
from ...errors import DreamLoomError
from ...formats.lora_export import kohya_metadata, save_diffusers, save_kohya
from ..merged_lora import use_merged_weight_forward
from .base import Method, subject_phrase

TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_fp32_adapter(module: torch.nn.Module, config: LoraConfig) -> None:
    """Add LoRA adapters to a UNet or text encoder with their initial weights exact in fp32, whatever dtype the
    model was loaded in. peft draws an adapter in fp32 and then casts it to its layer's weight dtype, so on a model
    loaded in fp16 it would start from rounded weights: the layers it wraps are made fp32 first (only those, a
    part of the model for a moment), and place_modules casts their frozen weights to the weight dtype later.

    peft injects the adapters itself rather than through the model's add_adapter: transformers >= 5.24 refuses its
    own add_adapter with any peft older than 0.22, a pairing pip installs (and ComfyUI users have)."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import check_target_module_exists

    for name, layer in module.named_modules():
        weight = getattr(layer, "weight", None)
        if weight is not None and weight.dtype != torch.float32 and check_target_module_exists(config, name):
            layer.float()
    inject_adapter_in_model(config, module, adapter_name="default")


def check_targets_exist(unet: torch.nn.Module, targets: list[str]) -> None:
    """Every name in lora_targets must name layers of the UNet (peft's rule: the whole name or its last parts); a
    typo would otherwise train fewer layers without a word, or end in peft's traceback when none matches."""
    names = [name for name, layer in unet.named_modules() if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        # the layers' short names: "to_q", "proj_in", and "to_out.0" or "net.2" for a layer inside a list
        common = sorted(
            {".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in names}
        )
        verb = "names" if len(missing) == 1 else "name"
        raise DreamLoomError(
            f"lora_targets {', '.join(map(repr, missing))} {verb} no layer of the UNet.",
            f"Use the UNet's layer names, e.g. {', '.join(LORA_TARGETS)} (attention; the default), or others it has: "
            f"{', '.join(common[:24])}.",
        )


class LoRAMethod(Method):
    name = "lora"

    def lora_config(self, targets, exclude: list[str] | None = None) -> LoraConfig:
        return LoraConfig(
            r=self.cfg.rank,
            lora_alpha=self.cfg.alpha,
            init_lora_weights="gaussian",
            target_modules=list(targets),
            exclude_modules=exclude or None,
            lora_dropout=0.0,
        )

    def text_lora_config(self, comps, name: str) -> LoraConfig:
        """TEXT_LORA_TARGETS of the text encoder `name`, except in the modules the family never uses."""
        unused = comps.family.unused_text_modules(name, getattr(comps, name))
        return self.lora_config(TEXT_LORA_TARGETS, [f"{m}.self_attn.{t}" for m in unused for t in TEXT_LORA_TARGETS])

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.train_text_encoder

    def setup(self, comps) -> None:
        check_targets_exist(comps.unet, self.cfg.lora_targets)
        add_fp32_adapter(comps.unet, self.lora_config(self.cfg.lora_targets))
        for name, text_encoder in self._text_encoders(comps).items():
            add_fp32_adapter(text_encoder, self.text_lora_config(comps, name))
        for module in self.trainable_modules(comps).values():
            use_merged_weight_forward(module)  # fewer operators per layer on the CPU; PEFT's forward elsewhere

    def _text_encoders(self, comps) -> dict:
        """The text encoders that get adapters: all of the family's (SDXL: both), when train_text_encoder is on."""
        return comps.text_encoders() if self.cfg.train_text_encoder else {}

    def trainable_modules(self, comps) -> dict:
        return {"unet": comps.unet, **self._text_encoders(comps)}

    def param_groups(self, comps) -> list[dict]:
        groups = [{"params": [p for p in comps.unet.parameters() if p.requires_grad], "lr": self.cfg.learning_rate}]
        for text_encoder in self._text_encoders(comps).values():
            groups.append(
                {"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": self.cfg.text_encoder_lr}
            )
        return groups

    def lora_state_dicts(self, comps) -> tuple[dict, dict]:
        """(UNet LoRA, {text encoder attribute: its LoRA}) as PEFT state dicts."""
        texts = {name: get_peft_model_state_dict(te) for name, te in self._text_encoders(comps).items()}
        return get_peft_model_state_dict(comps.unet), texts

    def trainable_state(self, comps) -> dict:
        unet, texts = self.lora_state_dicts(comps)
        state = {f"unet.{k}": v for k, v in unet.items()}
        for name, text in texts.items():
            state.update({f"{name}.{k}": v for k, v in text.items()})
        return state

    def load_trainable_state(self, comps, state: dict) -> None:
        for name, module in {"unet": comps.unet, **self._text_encoders(comps)}.items():
            part = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            result = set_peft_model_state_dict(module, part)
            if getattr(result, "unexpected_keys", None) or not part:
                raise DreamLoomError(
                    f"The checkpoint does not fit this LoRA ({name}: "
                    f"{len(getattr(result, 'unexpected_keys', None) or [])} unexpected keys, {len(part)} given).",
                    "Resume with the same rank, targets and train_text_encoder, or start a new run.",
                )

    def default_sample_prompts(self) -> list[str]:
        if len(self.concepts) > 1:  # each subject as trained, and the two side by side
            subjects = [c.instance_prompt for c in self.concepts]
            both = " and ".join(subject_phrase(p) for p in subjects[:2])
            return [*subjects, f"a picture of {both}"]
        subject = subject_phrase(self.cfg.instance_prompt)
        return [self.cfg.instance_prompt, f"a dress made of {subject}", f"a watercolor painting of {subject}"]

    def export(self, comps, result_dir: Path, step: int) -> dict:
        unet, texts = self.lora_state_dicts(comps)
        meta = kohya_metadata(self.cfg, step, comps)
        kohya = save_kohya(result_dir / f"{self.cfg.output_name}.safetensors", comps, unet, texts, self.cfg.alpha, meta)
        diffusers = save_diffusers(
            result_dir / "pytorch_lora_weights.safetensors",
            comps,
            unet,
            texts,
            self.lora_config(self.cfg.lora_targets),
            {name: self.text_lora_config(comps, name) for name in texts},
        )
        return {"lora": str(kohya), "lora_diffusers": str(diffusers)}
