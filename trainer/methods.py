"""Training methods: what is trained, what a sample prompt looks like, and what is exported.

The loop in train.py is shared; a method object supplies the trainable parameters, the prompts,
post-step hooks and the export.
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig
from .errors import DreamLoomError

TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def subject_phrase(cfg: TrainConfig) -> str:
    """'a sks african fabric pattern' -> 'sks african fabric pattern'."""
    text = cfg.instance_prompt.strip()
    for article in ("a ", "an ", "the "):
        if text.lower().startswith(article):
            return text[len(article):]
    return text


class Method:
    name = "base"
    trains_text_encoder = False  # text embeddings must be recomputed every step

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.n_images = 1

    def setup(self, comps) -> None:
        raise NotImplementedError

    def models_to_prepare(self, comps) -> dict:
        """Modules with trainable parameters, to be wrapped by accelerate (DDP)."""
        raise NotImplementedError

    def param_groups(self, comps) -> list[dict]:
        raise NotImplementedError

    def trainable_state(self, comps) -> dict:
        raise NotImplementedError

    def load_trainable_state(self, comps, state: dict) -> None:
        raise NotImplementedError

    def instance_prompt(self, index: int, caption: str | None, position: int) -> str:
        return caption if (self.cfg.use_captions and caption) else self.cfg.instance_prompt

    def all_instance_prompts(self, captions: list[str | None]) -> list[str]:
        return sorted({self.instance_prompt(i, c, 0) for i, c in enumerate(captions)})

    def after_optimizer_step(self, comps) -> None:
        pass

    def sample_prompts(self) -> list[str]:
        raise NotImplementedError

    def export(self, comps, result_dir: Path, step: int) -> dict:
        raise NotImplementedError


class LoRAMethod(Method):
    name = "lora"

    def lora_config(self, targets):
        from peft import LoraConfig

        return LoraConfig(r=self.cfg.rank, lora_alpha=self.cfg.alpha, init_lora_weights="gaussian", target_modules=list(targets), lora_dropout=0.0)

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.train_text_encoder

    def setup(self, comps) -> None:
        import torch

        comps.unet.add_adapter(self.lora_config(self.cfg.lora_targets))
        matched = [n for n, p in comps.unet.named_parameters() if "lora_" in n]
        if not matched:
            raise DreamLoomError(
                f"No UNet module matches lora_targets {self.cfg.lora_targets}.",
                "Use attention projections such as to_q, to_k, to_v, to_out.0.",
            )
        if self.cfg.train_text_encoder:
            comps.text_encoder.add_adapter(self.lora_config(TEXT_LORA_TARGETS))
        for module in (comps.unet, comps.text_encoder):
            for name, param in module.named_parameters():
                if "lora_" in name:
                    param.data = param.data.to(torch.float32)  # fp32 master weights under fp16/bf16

    def models_to_prepare(self, comps) -> dict:
        models = {"unet": comps.unet}
        if self.cfg.train_text_encoder:
            models["text_encoder"] = comps.text_encoder
        return models

    def param_groups(self, comps) -> list[dict]:
        groups = [{"params": [p for p in comps.unet.parameters() if p.requires_grad], "lr": self.cfg.learning_rate}]
        if self.cfg.train_text_encoder:
            groups.append({"params": [p for p in comps.text_encoder.parameters() if p.requires_grad], "lr": self.cfg.text_encoder_lr})
        return groups

    def lora_state_dicts(self, comps) -> tuple[dict, dict | None]:
        from peft.utils import get_peft_model_state_dict

        unet = get_peft_model_state_dict(_unwrap(comps.unet))
        text = get_peft_model_state_dict(_unwrap(comps.text_encoder)) if self.cfg.train_text_encoder else None
        return unet, text

    def trainable_state(self, comps) -> dict:
        unet, text = self.lora_state_dicts(comps)
        state = {f"unet.{k}": v for k, v in unet.items()}
        state.update({f"text_encoder.{k}": v for k, v in (text or {}).items()})
        return state

    def load_trainable_state(self, comps, state: dict) -> None:
        from peft.utils import set_peft_model_state_dict

        unet = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(_unwrap(comps.unet), unet)
        if getattr(result, "unexpected_keys", None):
            raise DreamLoomError(f"The checkpoint does not fit this LoRA ({len(result.unexpected_keys)} unexpected keys).", "Resume with the same rank and targets, or start a new run.")
        if self.cfg.train_text_encoder:
            text = {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
            set_peft_model_state_dict(_unwrap(comps.text_encoder), text)

    def sample_prompts(self) -> list[str]:
        if self.cfg.sample_prompts:
            prompts = list(self.cfg.sample_prompts)
        else:
            subject = subject_phrase(self.cfg)
            prompts = [self.cfg.instance_prompt, f"a dress made of {subject}", f"a watercolor painting of {subject}"]
        if self.cfg.class_prompt not in prompts:
            prompts.append(self.cfg.class_prompt)  # no token: shows language drift
        return prompts

    def export(self, comps, result_dir: Path, step: int) -> dict:
        from .export import kohya_metadata, save_diffusers, save_kohya

        unet, text = self.lora_state_dicts(comps)
        meta = kohya_metadata(self.cfg, step, comps.fingerprint, comps.source, self.cfg.token)
        kohya = save_kohya(result_dir / f"{self.cfg.output_name}.safetensors", unet, text, self.cfg.alpha, meta)
        diffusers = save_diffusers(
            result_dir / "pytorch_lora_weights.safetensors",
            unet,
            text,
            self.lora_config(self.cfg.lora_targets),
            self.lora_config(TEXT_LORA_TARGETS) if text else None,
        )
        return {"lora": str(kohya), "lora_diffusers": str(diffusers)}


def _unwrap(module):
    """The plain module inside DDP and/or torch.compile wrappers."""
    module = getattr(module, "module", module)
    return getattr(module, "_orig_mod", module)


def make_method(cfg: TrainConfig) -> Method:
    if cfg.method == "lora":
        return LoRAMethod(cfg)
    if cfg.method == "ti":
        from .ti import TextualInversionMethod

        return TextualInversionMethod(cfg)
    raise DreamLoomError(f"Unknown method {cfg.method!r}.", "Use 'lora' or 'ti'.")
