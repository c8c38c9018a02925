"""Embedding-level methods: probes, TCAV, SpLiCE, TextSpan, anisotropy and sparse
autoencoders (the survey's embedding level)."""

from mmscope.methods.embedding import (  # noqa: F401  (importing registers them)
    anisotropy,
    probes,
    sae,
    sae_label,
    splice,
    tcav,
    textspan,
)
