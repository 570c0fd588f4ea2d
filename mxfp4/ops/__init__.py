"""The torch ops of the user API: ``mxfp4::grouped_mm`` and ``mxfp4::grouped_mm_masked`` (:mod:`.grouped_gemm`),
``mxfp4::quantize_activations`` (:mod:`.activations`), and the path a call takes and why (:mod:`.dispatch`).

Importing this package registers those ops with torch (``mxfp4.experts`` registers ``mxfp4::moe``).
"""

from . import activations, grouped_gemm  # noqa: F401  (registers torch.ops.mxfp4.*)
