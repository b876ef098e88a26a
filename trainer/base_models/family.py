"""The model-family extension point.

A family is one module in this package (sd15.py today; SDXL is one more) holding one ModelFamily instance,
registered in load.py's FAMILIES. It says how to recognise the family's checkpoints, load them offline,
turn prompts into the UNet's conditioning, and name modules for kohya export. Everything above this
package (training, methods, formats, inference) asks the family of the loaded Components, never the
checkpoint layout itself.
"""

from __future__ import annotations

from pathlib import Path


class ModelFamily:
    name = "base"  # as users read it, e.g. "SD1.5"
    kohya_base_version = ""  # kohya's ss_base_model_version
    modelspec_architecture = ""  # modelspec.architecture prefix, e.g. "stable-diffusion-v1"
    text_encoder_kohya_prefix = {"text_encoder": "lora_te_"}  # Components attribute -> kohya key prefix

    def recognises(self, family_name: str) -> bool:
        """True for the name detect.detect_family gives this family's single-file checkpoints."""
        return family_name == self.name

    def load_single_file(self, path: Path, header: dict, dtype):
        raise NotImplementedError

    def load_folder(self, path: Path, dtype):
        raise NotImplementedError

    def tokenize(self, tokenizer, prompts: list[str]):
        raise NotImplementedError

    def encode_prompts(self, comps, prompts: list[str], device, text_encoder=None):
        """The UNet's encoder_hidden_states for `prompts` (one row per prompt); `text_encoder` overrides
        comps.text_encoder with a wrapped (DDP) handle of it during training."""
        raise NotImplementedError

    def unet_conditioning(self, comps, batch_size: int, device, dtype) -> dict:
        """Extra keyword arguments of the UNet call (SDXL's added_cond_kwargs); none for SD1.5."""
        return {}

    def pipeline(self, comps, scheduler, unet=None, text_encoder=None):
        raise NotImplementedError
