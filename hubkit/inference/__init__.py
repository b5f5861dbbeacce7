"""Inference: ``Module`` (an installed model) and the one batched prediction loop."""
