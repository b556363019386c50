"""prismq: per-Linear mixed-precision quantization selected on measured KL, exported as compressed-tensors."""

__version__ = "0.1.0"
