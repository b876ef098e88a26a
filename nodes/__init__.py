"""ComfyUI node classes (V1 API). Only nodes/comfy.py touches ComfyUI, and only inside functions."""

from .checkpoint import EmptyLatent, LoadCheckpoint
from .concepts import AddConcept
from .datasets import GenerateClassImages, LoadTrainingImages
from .grid import ImageGrid, PromptBatch
from .loader import LoadDreamLoomLoRA
from .lora_tools import ExtractLoRA, MergeLoRA, ResizeLoRA
from .morph import RenderMorph, SaveAnimation, SlerpConditioning, SlerpNoise
from .settings import TrainingSettings
from .training import TrainDreamBoothFull, TrainDreamBoothLoRA, TrainTextualInversion

NODE_CLASS_MAPPINGS = {
    "DreamLoomLoadCheckpoint": LoadCheckpoint,
    "DreamLoomEmptyLatent": EmptyLatent,
    "DreamLoomLoadTrainingImages": LoadTrainingImages,
    "DreamLoomGenerateClassImages": GenerateClassImages,
    "DreamLoomAddConcept": AddConcept,
    "DreamLoomTrainingSettings": TrainingSettings,
    "DreamLoomTrainLoRA": TrainDreamBoothLoRA,
    "DreamLoomTrainTextualInversion": TrainTextualInversion,
    "DreamLoomTrainFull": TrainDreamBoothFull,
    "DreamLoomLoadLoRA": LoadDreamLoomLoRA,
    "DreamLoomExtractLoRA": ExtractLoRA,
    "DreamLoomMergeLoRA": MergeLoRA,
    "DreamLoomResizeLoRA": ResizeLoRA,
    "DreamLoomSlerpNoise": SlerpNoise,
    "DreamLoomSlerpConditioning": SlerpConditioning,
    "DreamLoomRenderMorph": RenderMorph,
    "DreamLoomSaveAnimation": SaveAnimation,
    "DreamLoomPromptBatch": PromptBatch,
    "DreamLoomImageGrid": ImageGrid,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamLoomLoadCheckpoint": "Load Checkpoint (DreamLoom)",
    "DreamLoomEmptyLatent": "Empty Latent (DreamLoom)",
    "DreamLoomLoadTrainingImages": "Load Training Images (DreamLoom)",
    "DreamLoomGenerateClassImages": "Generate Class Images (DreamLoom)",
    "DreamLoomAddConcept": "Add Concept (DreamLoom)",
    "DreamLoomTrainingSettings": "Training Settings (DreamLoom)",
    "DreamLoomTrainLoRA": "Train DreamBooth LoRA (DreamLoom)",
    "DreamLoomTrainTextualInversion": "Train Textual Inversion (DreamLoom)",
    "DreamLoomTrainFull": "Train DreamBooth (full fine-tune) (DreamLoom)",
    "DreamLoomLoadLoRA": "Load DreamLoom LoRA",
    "DreamLoomExtractLoRA": "Extract LoRA (DreamLoom)",
    "DreamLoomMergeLoRA": "Merge LoRA into Checkpoint (DreamLoom)",
    "DreamLoomResizeLoRA": "Resize LoRA (DreamLoom)",
    "DreamLoomSlerpNoise": "SLERP Noise (DreamLoom)",
    "DreamLoomSlerpConditioning": "SLERP Conditioning (DreamLoom)",
    "DreamLoomRenderMorph": "Render Morph (DreamLoom)",
    "DreamLoomSaveAnimation": "Save Animation (DreamLoom)",
    "DreamLoomPromptBatch": "Prompt Batch (DreamLoom)",
    "DreamLoomImageGrid": "Image Grid (DreamLoom)",
}
