"""Files: atomic writes and publishing, safe names, safetensors headers and fingerprints. No torch."""
