"""Layer level: where, across depth, the answer forms (causal tracing, head importance)."""

from mmscope.methods.layer import heads, tracing  # noqa: F401  (importing registers them)
