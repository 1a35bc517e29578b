"""gemm_swiglu: FC1 of an expert MLP followed by SwiGLU (x routing probabilities), fused where a backend can.

    h   = grouped.gemm(a, b, split_sizes)           (M, N), N = 2F: h[:, :F] gate, h[:, F:] up
    act = silu(gate) * up * probs[:, None]          computed in fp32, returned in bf16 (or out's dtype)

Fused: when the backend chosen for the FC1 GEMM computes SwiGLU in its GEMM
epilogue and accepts the call (``Backend.swiglu_refusal`` is None), one kernel
gives the activation: no separate pass reads h back. Today that is ``cudnn``
(Blackwell) with NVFP4 operands (N a multiple of 64, every expert's token count
a multiple of 256, bf16 result, ...). Its kernel still stores h (bf16, as
scratch: cuDNN frontend's GLU kernel always writes its C output), and it works
on the fp32 accumulator, so it skips the unfused path's rounding of h to bf16.
MXFP8 is not fused: for FP8 inputs the frontend's own GLU wrapper always emits a
block-scaled D, not the plain activation returned here (the plain-D path of its
kernel stays off until it has run on Blackwell).

Unfused otherwise: ``grouped.gemm`` (the public entry, with its usual backend
choice) writes h in bf16, then SwiGLU runs in torch. ``explain_swiglu`` says
which path a call takes and why. Rows past sum(split_sizes) are zero in a result
this function allocates and untouched in ``out``.

Forward only: no autograd (GroupedMLP keeps its unfused FC1 while gradients are
needed, because backward needs h). The cudnn path has not run on Blackwell
hardware here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import buffers, selector
from .backends import BACKENDS
from .gemm import gemm
from .problem import OUT_DTYPES, GemmCall, operand_tensors, prepare


@dataclass
class SwigluExplanation:
    """Which path gemm_swiglu takes: fused in one backend kernel, or grouped.gemm + torch SwiGLU."""

    fused: bool
    why: str
    gemm: selector.Decision  # the FC1 GEMM's decision (what grouped.explain says)

    def __str__(self) -> str:
        path = "fused (one GEMM + SwiGLU kernel)" if self.fused else "unfused (grouped.gemm + torch SwiGLU)"
        return f"gemm_swiglu -> {path}: {self.why}\n{self.gemm}"


def check_probs(probs, *, rows: int, device: torch.device, operand: str) -> None:
    """probs (None, or one float per row of ``operand``, on its device)."""
    if probs is None:
        return
    if not isinstance(probs, torch.Tensor) or probs.dim() != 1 or probs.shape[0] != rows:
        got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a 1-D tensor with one entry per row of {operand} ({rows}), got {got}")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating-point tensor, got {probs.dtype}")
    if probs.device != device:
        raise ValueError(f"probs is on {probs.device}, {operand} on {device}")


def _check(call: GemmCall, a, b, probs, out) -> torch.dtype:
    """Check what gemm_swiglu adds to grouped.gemm's checks (a forward call); return the result dtype."""
    m, n = call.out_shape
    if n % 2:
        raise ValueError(f"gemm_swiglu: b's N ({n}) must be even: first half gate, second half up")
    check_probs(probs, rows=m, device=call.device, operand="a")
    if out is None:
        return torch.bfloat16
    dtype = getattr(out, "dtype", None)
    if dtype not in OUT_DTYPES:
        raise ValueError(f"out must be a bf16 or fp32 tensor, got {dtype if dtype is not None else type(out).__name__}")
    inputs = [*operand_tensors(a), *operand_tensors(b), *([probs] if probs is not None else [])]
    buffers.check_buffer(out, name="out", shape=(m, n // 2), dtype=dtype, device=call.device, inputs=inputs)
    return dtype


def _plan(call: GemmCall, probs, out_dtype, backend) -> SwigluExplanation:
    decision = selector.decide(call.problem, backend)
    reason = BACKENDS[decision.backend].swiglu_refusal(call, probs, out_dtype)
    if reason is not None:
        why = (
            f"the FC1 GEMM goes to {decision.backend}, which cannot fuse SwiGLU here: {reason}; "
            "computed as grouped.gemm (bf16 h), then SwiGLU in torch (fp32)"
        )
        return SwigluExplanation(False, why, selector.choose(call, backend))  # where grouped.gemm runs FC1
    why = (
        f"{decision.backend} computes FC1 + SwiGLU" + (" + probs" if probs is not None else "")
        + " in one kernel, SwiGLU in the GEMM epilogue on the fp32 accumulator (no pass reads h back); "
        "the result goes straight into out when out has dense rows"
    )
    return SwigluExplanation(True, why, decision)


def _prepare(a, b, split_sizes, probs, out, offsets=None) -> tuple[GemmCall, torch.dtype]:
    call = prepare(a, b, split_sizes, offsets=offsets, layout="forward", out=None, accumulate=False, out_dtype=None)
    return call, _check(call, a, b, probs, out)


def explain_swiglu(a, b, split_sizes, probs=None, *, out=None, backend=None) -> SwigluExplanation:
    """Whether gemm_swiglu would fuse (cudnn's GLU wrapper) for these arguments, and why (not)."""
    call, out_dtype = _prepare(a, b, split_sizes, probs, out)
    return _plan(call, probs, out_dtype, backend)


def _write(result_rows: torch.Tensor, total, m: int, out, dtype, device) -> torch.Tensor:
    """Place the first rows of the activation into out / a new (m, F) tensor (rows past total: 0 / untouched)."""
    f = result_rows.shape[1]
    if isinstance(total, int):
        target = out if out is not None else torch.empty(m, f, dtype=dtype, device=device)
        target[:total].copy_(result_rows[:total])
        if out is None:
            target[total:].zero_()
        return target
    rows = (torch.arange(m, device=device) < total).unsqueeze(1)
    keep = out if out is not None else torch.zeros(m, f, dtype=dtype, device=device)
    merged = torch.where(rows, result_rows[:m].to(dtype), keep)
    if out is None:
        return merged
    out.copy_(merged)
    return out


def swiglu(h: torch.Tensor, probs) -> torch.Tensor:
    """silu(gate) * up (* probs) in fp32, h (M, 2F): first half gate, second half up (differentiable)."""
    gate, up = h.float().chunk(2, dim=1)
    act = F.silu(gate) * up
    if probs is not None:
        act = act * probs.float().unsqueeze(1)
    return act


def gemm_swiglu(a, b, split_sizes, probs=None, *, out=None, backend=None) -> torch.Tensor:
    """SwiGLU(+probs) of the grouped FC1 GEMM a @ b[g]^T, fused where cuDNN frontend can (see explain_swiglu).

    a: tokens (M, K), bf16 or quantized rowwise; b: W1 (G, 2F, K), first F rows
    of each expert the gate projection, the last F the up projection; split_sizes:
    rows per expert; probs: optional (M,) routing probabilities. out: optional
    (M, F) bf16/fp32 buffer. backend: force the FC1 GEMM's backend (as in
    grouped.gemm). Returns the (M, F) activation (``out`` itself when given). Under
    torch.compile the call is one ``grouped::gemm_swiglu`` op (grouped/custom_ops.py).
    """
    if torch.compiler.is_compiling():
        from .custom_ops import gemm_swiglu_in_graph

        return gemm_swiglu_in_graph(a, b, split_sizes, probs, out=out, backend=backend)
    return run_gemm_swiglu(a, b, split_sizes, probs, out=out, backend=backend)


def run_gemm_swiglu(a, b, split_sizes, probs=None, *, offsets=None, out=None, backend=None) -> torch.Tensor:
    """gemm_swiglu() in eager mode (and inside the grouped::gemm_swiglu op, which may pass the
    grouping as end offsets)."""
    if torch.is_grad_enabled():  # forward only, whichever path runs: no autograd history (as grouped.gemm)
        with torch.no_grad():
            return run_gemm_swiglu(a, b, split_sizes, probs, offsets=offsets, out=out, backend=backend)
    call, out_dtype = _prepare(a, b, split_sizes, probs, out, offsets)
    plan = _plan(call, probs, out_dtype, backend)
    m = call.m_total
    if plan.fused:
        fuser = BACKENDS[plan.gemm.backend]
        if out is None or out.stride() == (out.shape[1], 1):
            return fuser.run_swiglu(call, probs, out)
        act = fuser.run_swiglu(call, probs)  # a strided out: through a dense result
        return _write(act, call.splits.total(), m, out, out_dtype, call.device)
    h = gemm(a, b, call.splits, backend=backend)
    act = swiglu(h, probs)
    return _write(act, call.splits.total(), m, out, out_dtype, call.device)
