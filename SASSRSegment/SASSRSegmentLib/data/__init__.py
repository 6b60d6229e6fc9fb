"""Layer 3: datasets, intensity normalisation, preprocessing cache, patch sampling, LR synthesis."""
