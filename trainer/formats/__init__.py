"""File formats: LoRA export and import (kohya, diffusers, PEFT), Textual Inversion embeddings."""
