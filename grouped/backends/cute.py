"""cute backend: our CuTe DSL grouped GEMM kernels for Hopper (sm_90a).

Registered so the selector can name it and say why it cannot serve yet: the
kernels (cute_backend/sm90/) have not landed. See the issues "Hopper grouped
GEMM kernel in CuTe DSL (BF16)" and its MXFP8/NVFP4 successors.
"""

from __future__ import annotations

import importlib.util

from .base import Backend


class CuteBackend(Backend):
    name = "cute"
    formats = ("bf16", "mxfp8", "nvfp4")
    graph_safe = True

    def unavailable(self, device_type, capability):
        if device_type != "cuda" or capability is None or capability[0] != 9:
            return "needs a Hopper GPU (sm90)"
        if importlib.util.find_spec("cutlass") is None:
            return "nvidia-cutlass-dsl is not installed"
        return "the sm90 CuTe DSL grouped GEMM kernels have not landed yet"
