"""Tiny random-weight models of each supported architecture, built offline in milliseconds.

For tests and for trying an adapter without weights: ``tiny_llava()``, ``tiny_clip()``,
``tiny_qwen2_vl()``, ... They share the toy models' word-level tokenizer. ``TINY`` names every
builder (``module:function``); the test suite's ``any_vlm`` fixture and the contract suite run
over all of them, so a new family joins every contract by adding one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmscope.toys.tiny.clip import tiny_clip
from mmscope.toys.tiny.llava import tiny_llava
from mmscope.toys.tiny.qwen2_vl import tiny_qwen2_vl

#: Builder name -> ``module:function`` of the tiny model of each adapter family.
TINY: dict[str, str] = {
    "tiny_llava": "mmscope.toys.tiny.llava:tiny_llava",
    "tiny_clip": "mmscope.toys.tiny.clip:tiny_clip",
    "tiny_qwen2_vl": "mmscope.toys.tiny.qwen2_vl:tiny_qwen2_vl",
    "tiny_siglip": "mmscope.toys.tiny.siglip:tiny_siglip",
    "tiny_paligemma": "mmscope.toys.tiny.paligemma:tiny_paligemma",
    "tiny_gemma3": "mmscope.toys.tiny.gemma3:tiny_gemma3",
    "tiny_qwen2_5_vl": "mmscope.toys.tiny.qwen2_5_vl:tiny_qwen2_5_vl",
    "tiny_qwen3_vl": "mmscope.toys.tiny.qwen3_vl:tiny_qwen3_vl",
    "tiny_qwen3_5": "mmscope.toys.tiny.qwen3_5:tiny_qwen3_5",
    "tiny_gemma4": "mmscope.toys.tiny.gemma4:tiny_gemma4",
    "tiny_mllama": "mmscope.toys.tiny.mllama:tiny_mllama",
    "tiny_llava_next": "mmscope.toys.tiny.llava_next:tiny_llava_next",
    "tiny_llava_onevision": "mmscope.toys.tiny.llava_onevision:tiny_llava_onevision",
    "tiny_idefics3": "mmscope.toys.tiny.idefics3:tiny_idefics3",
    "tiny_internvl": "mmscope.toys.tiny.internvl:tiny_internvl",
}


def build_tiny(name: str, seed: int = 0) -> Any:
    """The tiny model ``name`` (a key of ``TINY``), seeded."""
    module, function = TINY[name].split(":")
    return getattr(importlib.import_module(module), function)(seed=seed)


__all__ = ["TINY", "build_tiny", "tiny_clip", "tiny_llava", "tiny_qwen2_vl"]
