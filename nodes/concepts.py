"""Add Concept: several subjects in one training run (the seed Colab's concepts_list).

Each Add Concept node puts one subject (its images, prompts, class images, repeats, prior weight) on a concept list;
chained, they give the list the DreamBooth training nodes take in place of one set of images.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..trainer.errors import DreamLoomError
from .datasets import TrainingImages
from .widgets import float_widget, int_widget, string_widget

CATEGORY = "DreamLoom/data"


@dataclass(frozen=True)
class ConceptEntry:
    """What one concept adds to a DL_CONCEPTS list."""

    images: TrainingImages
    settings: dict  # TrainConfig concept keys other than instance_dir and class_dir
    class_images: TrainingImages | None = None

    def as_config(self) -> dict:
        """The concept as TrainConfig takes it: folders from the connected datasets."""
        out = {**self.settings, "instance_dir": self.images.folder}
        if self.class_images is not None:
            out.update(class_dir=self.class_images.folder, num_class_images=self.class_images.count)
        return out


class AddConcept:
    DESCRIPTION = (
        "Adds one subject to a concept list: its images, the prompt with its own token, its class prompt and class "
        "images, how often its images are shown (repeats) and the weight of its prior loss. Chain several, then "
        "connect the list to Train DreamBooth LoRA's concepts input (it replaces instance_images)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "add"
    RETURN_TYPES = ("DL_CONCEPTS",)
    RETURN_NAMES = ("concepts",)
    OUTPUT_TOOLTIPS = ("The concept list, for the concepts input of a training node or another Add Concept.",)

    @classmethod
    def INPUT_TYPES(cls):
        from ..trainer.config import TrainConfig  # not at the top: the pack's import stays fast

        d = TrainConfig()
        return {
            "required": {
                "images": ("DL_DATASET", {"tooltip": "This subject's images, from Load Training Images."}),
                "name": string_widget("", "A short name for the log and messages (empty: the folder's name)."),
                "instance_prompt": string_widget(d.instance_prompt, "Prompt for these images; must hold the token."),
                "token": string_widget(d.token, "This subject's rare word; give each concept its own (sks, zwx...)."),
                "class_prompt": string_widget(d.class_prompt, "The same description without the token."),
                "num_class_images": int_widget(
                    100, 1, 10000, "Class images to generate for this concept when class_images is not connected."
                ),
                "repeats": int_widget(
                    1, 1, 1000, "How often each image is shown per epoch: 4 images at 5 repeats weigh as 20 at 1."
                ),
                "prior_loss_weight": float_widget(1.0, 0.0, 10.0, 0.05, "Weight of this concept's class-image loss."),
            },
            "optional": {
                "class_images": ("DL_DATASET", {"tooltip": "This concept's class images (else generated)."}),
                "concepts": ("DL_CONCEPTS", {"tooltip": "The list so far, from another Add Concept."}),
            },
        }

    def add(
        self,
        images,
        name,
        instance_prompt,
        token,
        class_prompt,
        num_class_images,
        repeats,
        prior_loss_weight,
        class_images=None,
        concepts=None,
    ):
        if images is None:
            raise DreamLoomError("Add Concept has no images connected.", "Connect Load Training Images to images.")
        settings = {
            "instance_prompt": instance_prompt,
            "token": token.strip(),
            "class_prompt": class_prompt,
            "num_class_images": int(num_class_images),
            "repeats": int(repeats),
            "prior_loss_weight": float(prior_loss_weight),
        }
        if name.strip():
            settings["name"] = name.strip()
        return (tuple(concepts or ()) + (ConceptEntry(images, settings, class_images),),)
