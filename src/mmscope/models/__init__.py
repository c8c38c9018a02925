"""Model adapters (one per Hugging Face architecture family) and loading."""

from mmscope.models import clip, llava, qwen2_vl  # noqa: F401  (register the adapters)
from mmscope.models.base import VLM, parse_site
from mmscope.models.loading import TOYS, load, supported_classes, toy_path

__all__ = ["VLM", "TOYS", "load", "parse_site", "supported_classes", "toy_path"]
