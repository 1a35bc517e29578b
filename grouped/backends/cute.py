"""cute backend: our CuTe DSL grouped GEMM kernels for Hopper (sm_90a).

Registered so the selector can name it and say why it cannot serve yet: the
kernels (cute_backend/sm90/) have not landed. See the issues "Hopper grouped
GEMM kernel in CuTe DSL (BF16)" and its MXFP8/NVFP4 successors.
"""

from __future__ import annotations

from .. import kernels
from .base import Backend


class CuteBackend(Backend):
    name = "cute"
    formats = ("bf16", "mxfp8", "nvfp4")
    graph_safe = True

    def unavailable(self, device_type, capability):
        return kernels.unavailable(device_type, capability) or "the sm90 CuTe DSL grouped GEMM kernels have not landed yet"
