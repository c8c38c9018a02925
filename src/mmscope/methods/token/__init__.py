"""Token level: what single positions carry (logit lens, visual-token ablation, attention
knockout, visual-token pruning, first-token analysis)."""

from mmscope.methods.token import (  # noqa: F401  (importing registers them)
    ablation,
    first_token,
    knockout,
    lens,
    pruning,
)
