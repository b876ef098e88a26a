"""Several subjects in one run (the seed Colab's concepts_list, kohya's subsets): the images of every concept as one
set, the epoch's entries with each concept's repeats, and each instance row's class rows from its own concept.

A run without `concepts` is the one concept of the top-level settings, so every run takes this path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Concept, TrainConfig
from ..errors import DreamLoomError
from .batches import CLASS_STREAM_SEED_OFFSET, stream_indices
from .images import ImageSet, load_image_folder


def load_concept_images(cfg: TrainConfig) -> ImageSet:
    """Every concept's images, concept by concept, each image tagged with its concept's index."""

    def load(folder):
        return load_image_folder(folder, cfg.resolution, cfg.use_captions, cfg.masked_loss, cfg.mask_from_alpha)

    if not cfg.concepts:
        return load(cfg.instance_dir)
    images, captions, paths, notes, concept_of, masks = [], [], [], [], [], []
    for index, concept in enumerate(cfg.concept_list()):
        try:
            part = load(concept.instance_dir)
        except DreamLoomError as err:
            raise DreamLoomError(f"Concept {concept.name!r}: {err.message}", err.hint) from None
        images += part.images
        captions += part.captions
        paths += part.paths
        notes += [f"concept {concept.name!r}: {note}" for note in part.warnings]
        concept_of += [index] * len(part)
        masks += part.masks if part.masks is not None else [None] * len(part)
    return ImageSet(images, captions, paths, notes, concept_of, masks if cfg.masked_loss else None)


def epoch_entries(images: ImageSet, concepts: list[Concept]) -> list[int]:
    """The image indices one epoch shows: each image as often as its concept's `repeats` (kohya's num_repeats), so
    a concept of 5 images at repeats 4 weighs as much as one of 20 at repeats 1."""
    return [i for i in range(len(images)) for _ in range(concepts[images.concept(i)].repeats)]


def describe_concepts(images: ImageSet, concepts: list[Concept], entries: list[int]) -> str:
    """One log line: each concept's images, repeats and share of the epoch."""
    parts = []
    for index, concept in enumerate(concepts):
        count = sum(1 for i in range(len(images)) if images.concept(i) == index)
        shown = sum(1 for i in entries if images.concept(i) == index)
        parts.append(
            f"{concept.name!r}: {count} images x {concept.repeats} = {shown / max(len(entries), 1):.0%} of an epoch, "
            f"prompt {concept.instance_prompt!r}, class {concept.class_prompt!r}"
        )
    return "concepts: " + "; ".join(parts)


@dataclass
class ClassSets:
    """Every concept's class images as one list (concept by concept) and where each concept's part starts."""

    images: list  # PIL images
    offsets: list[int]
    counts: list[int]
    folders: list[Path | None]
    prompts: list[str]
    weights: list[float]

    def picks(self, seed: int, instance_concepts: list[int], positions: list[int]) -> list[tuple[int, bool]]:
        """(class image index, flip) for the class row of each instance row: drawn from the row's own concept's class
        images, by a stream per concept that is a pure function of (seed, concept, position). Concept 0's stream
        is the one a single-concept run has always drawn."""
        out = []
        for concept, position in zip(instance_concepts, positions):
            stream_seed = seed + CLASS_STREAM_SEED_OFFSET * (concept + 1)
            ((index, flip),) = stream_indices(stream_seed, self.counts[concept], position, 1)
            out.append((self.offsets[concept] + index, flip))
        return out

    def same_weight(self) -> bool:
        return len(set(self.weights)) <= 1
