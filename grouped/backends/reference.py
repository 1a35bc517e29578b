"""Reference backend: dequantize both operands and multiply per expert in fp64.

Serves every format and layout on any device, the CPU included. It is the
numerics every other backend is tested against, not a fast path: it reads the
split sizes on the host (a sync when they live on the GPU) and loops over experts.
"""

from __future__ import annotations

import torch

from ..problem import GemmCall
from ..quantize import QuantizedTensor
from ..tensor import GroupedTensor
from .base import Backend


def _dense(op, *, columnwise: bool, stacked: bool) -> torch.Tensor:
    """An operand's value in fp64, in its logical shape."""
    if isinstance(op, torch.Tensor):
        return op.double()
    if isinstance(op, QuantizedTensor):
        return op.dequantize().double()
    members = [q.dequantize().double() for q in op.split(columnwise=columnwise)]
    return torch.stack(members) if stacked else torch.cat(members)


class ReferenceBackend(Backend):
    name = "reference"
    formats = ("bf16", "mxfp8", "nvfp4")

    def refuses(self, problem):
        if problem.capturing:
            return "not graph-safe: it reads split sizes and builds index tensors on the host"
        return None

    def run(self, call: GemmCall) -> torch.Tensor:
        sizes = call.splits.host_sizes(call.m_total)
        layout = call.layout
        a = _dense(call.a, columnwise=layout == "wgrad", stacked=False)
        b = _dense(call.b, columnwise=layout != "forward", stacked=layout != "wgrad")
        if isinstance(call.a, GroupedTensor):  # members cover only the grouped rows
            a = torch.cat((a, a.new_zeros(call.m_total - a.shape[0], a.shape[1])))
        out = call.output()
        start = 0
        for g, m in enumerate(sizes):
            rows = slice(start, start + m)
            start += m
            if layout == "forward":
                out[rows] = a[rows] @ b[g].T
            elif layout == "dgrad":
                out[rows] = a[rows] @ b[g]
            else:
                product = a[rows].T @ b[rows]
                out[g] = out[g].double() + product if call.problem.accumulate else product
        return out
