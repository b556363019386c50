"""Reading models: where a checkpoint is, what its Linears are, which of them fuse."""
