"""Model adapters (one per Hugging Face architecture family) and loading."""

import importlib

from mmscope.models.base import VLM, parse_site
from mmscope.models.loading import TOYS, load, supported_classes, toy_path

#: The adapter modules; importing one registers its adapter under its HF classes.
ADAPTERS = (
    "llava",
    "clip",
    "qwen2_vl",
    "siglip",
    "paligemma",
    "gemma3",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_5",
    "gemma4",
    "mllama",
    "llava_next",
    "llava_onevision",
    "idefics3",
    "internvl",
)
for _module in ADAPTERS:
    importlib.import_module(f"mmscope.models.{_module}")

__all__ = ["ADAPTERS", "VLM", "TOYS", "load", "parse_site", "supported_classes", "toy_path"]
