"""User-given file names, checked before anything is written: no folders, no reserved names."""

from __future__ import annotations

import os
import re

from ..errors import DreamLoomError

_UNSAFE = re.compile(r"[\x00-\x1f<>:\"/\\|?*]")
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def safe_name(name: str, what: str = "name") -> str:
    """Check a user-given file name (no folders, no reserved names) and return it stripped."""
    stripped = name.strip()
    if not stripped:
        raise DreamLoomError(f"The {what} is empty.", "Give a plain file name such as 'my_fabric'.")
    problem = None
    if "\x00" in stripped:
        problem = "contains a NUL character"
    elif "/" in stripped or "\\" in stripped or os.path.isabs(stripped):
        problem = "contains a folder separator or is an absolute path"
    elif stripped in (".", "..") or stripped.startswith("."):
        problem = "starts with a dot"
    elif _UNSAFE.search(stripped):
        problem = 'contains a reserved character (< > : " / \\ | ? * or a control character)'
    elif stripped.split(".")[0].upper() in _RESERVED:
        problem = "is a reserved device name on Windows"
    elif len(stripped) > 120:
        problem = "is longer than 120 characters"
    if problem:
        raise DreamLoomError(
            f"The {what} {stripped!r} {problem}.",
            "Use letters, digits, spaces, '-', '_' and '.', with no folders; the file goes into the "
            "folder DreamLoom manages.",
        )
    return stripped
