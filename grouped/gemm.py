"""grouped.gemm and grouped.explain: the one entry point for the three grouped GEMMs.

See grouped.problem for the layouts and operand rules, grouped.selector for
how the backend is chosen, and grouped.buffers for the caller-buffer rules.
"""

from __future__ import annotations

import torch

from . import kernels, selector
from .backends import BACKENDS
from .problem import prepare


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
    result carries no autograd history on any backend (GroupedLinear is the
    differentiable layer).
    """
    call = prepare(
        a, b, split_sizes, offsets=offsets, layout=layout, out=out, accumulate=accumulate, out_dtype=out_dtype
    )
    decision = selector.choose(call, backend)
    with torch.no_grad():
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
