"""Layer 4: the network, its losses, and model bundles (weights + card)."""
