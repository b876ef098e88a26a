"""Constructors for ComfyUI widget specs: the `(type, options)` tuples that INPUT_TYPES returns.

Each returns a fresh tuple whose options dict has the keys in the order the nodes have always used:
default, min, max, step, then any extras in the order given, then tooltip last.
"""

from __future__ import annotations


def int_widget(default: int, minimum: int, maximum: int, tooltip: str, **extra) -> tuple:
    """("INT", {default, min, max, *extra, tooltip}); extra e.g. step=8, control_after_generate=True."""
    return ("INT", {"default": default, "min": minimum, "max": maximum, **extra, "tooltip": tooltip})


def float_widget(default: float, minimum: float, maximum: float, step: float, tooltip: str, **extra) -> tuple:
    """("FLOAT", {default, min, max, step, *extra, tooltip}); extra e.g. round=False."""
    return ("FLOAT", {"default": default, "min": minimum, "max": maximum, "step": step, **extra, "tooltip": tooltip})


def bool_widget(default: bool, tooltip: str) -> tuple:
    return ("BOOLEAN", {"default": default, "tooltip": tooltip})


def choice_widget(options, default: str, tooltip: str) -> tuple:
    """A combo box: (list of options, {default, tooltip})."""
    return (list(options), {"default": default, "tooltip": tooltip})


def string_widget(default: str, tooltip: str, multiline: bool = False, **extra) -> tuple:
    """("STRING", {default, [multiline], *extra, tooltip})."""
    options = {"default": default}
    if multiline:
        options["multiline"] = True
    return ("STRING", {**options, **extra, "tooltip": tooltip})
