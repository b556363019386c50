"""Writing compressed-tensors checkpoints."""
