"""cuBLAS backend (BF16, CUDA): one cuBLAS GEMM per expert, into row views of the output.

Each expert's product is written straight into its rows of the caller's
buffer (cuBLAS takes the buffer's row stride as its leading dimension), so
there is no copy. It needs the split sizes on the host: given on the GPU they
cost one sync, and under CUDA graph capture it cannot serve them; host split
sizes are baked into a captured graph.

Spreading the per-expert GEMMs over 4 side streams was measured
(scripts/bench.py, H200, 42 cases of the benchmark): 1.19x slower in geometric
mean and slower in 28-30 of 42 cases, faster in 5-6, so the GEMMs stay on the
caller's stream.
"""

from __future__ import annotations

import torch

from ..problem import GemmCall
from .base import Backend


def _product(problem):
    """The cuBLAS call for the output dtype: f(lhs, rhs, dst) writes (or adds) lhs @ rhs into dst."""
    if problem.accumulate:
        return lambda lhs, rhs, dst: torch.ops.aten.addmm.dtype_out(dst, lhs, rhs, torch.float32, out=dst)
    if problem.out_dtype == torch.float32:
        return lambda lhs, rhs, dst: torch.ops.aten.mm.dtype_out(lhs, rhs, torch.float32, out=dst)
    return lambda lhs, rhs, dst: torch.mm(lhs, rhs, out=dst)


class CublasBackend(Backend):
    name = "cublas"
    formats = ("bf16",)

    def unavailable(self, device_type, capability):
        return None if device_type == "cuda" else "needs a CUDA device"

    def refuses(self, problem):
        if problem.capturing and problem.device_splits:
            return ("not graph-safe with split sizes on the GPU: it reads them on the host "
                    "(graph capture forbids the sync)")
        return None

    def note(self, problem):
        if problem.device_splits:
            return "reads the GPU split sizes on the host (one sync)"
        return None

    def run(self, call: GemmCall) -> torch.Tensor:
        sizes = call.splits.host_sizes(call.m_total)
        out = call.output()
        a, b, product = call.a, call.b, _product(call.problem)
        start = 0
        if call.layout == "wgrad":
            for g, m in enumerate(sizes):
                if m:
                    product(a[start : start + m].T, b[start : start + m], out[g])
                elif not call.problem.accumulate:  # an expert with no tokens has dW = 0
                    out[g].zero_()
                start += m
            return out
        weights = b.transpose(1, 2) if call.layout == "forward" else b
        for g, m in enumerate(sizes):
            if m:
                product(a[start : start + m], weights[g], out[start : start + m])
            start += m
        return out
