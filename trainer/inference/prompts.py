"""Prompt sets shared by the CLI, the demo and the shipped workflows."""

# The tutorial's exercise 1: nine contexts for the learned subject ({s}).
GRID_CONTEXTS = [
    ("dress", "a dress made of {s}"),
    ("wallpaper", "a wallpaper with {s}"),
    ("watercolor", "a watercolor painting of {s}"),
    ("handbag", "a handbag made of {s}"),
    ("vase", "a ceramic vase painted with {s}"),
    ("pillow", "a throw pillow covered in {s}"),
    ("sneakers", "a pair of sneakers with {s}"),
    ("umbrella", "an umbrella printed with {s}"),
    ("book cover", "a book cover featuring {s}"),
]
