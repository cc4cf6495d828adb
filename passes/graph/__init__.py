"""Graph passes: clean-up, constant folding, fusions, shape inference, opset conversion."""
