"""Tiny real Hugging Face models trained on the world, shipped with the package."""
