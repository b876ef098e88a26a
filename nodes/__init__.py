"""ComfyUI node classes (V1 API). Only nodes/comfy.py touches ComfyUI, and only inside functions."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
