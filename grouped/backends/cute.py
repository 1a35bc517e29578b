"""cute backend: our CuTe DSL grouped GEMM kernels for Hopper (sm_90a).

BF16 runs ``cute_backend/sm90``: one persistent launch per call, the expert
end offsets read on the GPU (graph-safe, no sync), the result written straight
into the caller's buffer at its row stride, rows past the split total never
written. The MXFP8 and NVFP4 kernels grow from it and have not landed yet.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..problem import GemmCall
from .base import Backend

MAX_TOKENS = 2**30  # the kernel's ragged TMA views address rows below 2^30 (grouped_gemm_kernel.py)


class CuteBackend(Backend):
    name = "cute"
    formats = ("bf16", "mxfp8", "nvfp4")
    graph_safe = True

    def unavailable(self, device_type, capability):
        return kernels.unavailable(device_type, capability)

    def format_unavailable(self, fmt):
        if fmt != "bf16":
            return f"the sm90 {fmt.upper()} grouped GEMM kernel has not landed yet (BF16 has)"
        return None

    def refuses(self, problem):
        if not problem.aligned:
            return "TMA needs 16-byte aligned rows, row strides and base addresses (N and K multiples of 8)"
        return None

    def accepts(self, call):
        if call.m_total >= MAX_TOKENS:
            return f"a has {call.m_total} rows; the sm90 kernel takes fewer than {MAX_TOKENS}"
        return None

    def run(self, call: GemmCall) -> torch.Tensor:
        from cute_backend.sm90 import grouped_gemm as sm90

        out = call.output()
        a, b, layout = call.a, call.b, call.layout
        problem = call.problem
        ends = call.end_offsets(torch.int32)
        if out.numel() == 0:
            return out
        if a.shape[0] == 0 or (layout != "wgrad" and a.shape[1] == 0):  # an empty contraction: TMA cannot map it
            if layout == "wgrad":
                if not problem.accumulate:
                    out.zero_()
            elif a.shape[0]:
                out.masked_fill_((torch.arange(call.m_total, device=out.device) < ends[-1]).view(-1, 1), 0)
            return out
        if layout == "wgrad":
            m, n = a.shape[1], b.shape[1]
        else:
            m, n = call.m_total, out.shape[1]
        schedule = sm90.schedule_for(layout, call.m_total, call.num_groups, m, n, a.device)
        config = sm90.config_for(layout, problem.out_dtype, problem.accumulate, *schedule)
        bound = sm90.work_bound(config, call.m_total, call.num_groups, m, n)
        sm90.launch(config, a, b, out, ends, bound)
        return out
