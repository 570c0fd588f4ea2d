"""The gpt-oss expert layer ``mxfp4.moe``: the op, its fused SM90 paths and their CUDA-graph replay."""
