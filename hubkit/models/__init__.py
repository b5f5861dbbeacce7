"""Models: building timm architectures, loading and mapping weights, BatchNorm folding, device and precision."""
