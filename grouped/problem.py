"""A grouped GEMM call, checked: operands, split sizes, output buffer, problem kind.

The three GEMMs of a grouped linear layer (G experts, rows of the token-major
operand grouped by expert, sizes m_0..m_{G-1} summing to at most M):

=========  ============  ==================  ==============  ================
layout     a             b                   output          contraction
=========  ============  ==================  ==============  ================
forward    X  (M, K)     W  (G, N, K)        Y  (M, N)       K
dgrad      dY (M, N)     W  (G, N, K)        dX (M, K)       N
wgrad      dY (M, N)     X  (M, K)           dW (G, N, K)    tokens (ragged)
=========  ============  ==================  ==============  ================

Operands are bf16 tensors, or MXFP8/NVFP4 operands quantized along the
contraction dim: a ``QuantizedTensor`` from ``grouped.quantize`` (forward: a
rowwise, W axis -1; dgrad: a rowwise, W axis 1; wgrad: both axis 0 with the
call's split sizes) or a ``GroupedTensor`` with the matching storage (rowwise
for forward, columnwise for dgrad's W and for wgrad). Everything is checked
here, before any kernel runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from . import buffers
from .formats import BF16, NVFP4, Format
from .quantize import QuantizedTensor
from .splits import Splits
from .tensor import GroupedTensor

LAYOUTS = ("forward", "dgrad", "wgrad")
WEIGHT_ONLY = (BF16, NVFP4)  # the one mixed pairing (forward): serving with 4-bit weights
OUT_DTYPES = (torch.bfloat16, torch.float32)
# The storage direction each operand must have, per layout: (a, b); True = columnwise.
_COLUMNWISE = {"forward": (False, False), "dgrad": (False, True), "wgrad": (True, True)}


@dataclass(frozen=True)
class Problem:
    """The kind of a call: everything backend choice depends on (hashable, cached)."""

    fmt: str
    layout: str
    device_type: str
    capability: tuple[int, int] | None
    out_dtype: torch.dtype
    accumulate: bool
    device_splits: bool  # split sizes (or offsets) given as a CUDA tensor
    capturing: bool  # inside CUDA graph capture
    caller_buffer: bool
    aligned: bool  # every operand and output row 16-byte aligned, base addresses too
    grouped_operands: bool  # an operand is a GroupedTensor (per-member buffers)
    large_experts: bool = False  # host split sizes of a few large experts (selector.few_large_experts)
    weight_only: bool = False  # a bf16 activation with a block-scaled weight (fmt is the weight's)

    def describe(self) -> str:
        arch = f"sm{self.capability[0]}{self.capability[1]}" if self.capability else self.device_type
        fmt = f"bf16 x {self.fmt} weight" if self.weight_only else self.fmt
        parts = [fmt, self.layout, arch, f"out {str(self.out_dtype).removeprefix('torch.')}"]
        if self.accumulate:
            parts.append("accumulate")
        parts.append("GPU split sizes" if self.device_splits else "host split sizes")
        if self.large_experts:
            parts.append("a few large experts")
        if self.capturing:
            parts.append("graph capture")
        if self.caller_buffer:
            parts.append("caller buffer")
        return ", ".join(parts)


@dataclass
class GemmCall:
    """A checked call; backends read their inputs from here."""

    problem: Problem
    fmt: Format
    a: Any
    b: Any
    m_total: int
    num_groups: int
    out_shape: tuple[int, ...]
    contraction: int  # the length of the contracted dim: K (forward), N (dgrad), tokens (wgrad)
    device: torch.device
    out: torch.Tensor | None
    splits: Splits

    @property
    def layout(self) -> str:
        return self.problem.layout

    def output(self) -> torch.Tensor:
        """The caller's buffer, or a new one (see ``finish_new_output`` for rows past the total)."""
        if self.out is not None:
            return self.out
        return self.finish_new_output(torch.empty(self.out_shape, dtype=self.problem.out_dtype, device=self.device))

    def finish_new_output(self, t: torch.Tensor) -> torch.Tensor:
        """Rows past the split total of a library-allocated (M, .) output: zeroed when the
        split sizes are on the host (a slice); left unspecified when they are on the GPU,
        where finding them would cost a pass over the output (pass ``out=`` to control them)."""
        if self.layout != "wgrad" and self.splits.sizes is not None:
            t[sum(self.splits.sizes) :].zero_()
        return t


def operand_tensors(op) -> list[torch.Tensor]:
    """Every tensor an operand owns (a bf16 tensor; a quantized operand's storage)."""
    if isinstance(op, torch.Tensor):
        return [op]
    names = ("data", "scale", "global_scale", "columnwise_data", "columnwise_scale")
    return [t for t in (getattr(op, n, None) for n in names) if isinstance(t, torch.Tensor)]


def _operand(op, name: str, role_columnwise: bool, layout: str):
    """(format, logical shape, device) of an operand, checked for its role."""
    if isinstance(op, torch.Tensor):
        if op.dtype != torch.bfloat16:
            raise ValueError(
                f"{name} must be a bf16 tensor or a quantized operand (grouped.quantize / GroupedTensor), "
                f"got a {op.dtype} tensor"
            )
        return BF16, tuple(op.shape), op.device
    if isinstance(op, QuantizedTensor):
        want = "axis 0 (columnwise) with split_sizes" if role_columnwise else "rowwise (axis -1)"
        if name == "b" and layout == "dgrad":
            want = "axis 1 (blocks along N)"
        if op.columnwise != role_columnwise:
            raise ValueError(
                f"{name} must be quantized along the {layout} contraction dim: {want}; got axis {op.axis}"
            )
        return op.fmt, tuple(op.shape), op.device
    if isinstance(op, GroupedTensor):
        if not op.fmt.quantized:
            raise ValueError(f"{name}: a bf16 operand must be a plain tensor, not a GroupedTensor")
        if not (op.columnwise if role_columnwise else op.rowwise):
            direction = "columnwise" if role_columnwise else "rowwise"
            raise ValueError(f"{name} must have {direction} storage for {layout} (the contraction dim)")
        rows = {s[0] for s in op.shapes}
        k = op.shapes[0][1]
        if name == "b" and layout != "wgrad":
            if len(rows) != 1:
                raise ValueError(f"b: every expert's weight must have the same shape, got {op.shapes}")
            shape = (op.num_members, rows.pop(), k)
        else:
            shape = (sum(s[0] for s in op.shapes), k)
        return op.fmt, shape, op.device
    raise ValueError(
        f"{name} must be a bf16 torch.Tensor, a QuantizedTensor or a GroupedTensor, got {type(op).__name__}"
    )


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def prepare(a, b, split_sizes, *, offsets, layout, out, accumulate, out_dtype) -> GemmCall:
    """Check a grouped GEMM call (see the module doc); raise ValueError on bad input."""
    from . import selector  # the problem class is selection policy (selector imports this module)

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    col_a, col_b = _COLUMNWISE[layout]
    fmt_a, shape_a, dev_a = _operand(a, "a", col_a, layout)
    fmt_b, shape_b, dev_b = _operand(b, "b", col_b, layout)
    weight_only = (fmt_a, fmt_b) == WEIGHT_ONLY and layout == "forward"
    if fmt_a != fmt_b and not weight_only:
        raise ValueError(f"a and b must have the same format (or, forward, a bf16 activation with an "
                         f"{WEIGHT_ONLY[1].name} weight), got {fmt_a.name} and {fmt_b.name}")
    if dev_a != dev_b:
        raise ValueError(f"a and b must be on the same device, got {dev_a} and {dev_b}")
    device = dev_a

    if len(shape_a) != 2:
        raise ValueError(f"a must be 2-D (tokens, features), got shape {shape_a}")
    m_total = shape_a[0]
    if layout == "wgrad":
        if len(shape_b) != 2 or shape_b[0] != m_total:
            raise ValueError(f"wgrad: b must be 2-D ({m_total}, K) like a's rows, got shape {shape_b}")
        n, k = shape_a[1], shape_b[1]
        num_groups = out.shape[0] if isinstance(out, torch.Tensor) and out.dim() == 3 else None
    else:
        if len(shape_b) != 3:
            raise ValueError(f"b must be the 3-D expert weight (G, N, K), got shape {shape_b}")
        num_groups, n, k = shape_b
        contraction = n if layout == "dgrad" else k
        if shape_a[1] != contraction:
            dim = "N" if layout == "dgrad" else "K"
            raise ValueError(f"{layout}: a has {shape_a[1]} columns, b's {dim} is {contraction}; they must match")
    splits = Splits.of(split_sizes, offsets, rows=m_total, num_groups=num_groups, device=device)
    num_groups, sizes = splits.num_groups, splits.sizes
    if num_groups == 0:
        raise ValueError("there must be at least one expert (got zero groups)")
    for name, op in (("a", a), ("b", b)):
        _check_grouping(name, op, layout, splits)
    if layout == "wgrad" and _token_groups(a) != _token_groups(b):
        raise ValueError(f"wgrad: a and b must be grouped alike, got {list(_token_groups(a))} and "
                         f"{list(_token_groups(b))}")

    out_shape = {"forward": (m_total, n), "dgrad": (m_total, k), "wgrad": (num_groups, n, k)}[layout]
    if accumulate and layout != "wgrad":
        raise ValueError(f"accumulate=True is for wgrad (adding into main_grad), not {layout}")
    if accumulate and out is None:
        raise ValueError("accumulate=True needs out: the fp32 buffer to add into")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.bfloat16 or torch.float32, got {out_dtype}")
    if accumulate:
        if out_dtype not in (None, torch.float32):
            raise ValueError(f"accumulate=True adds into an fp32 buffer; out_dtype {out_dtype} contradicts it")
        dtype = torch.float32
    elif out_dtype is not None:
        dtype = out_dtype
    else:
        dtype = out.dtype if getattr(out, "dtype", None) in OUT_DTYPES else torch.bfloat16
    if out is not None:
        buffers.check_buffer(out, name="out", shape=out_shape, dtype=dtype, device=device,
                             inputs=[*operand_tensors(a), *operand_tensors(b)])

    row_bytes_aligned = all(f.data_nbytes(d) % buffers.ALIGN_BYTES == 0 for f in (fmt_a, fmt_b) for d in (n, k))
    strides_aligned = all(  # caller buffers were checked by check_buffer
        t.data_ptr() % buffers.ALIGN_BYTES == 0
        and (t.dim() != 2 or t.stride(0) * t.element_size() % buffers.ALIGN_BYTES == 0)
        for t in (a, b)
        if isinstance(t, torch.Tensor)
    )
    problem = Problem(
        fmt=fmt_b.name,
        layout=layout,
        device_type=device.type,
        capability=_capability(device),
        out_dtype=dtype,
        accumulate=accumulate,
        device_splits=sizes is None,
        capturing=_capturing(device),
        caller_buffer=out is not None,
        aligned=row_bytes_aligned and strides_aligned,
        grouped_operands=isinstance(a, GroupedTensor) or isinstance(b, GroupedTensor),
        large_experts=sizes is not None and selector.few_large_experts(sizes),
        weight_only=weight_only,
    )
    contraction = {"forward": k, "dgrad": n, "wgrad": m_total}[layout]
    return GemmCall(problem, fmt_b, a, b, m_total, num_groups, out_shape, contraction, device, out, splits)


def _token_groups(op) -> tuple[int, ...] | None:
    """The grouping a token-major operand was quantized with (None: none, or a bf16 tensor)."""
    if isinstance(op, GroupedTensor):
        return tuple(s[0] for s in op.shapes)
    return getattr(op, "split_sizes", None)


def _check_grouping(name: str, op, layout: str, splits: Splits) -> None:
    """Token-major quantized operands must be grouped like the call: blocks that restart at expert
    boundaries and NVFP4's per-group S are read by the call's experts. Checked on the host without
    a sync: the group count always, the sizes themselves when the call's are on the host."""
    token_major = name == "a" or layout == "wgrad"
    if not token_major:
        if isinstance(op, torch.Tensor) and not op.is_contiguous():
            raise ValueError(f"{name}: the expert weight must be contiguous, got strides {op.stride()}")
        return
    if isinstance(op, torch.Tensor):
        if op.dim() == 2 and op.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along its last dim, got strides {op.stride()}")
        return
    groups = _token_groups(op)
    what = f"{name}: the GroupedTensor's member sizes" if isinstance(op, GroupedTensor) else \
        f"{name} was quantized with split_sizes"
    if not isinstance(op, GroupedTensor):
        if groups is None:
            if op.columnwise:
                raise ValueError(
                    f"{name}: wgrad needs blocks that restart at every expert boundary: quantize it with "
                    "axis=0 and split_sizes"
                )
            return
    if len(groups) != splits.num_groups:
        raise ValueError(f"{what} {list(groups)}: {len(groups)} groups, the call has {splits.num_groups} experts")
    if splits.sizes is not None and groups != splits.sizes:
        raise ValueError(f"{what} {list(groups)}, the call has {list(splits.sizes)}")
