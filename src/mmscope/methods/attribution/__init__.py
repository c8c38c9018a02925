"""Attribution methods: which image regions and prompt words produced an output."""

from mmscope.methods.attribution import (  # noqa: F401  (importing registers the methods)
    attention,
    cam,
    gradient,
    interactions,
    perturbation,
    surrogate,
)
from mmscope.methods.attribution.base import Attribution, Maps

__all__ = ["Attribution", "Maps"]
