"""Tiny random-weight models of each supported architecture, built offline in milliseconds.

For tests and for trying an adapter without weights: ``tiny_llava()``, ``tiny_clip()``,
``tiny_qwen2_vl()``. They share the toy models' word-level tokenizer.
"""

from mmscope.models.tiny.clip import tiny_clip
from mmscope.models.tiny.llava import tiny_llava
from mmscope.models.tiny.qwen2_vl import tiny_qwen2_vl

__all__ = ["tiny_clip", "tiny_llava", "tiny_qwen2_vl"]
