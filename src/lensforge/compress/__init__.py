"""Compression: structured pruning, distillation and quantization of runs and bundles."""
