"""Inference: diffusers pipelines over loaded components, generation, SLERP and morph rendering."""
