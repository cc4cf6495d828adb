"""Quantization passes: annotate values with specs, fold smoothing scales, lower to Q/DQ, MatMulNBits or blocked DQ."""
