"""Embedding-level methods: probes, TCAV, SpLiCE, TextSpan, anisotropy and sparse
autoencoders (the survey's embedding level)."""
