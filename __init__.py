"""DreamLoom ComfyUI node pack.

ComfyUI imports this file by path. It must stay light: no torch, diffusers or peft here, so
ComfyUI starts fast and a broken GPU stack shows as a node error, not an import failure.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
