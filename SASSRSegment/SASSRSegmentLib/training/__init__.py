"""Layer 6: training a bundle: options, the network and loss of an ablation, the loop, checkpoints."""
