"""qcompile.quant — quantization maths in pure numpy: no graph, no runtime.

    dtypes       the one table of quantized types (u8/s8/u4/s4/fp8 e4m3), their limits and packing
    spec         what a value's quantization is (QuantSpec, SharedSpec, DerivedSpec) and its
                 resolved parameters (QParams, BlockCodes)
    qparams      scales and zero points from ranges; weight, bias and fake quantization
    observers    streaming range observers (minmax, percentile, entropy, mse)
    statistics   the statistics the one calibration loop feeds (ranges, |X| max, moments, Hessians, rows)
    algorithms/  smoothquant, awq, gptq, rtn, sensitivity, grid search
"""
