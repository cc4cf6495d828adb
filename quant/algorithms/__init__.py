"""Quantization algorithms on arrays: SmoothQuant and AWQ scales, GPTQ, RTN blocks, sensitivity, grid search."""
