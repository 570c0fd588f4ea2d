"""Building a kernel: tile configs, parameter blocks, rendering, NVRTC, the cubin cache, the toolchain, SASS."""
