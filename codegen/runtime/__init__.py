"""Running a kernel: load and launch through the driver API (and ctypes on the hot path), CUDA graphs of our own
kernels, the fused MoE layer's plan with its routing, gather, top-k sum and activation-quantizer kernels."""
