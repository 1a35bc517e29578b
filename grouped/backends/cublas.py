"""cuBLAS backend (BF16, CUDA): one cuBLAS GEMM per expert, into row views of the output.

Each expert's product is written straight into its rows of the caller's
buffer (cuBLAS takes the buffer's row stride as its leading dimension), so
there is no copy. It needs the split sizes on the host: given on the GPU they
cost one sync, and under CUDA graph capture it cannot serve them; host split
sizes are baked into a captured graph.

Many small experts leave the GPU idle between launches; ``SIDE_STREAMS`` > 0
spreads the per-expert GEMMs round-robin over that many side streams
(scripts/bench.py measures both settings; the default is what it favoured).
"""

from __future__ import annotations

import torch

from ..problem import GemmCall
from .base import Backend

SIDE_STREAMS = 0
_streams: dict[torch.device, list] = {}


def _side_streams(device: torch.device, count: int) -> list:
    pool = _streams.setdefault(device, [])
    while len(pool) < count:
        pool.append(torch.cuda.Stream(device=device))
    return pool[:count]


class CublasBackend(Backend):
    name = "cublas"
    formats = ("bf16",)

    def unavailable(self, device_type, capability):
        return None if device_type == "cuda" else "needs a CUDA device"

    def refuses(self, problem):
        if problem.capturing and problem.device_splits:
            return "not graph-safe with split sizes on the GPU: it reads them on the host (graph capture forbids the sync)"
        return None

    def note(self, problem):
        if problem.device_splits:
            return "reads the GPU split sizes on the host (one sync)"
        return None

    def run(self, call: GemmCall) -> torch.Tensor:
        sizes = call.host_sizes()
        out = call.output()
        a, b, layout = call.a, call.b, call.layout
        fp32 = call.problem.out_dtype == torch.float32
        streams = _side_streams(call.device, SIDE_STREAMS) if SIDE_STREAMS and len(sizes) > 1 else []
        main = torch.cuda.current_stream(call.device)
        for s in streams:
            s.wait_stream(main)
        start = 0
        for g, m in enumerate(sizes):
            rows = slice(start, start + m)
            start += m
            if layout == "wgrad":
                lhs, rhs, dst = a[rows].T, b[rows], out[g]
            else:
                lhs, rhs, dst = a[rows], (b[g].T if layout == "forward" else b[g]), out[rows]
            if m == 0 and layout != "wgrad":
                continue
            with torch.cuda.stream(streams[g % len(streams)]) if streams else _nullcontext():
                if m == 0:  # an empty expert contributes nothing to dW
                    if not call.problem.accumulate:
                        dst.zero_()
                elif call.problem.accumulate:
                    torch.ops.aten.addmm.dtype_out(dst, lhs, rhs, torch.float32, out=dst)
                elif fp32:
                    torch.ops.aten.mm.dtype_out(lhs, rhs, torch.float32, out=dst)
                else:
                    torch.mm(lhs, rhs, out=dst)
        for s in streams:
            main.wait_stream(s)
        return out


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
