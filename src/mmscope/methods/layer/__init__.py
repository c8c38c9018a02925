"""Layer level: where, across depth, the answer forms (causal tracing, head importance)."""
