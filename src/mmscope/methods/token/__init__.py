"""Token level: what single positions carry (logit lens, visual-token ablation, attention
knockout, visual-token pruning, first-token analysis)."""
