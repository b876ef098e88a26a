"""DreamBooth LoRA: low-rank adapters on the UNet's attention projections (and optionally the text encoder)."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from ...errors import DreamLoomError
from ...formats.lora_export import kohya_metadata, save_diffusers, save_kohya
from .base import Method, subject_phrase

TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class LoRAMethod(Method):
    name = "lora"

    def lora_config(self, targets) -> LoraConfig:
        return LoraConfig(
            r=self.cfg.rank,
            lora_alpha=self.cfg.alpha,
            init_lora_weights="gaussian",
            target_modules=list(targets),
            lora_dropout=0.0,
        )

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.train_text_encoder

    def setup(self, comps) -> None:
        comps.unet.add_adapter(self.lora_config(self.cfg.lora_targets))
        if not any("lora_" in n for n, _ in comps.unet.named_parameters()):
            raise DreamLoomError(
                f"No UNet module matches lora_targets {self.cfg.lora_targets}.",
                "Use attention projections such as to_q, to_k, to_v, to_out.0.",
            )
        if self.cfg.train_text_encoder:
            comps.text_encoder.add_adapter(self.lora_config(TEXT_LORA_TARGETS))

    def trainable_modules(self, comps) -> dict:
        modules = {"unet": comps.unet}
        if self.cfg.train_text_encoder:
            modules["text_encoder"] = comps.text_encoder
        return modules

    def param_groups(self, comps) -> list[dict]:
        groups = [{"params": [p for p in comps.unet.parameters() if p.requires_grad], "lr": self.cfg.learning_rate}]
        if self.cfg.train_text_encoder:
            groups.append(
                {
                    "params": [p for p in comps.text_encoder.parameters() if p.requires_grad],
                    "lr": self.cfg.text_encoder_lr,
                }
            )
        return groups

    def lora_state_dicts(self, comps) -> tuple[dict, dict | None]:
        unet = get_peft_model_state_dict(comps.unet)
        text = get_peft_model_state_dict(comps.text_encoder) if self.cfg.train_text_encoder else None
        return unet, text

    def trainable_state(self, comps) -> dict:
        unet, text = self.lora_state_dicts(comps)
        state = {f"unet.{k}": v for k, v in unet.items()}
        state.update({f"text_encoder.{k}": v for k, v in (text or {}).items()})
        return state

    def load_trainable_state(self, comps, state: dict) -> None:
        unet = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(comps.unet, unet)
        if getattr(result, "unexpected_keys", None):
            raise DreamLoomError(
                f"The checkpoint does not fit this LoRA ({len(result.unexpected_keys)} unexpected keys).",
                "Resume with the same rank and targets, or start a new run.",
            )
        if self.cfg.train_text_encoder:
            text = {k[len("text_encoder.") :]: v for k, v in state.items() if k.startswith("text_encoder.")}
            set_peft_model_state_dict(comps.text_encoder, text)

    def default_sample_prompts(self) -> list[str]:
        subject = subject_phrase(self.cfg.instance_prompt)
        return [self.cfg.instance_prompt, f"a dress made of {subject}", f"a watercolor painting of {subject}"]

    def export(self, comps, result_dir: Path, step: int) -> dict:
        unet, text = self.lora_state_dicts(comps)
        meta = kohya_metadata(self.cfg, step, comps)
        kohya = save_kohya(
            result_dir / f"{self.cfg.output_name}.safetensors",
            unet,
            text,
            self.cfg.alpha,
            meta,
            text_prefix=comps.family.text_encoder_kohya_prefix["text_encoder"],
        )
        diffusers = save_diffusers(
            result_dir / "pytorch_lora_weights.safetensors",
            unet,
            text,
            self.lora_config(self.cfg.lora_targets),
            self.lora_config(TEXT_LORA_TARGETS) if text else None,
        )
        return {"lora": str(kohya), "lora_diffusers": str(diffusers)}
