"""cudnn backend: cuDNN frontend's CuTe DSL grouped GEMM wrappers on Blackwell (sm100).

Registered so the selector can name it and say why it cannot serve yet: the
adapter has not landed (issue "Blackwell path: MXFP8 and NVFP4 through cuDNN
frontend's CuTe DSL grouped GEMMs"). It has never run on hardware here.
"""

from __future__ import annotations

import importlib.util

from .base import Backend


class CudnnBackend(Backend):
    name = "cudnn"
    formats = ("mxfp8", "nvfp4")
    graph_safe = True

    def unavailable(self, device_type, capability):
        if device_type != "cuda" or capability is None or capability[0] != 10:
            return "needs a Blackwell GPU (compute capability 10.x)"
        if importlib.util.find_spec("cudnn") is None:
            return "nvidia-cudnn-frontend is not installed (pip install 'grouped-gemm[blackwell]')"
        return "the cuDNN frontend adapter has not landed yet"
