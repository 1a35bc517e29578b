"""cudnn backend: MXFP8 / NVFP4 grouped GEMMs on Blackwell (sm100) through nvidia-cudnn-frontend 1.32.

Builds, from a checked GemmCall, the arguments of the frontend's CuTe DSL grouped
GEMMs (forward/dgrad, wgrad, fused FC1 + SwiGLU), writing into the caller's buffer,
and calls them on the operands' device. It has not run on Blackwell hardware here.
What the frontend expects, and why the adapter does what it does:
docs/cudnn-frontend.md.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import NamedTuple

import torch

from ..buffers import ceil_to
from ..offsets import splits_to_offsets
from ..problem import GemmCall, Problem
from ..quantize import QuantizedTensor, split_sizes_to_list
from ..scale_layout import blocked_numel, to_blocked
from .base import Backend

FORWARD_TOKEN_MULTIPLE = 256  # cuDNN frontend m_aligned / FIX_PAD_SIZE (forward, dgrad, glu)
WGRAD_TOKEN_MULTIPLE = 128  # token ends of wgrad's offsets_tensor
MAX_EXPERTS = 1024  # GroupedGemmQuantSm100 / GroupedGemmGluSm100: expert_cnt <= 1024
GLU_N_MULTIPLE = 64  # GLU: N divisible by 64 (gate/up 32-column block pairs)
GLU_BLOCK = 32  # gate/up interleave granularity along N

# What the adapter calls in nvidia-cudnn-frontend, per kind of call.
WRAPPERS = {
    "forward": "grouped_gemm_quant_wrapper_sm100",
    "dgrad": "grouped_gemm_quant_wrapper_sm100",
    "wgrad": "grouped_gemm_wgrad_wrapper_sm100",
    "swiglu": "GroupedGemmGluSm100",  # the class: its wrapper allocates C, D, D_col and amax on every call
}
WGRAD_WORKSPACE_SIZE = "get_grouped_gemm_wgrad_workspace_size_sm100"
FRONTEND_REQUIREMENT = "nvidia-cudnn-frontend>=1.32,<1.33"
# The dtypes cuDNN wants each format's scales and data viewed as (sf_vec_size is the block size).
SCALE_DTYPE = {"mxfp8": torch.float8_e8m0fnu, "nvfp4": torch.float8_e4m3fn}
DATA_DTYPE = {"mxfp8": torch.float8_e4m3fn, "nvfp4": torch.float4_e2m1fn_x2}
NOT_RUN_NOTE = "the cudnn path has not run on Blackwell hardware here"


def cudnn_installed() -> bool:
    """Whether ``import cudnn`` would find nvidia-cudnn-frontend (without importing it)."""
    module = sys.modules.get("cudnn", ...)
    if module is None:
        return False  # sys.modules["cudnn"] = None blocks the import
    if module is not ...:
        return True
    try:
        return importlib.util.find_spec("cudnn") is not None
    except (ImportError, ValueError):
        return False


def token_multiple(layout: str) -> int:
    """What every expert's token count must be a multiple of: 128 for wgrad, 256 otherwise (swiglu too)."""
    return WGRAD_TOKEN_MULTIPLE if layout == "wgrad" else FORWARD_TOKEN_MULTIPLE


def token_rule_violation(layout: str, sizes) -> str | None:
    """Why these host split sizes break cuDNN frontend's token rule for the layout (None: they don't)."""
    multiple = token_multiple(layout)
    bad = [(g, m) for g, m in enumerate(sizes) if m % multiple]
    if not bad:
        return None
    shown = ", ".join(f"expert {g}: {m}" for g, m in bad[:6]) + (", ..." if len(bad) > 6 else "")
    what = "wgrad's offsets_tensor" if layout == "wgrad" else "padded_offsets (m_aligned = FIX_PAD_SIZE = 256)"
    return (
        f"every expert's token count must be a multiple of {multiple} for cuDNN frontend's {layout} "
        f"({what}); not so for {shown}. This backend refuses rather than padding (padding would stage "
        f"the result through a temporary instead of writing into the buffer): pad each expert's tokens "
        f"to a multiple of {multiple} when dispatching (grouped.backends.cudnn.padded_split_sizes), "
        f"or choose another backend"
    )


class PaddedDispatch(NamedTuple):
    """Where a padded dispatch puts its tokens: see ``padded_split_sizes``."""

    split_sizes: list[int] | torch.Tensor  # every expert's count rounded up to the multiple
    row_index: torch.Tensor  # (rows,) int64: the padded row of each row of the unpadded tokens
    rows: int  # rows of the padded token tensor: enough for any split sizes, a multiple of the multiple


def padded_split_sizes(split_sizes, multiple: int, rows: int) -> PaddedDispatch:
    """Pad every expert's token count up to a multiple of ``multiple`` (256 forward/dgrad/fused, 128 wgrad).

    ``split_sizes``: a list of ints or a 1-D int tensor (CPU or GPU), summing to at
    most ``rows``, the row count of the unpadded token tensor. Scatter the tokens
    with ``padded = x.new_zeros(result.rows, x.shape[1]); padded[result.row_index] = x``,
    run the grouped GEMM on ``padded`` with ``result.split_sizes``, and read a
    forward/dgrad result back with ``y_padded[result.row_index]``. Padding rows
    must stay zero: wgrad sums over every token row. Rows past sum(split_sizes)
    keep their order after the padded total. Plain torch: with sizes on the GPU it
    runs there with no host sync (graph-safe); ``result.rows`` depends only on
    ``rows``, the expert count and ``multiple``.
    """
    if type(multiple) is not int or multiple <= 0:
        raise ValueError(f"multiple must be a positive int (256 or 128 for cudnn), got {multiple!r}")
    given_tensor = isinstance(split_sizes, torch.Tensor)
    if given_tensor:  # its values are not checked: on the GPU that would sync
        if split_sizes.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"split_sizes must be an int32/int64 tensor or a list of ints, got {split_sizes.dtype}")
        counts = split_sizes.to(torch.int64)
    else:
        counts = torch.tensor(split_sizes_to_list(split_sizes, rows=rows), dtype=torch.int64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"split_sizes must hold one count an expert, got shape {tuple(counts.shape)}")
    padded = (counts + multiple - 1) // multiple * multiple
    ends, padded_ends = torch.cumsum(counts, 0), torch.cumsum(padded, 0)
    # each row moves by (its expert's padded start - its start); rows past the total by (padded total - total)
    shift = torch.cat([padded_ends - padded - (ends - counts), (padded_ends[-1:] - ends[-1:])])
    row = torch.arange(rows, device=counts.device)
    row_index = row + shift[torch.searchsorted(ends, row, right=True)]
    padded_rows = ceil_to(rows + len(counts) * (multiple - 1), multiple)
    sizes = padded.to(split_sizes.dtype) if given_tensor else padded.tolist()
    return PaddedDispatch(sizes, row_index, padded_rows)


def _scale_bytes_view(t: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """Blocked scale bytes in the dtype cuDNN wants (a view: same bytes)."""
    return t.view(torch.uint8).view(SCALE_DTYPE[fmt_name])


def _data_view(t: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """Operand data in the dtype cuDNN wants: packed NVFP4 as float4_e2m1fn_x2 (a view: same bytes)."""
    return t.view(DATA_DTYPE[fmt_name])


# ---- operands ------------------------------------------------------------------------------


def _members_stacked(views: list[torch.Tensor], base: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """GroupedTensor member views that lie back to back from the start of ``base``, as one tensor."""
    expected = base.data_ptr()
    for v in views:
        if v.numel() and (v.data_ptr() != expected or not v.is_contiguous()):
            raise ValueError(
                "cudnn backend: the GroupedTensor's members are not stored back to back "
                "(rows not 16-byte aligned?); cuDNN frontend needs one dense operand"
            )
        expected += v.numel() * v.element_size()
    nbytes = expected - base.data_ptr()
    dtype = views[0].dtype
    return base[:nbytes].view(dtype).view(shape)


def _token_operand(op, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """forward/dgrad ``a``: (data[:rows] view, blocked scales of those rows (flat), per-tensor S or None).

    ``rows`` is a multiple of 256 (or zero), so the blocked scales of the first
    ``rows`` rows are the first bytes of the blocked scales of all rows.
    """
    if isinstance(op, QuantizedTensor):
        data = op.data[:rows]
        cols = op.compact_scale_shape[-1]
        if op.layout == "blocked":
            sfa = op.scale[: blocked_numel(rows, cols)]  # a view, no copy
        else:
            sfa = to_blocked(op.scale[:rows])
        return data, sfa, op.global_scale
    members = op.split()
    k_bytes = members[0].data.shape[1]
    data = _members_stacked([q.data for q in members], op.data, (sum(s[0] for s in op.shapes), k_bytes))
    compact = torch.cat([q.scale for q in members])
    return data[:rows], to_blocked(compact[:rows]), op.global_scale


def _weight_operand(op, *, columnwise: bool, interleave: torch.Tensor | None = None):
    """``b`` (G, R, C): (data (G, R, C_bytes), blocked scales (G, blocked_numel), S (G,) or None).

    ``interleave``: a row permutation (GLU's gate/up blocks) applied to data and scales.
    """
    if isinstance(op, QuantizedTensor):
        data, s = op.data, op.global_scale
        if interleave is None and op.layout == "blocked":
            return data, op.scale, s  # already what cuDNN reads: no copy
        compact = op.compact_scale()
    else:
        members = op.split(columnwise=columnwise)
        rows, c_bytes = members[0].data.shape
        base = op.columnwise_data if columnwise else op.data
        data = _members_stacked([q.data for q in members], base, (len(members), rows, c_bytes))
        compact = torch.stack([q.scale for q in members])
        s = op.global_scale
    if interleave is not None:
        data = data.index_select(1, interleave)
        compact = compact.index_select(1, interleave)
    if not data.is_contiguous():
        raise ValueError(
            f"cudnn backend: the weight data must be contiguous (canonical (l, n, k)), got strides {data.stride()}"
        )
    return data, to_blocked(compact), s


def _per_group_scale(s: torch.Tensor | None, groups: int, device) -> torch.Tensor:
    if s is None:
        return torch.ones(groups, dtype=torch.float32, device=device)
    s = s.to(device=device, dtype=torch.float32)
    return s.expand(groups) if s.dim() == 0 else s.reshape(groups)


def _alpha(fmt_name: str, s_a, s_b, groups: int, device) -> torch.Tensor:
    """alpha[g] = 1 / (S_a[g] * S_b[g]) for NVFP4 (fp64, rounded once to fp32); 1 for MXFP8."""
    if fmt_name != "nvfp4":
        return torch.ones(groups, dtype=torch.float32, device=device)
    sa = _per_group_scale(s_a, groups, device).double()
    sb = _per_group_scale(s_b, groups, device).double()
    return torch.reciprocal(sa * sb).float().contiguous()


def padded_offsets(counts: torch.Tensor) -> torch.Tensor:
    """int32 inclusive end offsets (G,) of the device counts, one 16-byte aligned allocation (an
    ``offsets=`` the caller gave may be a view at any address).

    The token rule is refused, not padded, so these are the plain end offsets.
    """
    (offsets,) = splits_to_offsets(
        counts, strides=[1], include_leading_zero=[False], dtypes=[torch.int32], bulk_allocate=True
    )
    return offsets


def _check_counts_on_device(counts: torch.Tensor, multiple: int) -> None:
    """The token rule for split sizes that live on the GPU: a device-side assertion, no host sync."""
    torch._assert_async(
        torch.all(torch.remainder(counts, multiple) == 0),
        f"cudnn backend: every expert's token count must be a multiple of {multiple} (cuDNN frontend token rule)",
    )


# ---- call-level refusals (asked by the selector through CudnnBackend.accepts) -----------------------


def _valid_rows(call: GemmCall) -> int:
    """Rows handed to cuDNN for forward/dgrad: the split total (host sizes) or all rows (GPU sizes)."""
    return sum(call.splits.sizes) if call.splits.sizes is not None else call.m_total


def _data_refusal(call: GemmCall) -> str | None:
    """Why the frontend cannot take this call's data (expert count, token rule, tensor scales, buffer strides)."""
    layout = call.layout
    if call.num_groups > MAX_EXPERTS:
        return (
            f"cuDNN frontend's grouped GEMMs take at most {MAX_EXPERTS} experts (expert_cnt <= 1024), "
            f"got {call.num_groups}"
        )
    if layout == "wgrad":  # the quantized operands carry host split sizes even when the call's are on the GPU
        sizes = call.splits.sizes if call.splits.sizes is not None else call.a.split_sizes
        return token_rule_violation(layout, sizes)
    if call.splits.sizes is not None:
        reason = token_rule_violation(layout, call.splits.sizes)
        if reason:
            return reason
    elif call.m_total % FORWARD_TOKEN_MULTIPLE:
        return (
            f"with split sizes on the GPU the whole token tensor goes to cuDNN frontend, whose row count must be "
            f"a multiple of {FORWARD_TOKEN_MULTIPLE}; got {call.m_total} rows"
        )
    out = call.out
    if out is not None and _valid_rows(call) > 0:
        n = call.out_shape[1]
        if out.stride() != (n, 1):
            return (
                f"cuDNN frontend writes d_tensor as dense rows (stride ({n}, 1)); the caller's buffer has strides "
                f"{tuple(out.stride())}. A strided view is refused rather than copied: pass a dense buffer or "
                f"choose another backend"
            )
    return None


# ---- CUDA graph capture: only calls whose signature already ran outside capture ----------------------

# On the first call of each signature the frontend compiles, allocates a workspace and (wgrad) copies the
# offsets to the host; capture forbids all three. Later calls of that signature only launch.
_warm_signatures: set[tuple] = set()


def _width(op) -> int:
    return op.shape[1] if isinstance(op, QuantizedTensor) else op.shapes[0][1]


def _signature(call: GemmCall, kind: str, probs: torch.Tensor | None = None) -> tuple:
    """The shapes, strides, dtypes and device of what this call hands the frontend (what its caches key
    on), read off the call without building anything."""
    tokens = tuple(call.a.data.shape) if kind == "wgrad" else (_valid_rows(call), _width(call.a))
    out = call.out
    out_strides = None if out is None or out.is_contiguous() else tuple(out.stride())
    problem = call.problem
    return (kind, call.device, call.fmt.name, problem.out_dtype, problem.accumulate, call.num_groups,
            call.out_shape, tokens, out_strides, probs is not None)


def _capture_refusal(call: GemmCall, kind: str, probs: torch.Tensor | None = None) -> str | None:
    if not call.problem.capturing or _signature(call, kind, probs) in _warm_signatures:
        return None
    return (
        "under CUDA graph capture cuDNN frontend can only replay what it has already built: its first call for "
        "each new shape compiles, allocates a workspace and (wgrad) reads the offsets on the host, which capture "
        "forbids. Run the same call (same shapes, dtypes, device) once outside capture first"
    )


# ---- argument builders (plain torch: they run on CPU tensors in the tests) ------------------------


def forward_arguments(call: GemmCall, out: torch.Tensor | None = None) -> dict | None:
    """kwargs for ``cudnn.grouped_gemm_quant_wrapper_sm100``, forward (Y = X W^T) or dgrad (dX = dY W).

    ``out`` is the full output buffer (default: the call's, or a new one); rows
    [:valid_m] of it go in as ``d_tensor``, a view (same data pointer and strides).
    Returns None when there are no rows to compute. The call must be one that
    ``CudnnBackend.accepts``.
    """
    if call.layout not in ("forward", "dgrad"):
        raise ValueError(f"forward_arguments is for forward and dgrad, not {call.layout}")
    out = call.output() if out is None else out
    rows = _valid_rows(call)
    if rows == 0:
        return None
    return {
        **_blockscaled_operands(call, rows, columnwise=call.layout == "dgrad"),
        "b_major": "k",
        "cd_major": "n",
        "sf_vec_size": call.fmt.block_size,
        "d_dtype": out.dtype,
        "d_tensor": out[:rows],
        "generate_amax": False,  # nothing reads it; False allocates and computes none
    }


def _blockscaled_operands(call: GemmCall, rows: int, *, columnwise: bool, interleave=None) -> dict:
    """The A / B / scales / offsets / alpha tensors the quant and GLU kernels share."""
    fmt = call.fmt.name
    counts = call.splits.counts()
    if call.splits.sizes is None:
        _check_counts_on_device(counts, FORWARD_TOKEN_MULTIPLE)
    a_data, sfa, s_a = _token_operand(call.a, rows)
    b_data, sfb, s_b = _weight_operand(call.b, columnwise=columnwise, interleave=interleave)
    return {
        "a_tensor": _data_view(a_data, fmt),
        "sfa_tensor": _scale_bytes_view(sfa, fmt),
        "padded_offsets": padded_offsets(counts),
        "alpha_tensor": _alpha(fmt, s_a, s_b, call.num_groups, call.device),
        "b_tensor": _data_view(b_data, fmt),
        "sfb_tensor": _scale_bytes_view(sfb, fmt),
    }


def per_expert_blocked(compact: torch.Tensor, sizes, block: int) -> torch.Tensor:
    """wgrad scales: each expert's (rows, m_g / block) column range in the blocked layout, concatenated."""
    starts, start = [], 0
    for m in sizes:
        starts.append(start)
        start += m // block
    chunks = [to_blocked(compact[:, s : s + m // block]).reshape(-1) for s, m in zip(starts, sizes)]
    return torch.cat(chunks) if chunks else compact.new_zeros(0)


def wgrad_arguments(call: GemmCall, out: torch.Tensor | None = None) -> dict | None:
    """kwargs for ``cudnn.grouped_gemm_wgrad_wrapper_sm100``: dW[g] = dY[rows_g]^T X[rows_g].

    a = dY quantized columnwise, stored (N, P): cuDNN's a_tensor (hidden, tokens).
    b = X quantized columnwise, stored (K, P): its transpose view (P, K), token
    innermost, is cuDNN's b_tensor (tokens, intermediate). ``out`` (G, N, K), any
    strides, is passed as ``wgrad_tensor``. Returns None when no tokens exist.
    The descriptor workspace is added by ``CudnnBackend.run`` (its size comes from the frontend).
    """
    if call.layout != "wgrad":
        raise ValueError(f"wgrad_arguments is for wgrad, not {call.layout}")
    fmt = call.fmt.name
    dy, x = call.a, call.b
    out = call.output() if out is None else out
    if dy.data.shape[1] == 0:
        return None
    counts = call.splits.counts()
    if call.splits.sizes is None:
        _check_counts_on_device(counts, WGRAD_TOKEN_MULTIPLE)
    sizes = dy.split_sizes  # the operands' host grouping: the call's (prepare checks it, and x's, on the host)
    block = call.fmt.block_size
    sfa = per_expert_blocked(dy.compact_scale(), sizes, block)
    sfb = per_expert_blocked(x.compact_scale(), sizes, block)
    gs_a = gs_b = None
    if fmt == "nvfp4":
        gs_a = torch.reciprocal(_per_group_scale(dy.global_scale, call.num_groups, call.device)).contiguous()
        gs_b = torch.reciprocal(_per_group_scale(x.global_scale, call.num_groups, call.device)).contiguous()
    return {
        "a_tensor": _data_view(dy.data, fmt),
        "b_tensor": _data_view(x.data, fmt).t(),
        "sfa_tensor": _scale_bytes_view(sfa, fmt),
        "sfb_tensor": _scale_bytes_view(sfb, fmt),
        "offsets_tensor": padded_offsets(counts),
        "output_mode": "dense",
        "wgrad_tensor": out,
        "global_scale_a": gs_a,
        "global_scale_b": gs_b,
        "wgrad_dtype": out.dtype,
        "sf_vec_size": call.fmt.block_size,
        "accumulate_on_output": call.problem.accumulate,
    }


def glu_interleave(n: int, device=None) -> torch.Tensor:
    """Row order for GLU: position 64j + h*32 + c holds source row h*(n/2) + 32j + c (h 0 gate, 1 up)."""
    half = n // 2
    idx = torch.arange(n, device=device).view(2, half // GLU_BLOCK, GLU_BLOCK)
    return idx.transpose(0, 1).reshape(-1)


def _glu_refusal(call: GemmCall, out_dtype: torch.dtype) -> str | None:
    """Why the frontend's GLU kernel cannot give gemm_swiglu's result for this call (None: it can)."""
    if call.layout != "forward":
        return "the GLU kernel fuses a forward GEMM only"
    if call.fmt.name == "mxfp8":
        return (
            "for FP8 inputs cuDNN frontend's own GLU wrapper always emits a block-scaled D (SFD outputs, "
            "norm_const), not the plain activation gemm_swiglu returns; its GLU class also takes a plain bf16 D, "
            "a path the wrapper never uses, left off until it has run on Blackwell"
        )
    n = call.out_shape[1]
    if n % GLU_N_MULTIPLE:
        return (
            f"the GLU kernel needs N = 2 x ffn_hidden to be a multiple of {GLU_N_MULTIPLE} "
            f"(gate/up 32-column block pairs), got N = {n}"
        )
    if out_dtype != torch.bfloat16:
        return (
            "the GLU kernel's fused output is used in bf16 here (no fp32 D for FP8 inputs, "
            f"nor for FP4 without bias), got out of dtype {out_dtype}"
        )
    if not call.problem.aligned:
        return "the GLU kernel needs 16-byte aligned rows"
    return None


def glu_arguments(call: GemmCall, probs: torch.Tensor | None, d: torch.Tensor) -> dict:
    """Tensors for ``GroupedGemmGluSm100.execute``: FC1 + SwiGLU (+ probs) of the first ``d.shape[0]`` rows into
    ``d``, a dense (valid_m, N/2) bf16 buffer.

    Same A/SFA/padded_offsets/alpha as ``forward_arguments``; the weight rows are
    re-interleaved into 32-row gate/up blocks (our W1 has gate rows first, then
    up rows), so D comes out in our column order.
    """
    rows, n = d.shape[0], call.out_shape[1]
    return {
        **_blockscaled_operands(call, rows, columnwise=False, interleave=glu_interleave(n, call.device)),
        # the kernel always stores the pre-activation C = h (bf16): scratch that nothing here reads
        "c_tensor": torch.empty(rows, n, dtype=torch.bfloat16, device=call.device),
        "d_tensor": d,
        # D_col is stored only with block-scaled (SFD) outputs, which an FP4 -> bf16 GLU has not; the kernel
        # still takes a tensor for it, so it gets D's (as the quant API itself does when there is no SFD)
        "d_col_tensor": d,
        "prob_tensor": None if probs is None else probs[:rows].to(torch.float32).contiguous(),
    }


def _frontend(name: str):
    import cudnn  # lazily: an optional extra, never imported by `import grouped`

    try:
        return getattr(cudnn, name)
    except (AttributeError, ImportError) as e:
        version = getattr(cudnn, "__version__", "unknown")
        raise ImportError(
            f"cudnn backend: nvidia-cudnn-frontend {version} does not provide {name} ({e}); "
            f"install {FRONTEND_REQUIREMENT} (pip install 'grouped-gemm[blackwell]')"
        ) from e


# Compiled GLU kernels, per (device, format, weight shape, probs given): the kernel is compiled for any
# token count, as the frontend's own wrapper caches it.
_glu_kernels: dict[tuple, object] = {}


def _glu_kernel(call: GemmCall, kwargs: dict):
    key = (call.device, call.fmt.name, tuple(kwargs["b_tensor"].shape), kwargs["prob_tensor"] is not None)
    kernel = _glu_kernels.get(key)
    if kernel is None:
        samples = {"sample_" + name.removesuffix("_tensor"): t for name, t in kwargs.items()}
        kernel = _frontend(WRAPPERS["swiglu"])(**samples, sf_vec_size=call.fmt.block_size, act_func="swiglu")
        kernel.check_support()  # raises on what it cannot serve
        kernel.compile()
        _glu_kernels[key] = kernel
    return kernel


class CudnnBackend(Backend):
    name = "cudnn"
    formats = ("mxfp8", "nvfp4")
    graph_safe = True  # with one warm-up call per signature outside capture (see _capture_refusal)

    def unavailable(self, device_type, capability):
        if device_type != "cuda" or capability is None or capability[0] != 10:
            here = f"sm{capability[0]}{capability[1]}" if capability else device_type
            return (
                f"needs a Blackwell GPU (compute capability 10.x): cuDNN frontend's CuTe DSL grouped GEMM "
                f"wrappers are sm100-only, this is {here}"
            )
        if not cudnn_installed():
            return "nvidia-cudnn-frontend is not installed (pip install 'grouped-gemm[blackwell]')"
        return None

    def refuses(self, problem: Problem) -> str | None:
        if problem.weight_only:
            return "cuDNN frontend's grouped GEMMs take two block-scaled operands, not a bf16 activation"
        if not problem.aligned:
            return "cuDNN frontend needs 16-byte aligned rows (N and K multiples of 32 for NVFP4, 16 for MXFP8)"
        if problem.layout in ("forward", "dgrad") and problem.fmt == "mxfp8" and problem.out_dtype == torch.float32:
            return "grouped_gemm_quant_wrapper_sm100 has no fp32 output for FP8 inputs (bf16/fp16 only)"
        if problem.layout == "wgrad" and problem.grouped_operands:
            return "wgrad needs dY and X as QuantizedTensors (one token-major matrix each), not GroupedTensors"
        return None

    def accepts(self, call: GemmCall) -> str | None:
        return _data_refusal(call) or _capture_refusal(call, call.layout)

    def note(self, problem: Problem) -> str | None:
        if problem.layout == "wgrad":
            how = "grouped_gemm_wgrad_wrapper_sm100 into the buffer as wgrad_tensor"
        else:
            how = "grouped_gemm_quant_wrapper_sm100 into the buffer as d_tensor (dense rows only)"
        rule = f"every expert's token count must be a multiple of {token_multiple(problem.layout)}"
        if problem.device_splits:
            rule += (
                ": with split sizes on the GPU a device-side assertion checks it, and a violation leaves the "
                "CUDA context unusable (no ValueError)"
            )
        pad = "pad the dispatch with grouped.backends.cudnn.padded_split_sizes"
        capture = "under graph capture only shapes that already ran once outside capture"
        return f"cuDNN frontend {how}; {rule}; {pad}; {capture}; {NOT_RUN_NOTE}"

    def run(self, call: GemmCall) -> torch.Tensor:
        out = call.output()
        with torch.cuda.device(call.device):  # the frontend launches on the current device's current stream
            if call.layout == "wgrad":
                kwargs = wgrad_arguments(call, out)
                if kwargs is None:  # no tokens: every expert's dW is zero (unchanged when accumulating)
                    return out if call.problem.accumulate else out.zero_()
                workspace_bytes = _frontend(WGRAD_WORKSPACE_SIZE)(call.num_groups)
                # one TMA-descriptor workspace per call: the caching allocator hands it out in stream order, so
                # calls on other streams never share it (the frontend's own is shared by every call of a shape)
                kwargs["descriptor_workspace"] = torch.empty(workspace_bytes, dtype=torch.uint8, device=call.device)
            else:
                kwargs = forward_arguments(call, out)
                if kwargs is None:
                    return out
            _frontend(WRAPPERS[call.layout])(**kwargs)
        _warm_signatures.add(_signature(call, call.layout))
        return out

    def swiglu_refusal(self, call: GemmCall, probs, out_dtype) -> str | None:
        return _glu_refusal(call, out_dtype) or _data_refusal(call) or _capture_refusal(call, "swiglu", probs)

    def run_swiglu(self, call: GemmCall, probs=None, out=None) -> torch.Tensor:
        m, f = call.m_total, call.out_shape[1] // 2
        if out is None and call.splits.sizes is None:  # rows past a total kept on the GPU: zeroed up front
            out = torch.zeros(m, f, dtype=torch.bfloat16, device=call.device)
        elif out is None:
            out = call.finish_new_output(torch.empty(m, f, dtype=torch.bfloat16, device=call.device))
        rows = _valid_rows(call)
        if rows == 0:
            return out
        with torch.cuda.device(call.device):
            kwargs = glu_arguments(call, probs, out[:rows])
            _glu_kernel(call, kwargs).execute(**kwargs)
        _warm_signatures.add(_signature(call, "swiglu", probs))
        return out
