"""DreamLoom trainer: DreamBooth (LoRA and full fine-tune) and Textual Inversion for Stable Diffusion 1.5 and SDXL.

Importing this package loads nothing: ComfyUI imports the pack at start-up, and the nodes reach trainer.errors
through it. TrainConfig and DreamLoomError are loaded on first use. The sub-packages that compute (base_models,
data, training, formats, inference) import torch at the top; see docs/architecture.md.
"""

__version__ = "0.1.0"

__all__ = ["TrainConfig", "DreamLoomError", "__version__", "installed_version"]


def installed_version(dist: str) -> str | None:
    """The installed version of the distribution `dist` from its metadata (nothing is imported), or None."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def __getattr__(name: str):
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name == "DreamLoomError":
        from .errors import DreamLoomError

        return DreamLoomError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
