"""DreamLoom trainer: DreamBooth LoRA and Textual Inversion for Stable Diffusion 1.5.

Importing this package is cheap: it loads only config and errors. The sub-packages that compute
(base_models, data, training, formats, inference) import torch at the top; see docs/architecture.md.
"""

__version__ = "0.1.0"

from .config import TrainConfig
from .errors import DreamLoomError

__all__ = ["TrainConfig", "DreamLoomError", "__version__"]
