"""The MXFP4 format: the tensor, quantize/dequantize, the packed layouts, checkpoints (torch only)."""
