"""Layer 7: scoring a bundle on a dataset (LR inputs made in named ways), metrics, reports."""
