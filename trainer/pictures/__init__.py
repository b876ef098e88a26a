"""Pictures: labelled grids, loss plots, animation files (GIF, WebP, MP4)."""
