"""grouped.gemm and grouped.explain: the one entry point for the three grouped GEMMs.

See grouped.problem for the layouts and operand rules, grouped.selector for
how the backend is chosen, and grouped.buffers for the caller-buffer rules.
"""

from __future__ import annotations

import dataclasses

import torch

from . import kernels, selector
from .backends import BACKENDS
from .problem import prepare
from .quantize import QuantizedTensor


def gemm(
    a,
    b,
    split_sizes=None,
    *,
    layout: str = "forward",
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped GEMM: forward Y = X W^T, dgrad dX = dY W, wgrad dW = dY^T X, per expert.

    a: the token-major operand (X or dY), (M, .); b: W (G, N, K) for forward and
    dgrad, X (M, K) for wgrad. bf16 tensors, or MXFP8/NVFP4 operands quantized
    along the contraction dim (QuantizedTensor or GroupedTensor).
    split_sizes: rows per expert (list, or int tensor on CPU or GPU), summing to
    at most M, or a ``grouped.Splits`` built once for several calls; or give
    ``offsets`` instead: the inclusive end offsets (G,).
    out: the caller's buffer (forward/dgrad output, or the wgrad buffer that
    accumulate=True adds into, fp32 main_grad); written in place, rows past the
    split total untouched. out_dtype: bf16 (default) or fp32. backend: force one.
    Returns the output (``out`` itself when given). It is not differentiable: the
    result carries no autograd history on any backend (``grouped_mm`` and
    GroupedLinear are the differentiable entries).

    Under torch.compile the call is one ``grouped::gemm`` op in the graph (``gemm_out`` with
    ``out``; grouped/custom_ops.py): the same checks, raised when the graph runs.
    """
    if torch.compiler.is_compiling():
        from .custom_ops import gemm_in_graph

        return gemm_in_graph(a, b, split_sizes, layout=layout, out=out, accumulate=accumulate, out_dtype=out_dtype,
                             backend=backend, offsets=offsets)
    return run_gemm(a, b, split_sizes, layout=layout, out=out, accumulate=accumulate, out_dtype=out_dtype,
                    backend=backend, offsets=offsets)


def run_gemm(a, b, split_sizes=None, *, layout="forward", out=None, accumulate=False, out_dtype=None, backend=None,
             offsets=None) -> torch.Tensor:
    """gemm() in eager mode (and inside the grouped::gemm op)."""
    call = prepare(
        a, b, split_sizes, offsets=offsets, layout=layout, out=out, accumulate=accumulate, out_dtype=out_dtype
    )
    decision = selector.choose(call, backend)
    if torch.is_grad_enabled():  # no autograd history on any backend (inside the layers it is off already)
        with torch.no_grad():
            return _run(call, decision, backend)
    return _run(call, decision, backend)


def _run(call, decision: selector.Decision, backend: str | None) -> torch.Tensor:
    try:
        return BACKENDS[decision.backend].run(call)
    except Exception as e:  # our kernels cannot be built here: the next backend, with a warning
        if not kernels.fall_back(e):
            raise
    return BACKENDS[selector.choose(call, backend).backend].run(call)


def explain(
    a,
    b,
    split_sizes=None,
    *,
    layout: str = "forward",
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
    offsets: torch.Tensor | None = None,
) -> selector.Decision:
    """Which backend gemm() would run for these arguments, and why each other would not."""
    call = prepare(
        a, b, split_sizes, offsets=offsets, layout=layout, out=out, accumulate=accumulate, out_dtype=out_dtype
    )
    return selector.choose(call, backend)


def grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None, *, out=None) -> torch.Tensor:
    """A drop-in for ``torch._grouped_mm`` / ``F.grouped_mm`` in the MoE case, on the fastest backend.

    mat_a: tokens (M, K), rows grouped by expert; mat_b: expert weights (G, K, N) (torch's
    convention: the transpose of nn.Linear's (G, N, K); ``w.transpose(1, 2)`` of a contiguous
    (G, N, K) weight and a contiguous (G, K, N) one both run without a copy); offs: the (G,) int32
    inclusive end offsets. Returns (M, N): per expert ``mat_a[rows_g] @ mat_b[g]``, bf16 or
    ``out_dtype`` (fp32). Rows past offs[-1] are zero with host offsets and unspecified with
    offsets on the GPU (as torch's), and their gradient is zero.

    Differentiable in mat_a and mat_b for bf16 operands (dgrad and wgrad through grouped.gemm; an
    fp32 output's gradient is rounded to bf16 first), also under torch.compile (the
    ``grouped::grouped_mm`` op with its autograd formula). Quantized operands, as grouped.gemm
    takes them, compute forward only: mat_b a QuantizedTensor of shape (G, K, N) quantized along K
    (``grouped.quantize(mat_b, fmt, axis=1)``), mat_a quantized rowwise in the same format (or
    bf16 with an NVFP4 mat_b). ``out``: a caller buffer written in place (no autograd, as for
    torch's out= functions). bias is not supported.
    """
    if bias is not None:
        raise ValueError("grouped_mm: bias is not supported (GroupedLinear(bias=True) adds one per expert)")
    if offs is None:
        raise ValueError("grouped_mm: offs is required: the (G,) int32 end offsets of mat_a's row groups")
    if isinstance(mat_b, QuantizedTensor):
        if torch.is_grad_enabled() and getattr(mat_a, "requires_grad", False):
            raise ValueError("grouped_mm: quantized operands compute forward only, but mat_a requires grad "
                             "(GroupedLinear with a quantized recipe is the differentiable entry)")
        return gemm(mat_a, _as_forward_weight(mat_b), offsets=offs, out=out, out_dtype=out_dtype)
    if not isinstance(mat_a, torch.Tensor) or not isinstance(mat_b, torch.Tensor):
        raise ValueError(f"grouped_mm: mat_a and mat_b must be bf16 tensors, or mat_b a QuantizedTensor (mat_a "
                         f"quantized or bf16), got {type(mat_a).__name__} and {type(mat_b).__name__}")
    if mat_a.dim() != 2 or mat_b.dim() != 3:
        raise ValueError(f"grouped_mm serves 2-D mat_a (tokens, K) x 3-D mat_b (G, K, N), got shapes "
                         f"{tuple(mat_a.shape)} and {tuple(mat_b.shape)}")
    if not isinstance(offs, torch.Tensor):
        raise ValueError(f"grouped_mm: offs must be a tensor of end offsets, got {type(offs).__name__}")
    if out is not None:
        if torch.is_grad_enabled() and (mat_a.requires_grad or mat_b.requires_grad):
            raise ValueError("grouped_mm: out= does not support automatic differentiation, but an input requires grad")
        weight, layout = grouped_mm_weight(mat_b)
        return gemm(mat_a, weight, offsets=offs, layout=layout, out=out, out_dtype=out_dtype)
    return torch.ops.grouped.grouped_mm(mat_a, mat_b, offs, out_dtype)


def grouped_mm_weight(mat_b: torch.Tensor) -> tuple[torch.Tensor, str]:
    """mat_b (G, K, N) as grouped.gemm's expert weight W and the layout that multiplies by it, no
    copy: W = mat_b^T (G, N, K), forward, when that is contiguous (mat_b a transposed nn.Linear
    weight); else mat_b itself, a (G, N', K') weight with N' = K, in dgrad (y = a W per expert)."""
    if mat_b.transpose(1, 2).is_contiguous():
        return mat_b.transpose(1, 2), "forward"
    if mat_b.is_contiguous():
        return mat_b, "dgrad"
    raise ValueError(
        "grouped_mm: mat_b must be contiguous (G, K, N) or the transpose of a contiguous (G, N, K) weight, "
        f"got shape {tuple(mat_b.shape)} and strides {mat_b.stride()}"
    )


def _as_forward_weight(mat_b: QuantizedTensor) -> QuantizedTensor:
    """A (G, K, N) weight quantized along K as the (G, N, K) rowwise operand of a forward GEMM:
    the stored bytes are the same (blocked dim last), only the logical shape turns."""
    if len(mat_b.shape) != 3 or mat_b.axis != 1:
        raise ValueError(f"grouped_mm: a quantized mat_b must be (G, K, N) quantized along K (axis=1), got shape "
                         f"{tuple(mat_b.shape)} and axis {mat_b.axis}")
    g, k, n = mat_b.shape
    return dataclasses.replace(mat_b, axis=-1, shape=torch.Size((g, n, k)))
