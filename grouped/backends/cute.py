"""cute backend: our CuTe DSL grouped GEMM kernels for Hopper (sm_90a).

BF16, MXFP8 and NVFP4 (and bf16 activations with NVFP4 weights) run
``cute_backend/sm90``: one persistent launch per call, the expert end offsets
read on the GPU (graph-safe, no sync), the result written straight into the
caller's buffer at its row stride, rows past the split total never written.
Block-scaled operands are decoded to bf16 inside the kernel (exact;
cute_backend/sm90/block_decode.py) from their stored bytes and compact block
scales; NVFP4's per-tensor scales fold into the epilogue.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..problem import GemmCall
from ..quantize import QuantizedTensor, kernel_facts
from ..tensor import GroupedTensor
from .base import Backend

MAX_TOKENS = 2**30  # the kernel's ragged TMA views address rows below 2^30 (grouped_gemm_kernel.py)


class CuteBackend(Backend):
    name = "cute"
    formats = ("bf16", "mxfp8", "nvfp4")
    graph_safe = True

    def unavailable(self, device_type, capability):
        return kernels.unavailable(device_type, capability)

    def refuses(self, problem):
        if problem.capturing and not problem.device_splits:
            return "under graph capture it needs the split sizes as a CUDA tensor (host sizes would need a copy)"
        if not problem.aligned:
            return "TMA needs 16-byte aligned rows, row strides and base addresses (N and K multiples of 8)"
        if problem.fmt != "bf16" and problem.layout == "wgrad" and problem.grouped_operands:
            return ("wgrad takes dY and X as QuantizedTensors (grouped.quantize(..., axis=0, split_sizes=...)): a "
                    "GroupedTensor keeps each expert's columnwise block in its own matrix")
        return None

    def accepts(self, call):
        if call.m_total >= MAX_TOKENS:
            return f"a has {call.m_total} rows; the sm90 kernel takes fewer than {MAX_TOKENS}"
        if call.fmt.quantized:
            for name, op in (("a", call.a), ("b", call.b)):
                if isinstance(op, torch.Tensor):  # a bf16 activation (weight-only)
                    continue
                reason = _storage_refusal(op, _columnwise(call, name)) or _tma_refusal(_stored(op, call, name)[0])
                if reason:
                    return f"{name}: {reason}"
        return None

    def run(self, call: GemmCall) -> torch.Tensor:
        from cute_backend.sm90 import grouped_gemm as sm90

        out = call.output()
        problem, layout = call.problem, call.layout
        ends = call.splits.end_offsets(torch.int32)
        if out.numel() == 0:
            return out
        if call.m_total == 0 or call.contraction == 0:  # an empty contraction: TMA cannot map it
            if layout == "wgrad":
                if not problem.accumulate:
                    out.zero_()
            elif call.m_total:
                out.masked_fill_((torch.arange(call.m_total, device=out.device) < ends[-1]).view(-1, 1), 0)
            return out
        fmt = kernel_facts(call.fmt) if call.fmt.quantized else None
        if fmt is None:
            a, b, scales = call.a, call.b, ()
        else:
            (a, scale_a), (b, scale_b) = _stored(call.a, call, "a"), _stored(call.b, call, "b")
            scales = (scale_a, scale_b, *_tensor_scales(call))
            if layout == "wgrad" and a.shape[1] == 0:  # every expert empty: no token stored
                return out if problem.accumulate else out.zero_()
        if layout == "wgrad":  # output rows and columns: bf16 (T, M) and (T, N); block-scaled (M, P), (N, P)
            m, n = (a.shape[1], b.shape[1]) if fmt is None else (a.shape[0], b.shape[0])
        else:
            m, n = call.m_total, out.shape[1]
        schedule = sm90.schedule_for(layout, call.m_total, call.num_groups, m, n, call.device)
        config = sm90.config_for(layout, problem.out_dtype, problem.accumulate, *schedule, fmt, problem.weight_only)
        bound = sm90.work_bound(config, call.m_total, call.num_groups, m, n)
        sm90.launch(config, a, b, out, ends, bound, *scales)
        return out


def _columnwise(call: GemmCall, name: str) -> bool:
    """Whether the operand's columnwise storage is the one the call reads (grouped/problem.py)."""
    return call.layout == "wgrad" or (name == "b" and call.layout == "dgrad")


def _storage_refusal(op, columnwise: bool) -> str | None:
    """Why the kernel cannot read a quantized operand's storage as it is (None: it can)."""
    if isinstance(op, QuantizedTensor) and op.layout != "compact":
        return "the kernel reads compact scales; pass q.with_layout('compact')"
    if isinstance(op, GroupedTensor) and op.stacked(columnwise=columnwise) is None:
        return "its members' buffers are not one array (an alignment gap between members)"
    return None


def _tma_refusal(data: torch.Tensor) -> str | None:
    """TMA needs 16-byte aligned base and strides; NVFP4 columnwise storage of an odd number of
    16-token blocks has rows 8 bytes past a multiple of 16."""
    strides = [st for size, st in zip(data.shape[:-1], data.stride()[:-1]) if size > 1]
    if data.data_ptr() % 16 or any(st % 16 for st in strides):
        return (f"TMA needs 16-byte aligned stored rows; its bytes start at {data.data_ptr() % 16} past a multiple of "
                f"16 with row strides {strides} bytes")
    return None


def _stored(op, call: GemmCall, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A block-scaled operand as the kernel reads it: its stored bytes as uint8 and its compact
    scales, contraction dim last (see cute_backend/sm90/grouped_gemm.py); a bf16 activation
    (weight-only) as it is, with no scales."""
    weight = name == "b" and call.layout != "wgrad"
    if isinstance(op, torch.Tensor):
        return op, None
    if isinstance(op, QuantizedTensor):
        return op.data.view(torch.uint8), op.scale.view(torch.uint8)
    data, scale = op.stacked(columnwise=_columnwise(call, name))
    if weight:  # one (rows, contraction) matrix an expert
        return data.view(op.num_members, -1, data.shape[1]), scale.view(op.num_members, -1, scale.shape[1])
    return data, scale


def _tensor_scales(call: GemmCall) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """NVFP4: each operand's per-tensor scales S as (G,) fp32 (a whole-tensor S as a stride-0 view);
    None for an operand that has none."""
    out = []
    for op in (call.a, call.b):
        s = getattr(op, "global_scale", None)
        out.append(None if s is None else s.reshape(-1).expand(call.num_groups) if s.numel() == 1 else s)
    return out[0], out[1]
