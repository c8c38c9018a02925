"""Token level: what single positions carry (logit lens, visual-token ablation, attention
knockout, visual-token pruning, first-token analysis)."""

from mmscope.methods.token import ablation, lens  # noqa: F401  (importing registers them)
