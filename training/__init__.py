"""Training layer: the synthetic phantom, datasets, the training loop and evaluation. Builds on ``models``."""
