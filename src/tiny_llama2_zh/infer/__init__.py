"""Inference: generation, chat and serving."""
