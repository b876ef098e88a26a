"""DreamLoom trainer: DreamBooth LoRA and Textual Inversion for Stable Diffusion 1.5.

Importing this package is cheap: torch, diffusers and peft are imported only inside functions.
"""

__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402
from .errors import DreamLoomError  # noqa: E402

__all__ = ["TrainConfig", "DreamLoomError", "__version__"]
