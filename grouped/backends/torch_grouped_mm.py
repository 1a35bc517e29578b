"""torch backend (BF16): ``torch._grouped_mm``, one launch, graph-safe.

It reads the expert end offsets on the GPU, so it runs under CUDA graph
capture. It cannot write into a caller's buffer: the result is computed into a
temporary and copied in (explain() says so). With split sizes on the host only
the grouped rows are copied; with split sizes on the GPU the copy is a masked
rewrite of all rows, which leaves rows past the split total with the values
they had (rewritten with their own bytes). bf16 output only: fp32 output and
wgrad accumulation go to a backend that has them.
"""

from __future__ import annotations

import torch

from ..problem import GemmCall
from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    formats = ("bf16",)
    graph_safe = True

    def unavailable(self, device_type, capability):
        if device_type != "cuda" or capability is None:
            return "needs a CUDA device"
        if capability < (9, 0):
            return f"torch._grouped_mm needs sm90 or newer, this GPU is sm{capability[0]}{capability[1]}"
        if not hasattr(torch, "_grouped_mm"):
            return f"this torch ({torch.__version__}) has no torch._grouped_mm"
        return None

    def refuses(self, problem):
        if not problem.aligned:
            return "torch._grouped_mm needs 16-byte aligned rows (N and K multiples of 8)"
        if problem.out_dtype != torch.bfloat16 or problem.accumulate:
            return "torch._grouped_mm writes bf16 for bf16 inputs (no fp32 output, no accumulate)"
        if problem.capturing and not problem.device_splits:
            return "under graph capture it needs the split sizes as a CUDA tensor (host sizes would need a copy)"
        return None

    def note(self, problem):
        if problem.caller_buffer:
            return "writes a temporary and copies it into the caller's buffer (not in place)"
        return None

    def run(self, call: GemmCall) -> torch.Tensor:
        a, b, layout = call.a, call.b, call.layout
        offsets = call.splits.end_offsets(torch.int32)
        if layout == "forward":
            result = torch._grouped_mm(a, b.transpose(1, 2), offs=offsets)
        elif layout == "dgrad":
            result = torch._grouped_mm(a, b, offs=offsets)
        else:  # an expert with no tokens gets dW = 0 from the kernel itself (tests/test_gemm_gpu.py)
            result = torch._grouped_mm(a.T, b, offs=offsets)
        if call.out is None:
            return call.finish_new_output(result)
        out = call.out
        if layout == "wgrad":
            out.copy_(result)
        elif call.splits.sizes is not None:
            total = sum(call.splits.sizes)
            out[:total].copy_(result[:total])
        else:
            rows = torch.arange(call.m_total, device=call.device) < offsets[-1]
            out.copy_(torch.where(rows.view(-1, 1), result, out))
        return out
