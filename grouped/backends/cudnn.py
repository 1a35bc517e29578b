"""cudnn backend: MXFP8 / NVFP4 grouped GEMMs on Blackwell (sm100) through cuDNN frontend.

THIS PATH HAS NOT RUN ON HARDWARE HERE: there is no Blackwell GPU in this project.
What is tested (tests/test_cudnn.py, on the CPU) is everything up to the call into
cuDNN frontend: the exact tensors handed to it (offsets, blocked scales, strides,
dtypes, the caller's buffer as ``d_tensor``), checked against references built
from DESIGN.md's rules and against a CPU emulation of the wrappers' documented
contract; and backend selection on a simulated sm100 device.

What cuDNN frontend expects (nvidia-cudnn-frontend 1.32.0, read from its
``cudnn/gemm/cutedsl/grouped/`` sources; the three wrappers are exported lazily
from the top-level ``cudnn`` package)
------------------------------------------------------------------------------

``grouped_gemm_quant_wrapper_sm100`` (quant/api.py; class GroupedGemmQuantSm100)
    D[rows_g] = alpha[g] * (A[rows_g] * SFA) @ (B[g] * SFB)^T, per expert g.
    - ``a_tensor``: canonical 2-D (valid_m, k) row-major (k-major), FP8 E4M3, or
      packed FP4 (two codes a byte, the innermost dim is doubled). FP4 must come as
      torch.float4_e2m1fn_x2: GroupedGemmQuantSm100 and GroupedGemmGluBlockScaledAPI
      build their tensor descriptors before they set ``_interpret_uint8_as_fp4x2``,
      so a uint8 operand is measured in bytes there and its SFA size check fails
      (found by running the real wrappers on an H200, where they check every
      argument and then refuse the GPU).
      The kernel is compiled with valid_m symbolic and divisible by 256.
    - ``b_tensor``: dense weights, canonical (l, n, k) row-major (k-major); FP4
      must be k-major, FP8 may also be n-major. ``b_major="k"``.
    - ``padded_offsets``: int32 (l,), the inclusive END offset of every expert's
      rows *after padding*; ``m_aligned`` must be 256 (the kernels' FIX_PAD_SIZE:
      "each padded_offsets[i] will be a multiple of FIX_PAD_SIZE"). Every row of
      [offs[g-1], offs[g]) is computed (padding rows too); SFA is addressed by
      ``domain_offset`` at the expert's first row, so experts must start on a
      128-row scale tile (256 guarantees it).
    - ``sfa_tensor`` / ``sfb_tensor``: dense C-contiguous buffers ("flat" SF)
      holding the complete MMA-packed bytes: the blocked 128x4 layout of
      DESIGN.md (tile-row-major, byte (r%32)*16 + (r//32)%4*4 + c inside a
      tile), 512 * ceil(rows/128) * ceil(ceil(k/sf_vec_size)/4) bytes per matrix
      (``check_packed_sf``): SFA one matrix over all valid_m rows, SFB one
      matrix per expert, expert-major. dtype float8_e8m0fnu with
      ``sf_vec_size=32`` (MXFP8) or float8_e4m3fn with ``sf_vec_size=16``
      (NVFP4); other pairings raise ("combination is not supported").
    - ``alpha_tensor``: fp32 (l,), multiplies each expert's accumulator.
    - ``d_tensor``: optional caller buffer, written in place; for 2-D A it must be
      exactly shape (valid_m, n), stride (n, 1), dtype ``d_dtype`` (ValueError
      otherwise): no strided views. D dtypes: FP8 inputs -> fp16/bf16/fp8/fp4
      (NOT fp32); FP4 inputs -> fp16/bf16/fp32. ``cd_major`` must be "n".
    - Other checks that raise: expert_cnt <= 1024; 16-byte aligned major dims
      ("Invalid tensor alignment"); SM100+ compute capability (RuntimeError).
    - ``generate_amax`` (default True) allocates and reduces a per-expert amax;
      ``norm_const_tensor`` is only for FP8 outputs. No host reads of the offsets.

``grouped_gemm_wgrad_wrapper_sm100`` (wgrad/api.py, wgrad/_blockscaled_api.py)
    wgrad[e] = gs_a[e] * gs_b[e] * A[:, tokens_e] @ B[tokens_e, :].
    - ``a_tensor`` (hidden, tokens) and ``b_tensor`` (tokens, intermediate), both
      token-innermost (k-major) for FP4 ("Four-bit ... requires K-major"); packed
      FP4 (float4_e2m1fn_x2, or uint8 here) doubles the stride-1 dim. ``wgrad_tensor`` (experts, hidden,
      intermediate): any strides (its descriptor keeps them), so a strided caller
      buffer is fine; ``accumulate_on_output`` TMA-reduces into it; experts with
      no tokens get zeros (``k_tile_cnt == 0`` path).
    - ``offsets_tensor``: int32 (experts,) inclusive token end offsets; read on the
      host when the op is first built (``_validate_offsets``: non-decreasing,
      last <= tokens). The documented contract (wgrad/jax_api.py) is token ends
      that are multiples of 128; the per-expert SF descriptors
      (``WgradSfTensormapConstructor``) start expert e's scales at byte
      round_up(rows,128) * token_offset / sf_vec_size, which needs it.
    - SFA / SFB: "for each expert in order, its (round_up(rows, 128),
      tokens_e / sf_vec_size) scales in 128x4 atoms" -- i.e. the blocked layout
      applied PER EXPERT and concatenated, NOT one blocked matrix over all tokens;
      flat, round_up(rows,128) * round_up(ceil(tokens/sf_vec_size), 4) bytes.
    - NVFP4 (FP4 + E4M3 scales at 16) REQUIRES fp32 ``global_scale_a`` /
      ``global_scale_b`` (experts,); the epilogue multiplies by their product.
    - ``wgrad_dtype``: bf16/fp16/fp32; ``sf_vec_size`` as above (default 16).

``grouped_gemm_glu_wrapper_sm100`` (glu/api.py, glu/_blockscaled_api.py)
    The quant wrapper's contract for A/B/SFA/SFB/padded_offsets/alpha, plus a GLU
    epilogue: N (=2F) must be a multiple of 64, gate and up INTERLEAVED in
    32-column blocks (epilogue subtile 2j is gate, 2j+1 is up, epi_tile (128, 32));
    D[:, 32j:32j+32] = up_j * silu(gate_j) * prob. ``prob_tensor`` (valid_m,)
    contiguous. No ``d_tensor`` parameter: it allocates C (valid_m, n), D
    (valid_m, n/2) and D_col itself. FP4 inputs: c_dtype fp16/bf16, and fp32 D is
    "not supported" without bias. FP8 inputs: the wrapper ALWAYS allocates SFD
    row/col outputs (``glu_block_scaled_outputs``), so it requires
    ``norm_const_tensor`` ("sfd_row_desc, sfd_col_desc, and norm_const_desc must
    be all None or all not None", seen raised by the real wrapper) and the epilogue
    (``quant_sfd_row``) writes D divided by per-block E8M0 scales: a block-scaled
    output meant to feed the next GEMM, not the plain activation.

Decisions made here
-------------------
- Token rule: REFUSE, never pad. Forward and dgrad need every expert's token
  count to be a multiple of 256, wgrad a multiple of 128. Padding would mean
  copying A into a padded buffer and the result out of a padded temporary,
  i.e. not writing straight into the caller's buffer. The rule depends on the
  split sizes, which the selector's Problem does not carry, so it is checked
  when the call runs, before anything is written: ValueError naming the
  experts that break it (``call_refusal``). With split sizes on the GPU the
  check is a device-side assertion (``torch._assert_async``: no host sync,
  graph-safe), and the token tensor's own row count must be a multiple of 256.
- Caller buffers: forward/dgrad pass the caller's buffer (rows [:valid_m]) as
  ``d_tensor``, no copy. A strided view (row stride != N) cannot be ``d_tensor``
  and is refused at call time, never copied. wgrad passes the buffer (strided or
  not) as ``wgrad_tensor``.
- MXFP8 forward/dgrad with an fp32 output is refused (``refuses``): cuDNN has no
  fp32 D for FP8 inputs. NVFP4 serves fp32 and bf16.
- NVFP4 per-expert tensor scales: forward/dgrad fold 1/(S_a[g] * S_b[g]) into
  ``alpha_tensor`` (computed in fp64, rounded once to fp32); wgrad passes
  ``global_scale_a = 1/S_dY`` and ``global_scale_b = 1/S_X`` (fp32), whose
  product the kernel applies. MXFP8 alpha is 1.
- ``padded_offsets`` / ``offsets_tensor``: int32 inclusive ends from
  ``grouped.splits_to_offsets(..., bulk_allocate=True)`` on the operands' device
  (16-byte aligned, one allocation). Since the rule is refused rather than
  padded, they equal the plain end offsets.
- Scales: compact scales are converted with ``grouped.to_blocked`` (one matrix for
  A; one per expert for B; one per expert's token range for wgrad). A
  QuantizedTensor that already holds blocked scales is passed as is (no copy).
  E8M0 bytes are viewed as torch.float8_e8m0fnu (no copy).
- NVFP4 data goes in as torch.float4_e2m1fn_x2 views of our uint8 bytes (no copy).
- ``generate_amax=False`` (nothing here reads it). Tile shapes, clusters and
  streams are cuDNN's defaults (the current torch stream).
- wgrad needs the token-major operands as QuantizedTensors (one (rows, tokens)
  matrix, cuDNN's Tensor2D input order); GroupedTensor operands are refused.
- Fused FC1 + SwiGLU (+ probs): ``glu_arguments`` / ``CudnnBackend.run_swiglu``,
  used by grouped.fused.gemm_swiglu, for NVFP4 only (plain bf16 D). MXFP8 is not
  fused: its GLU output is block-scaled (see above) and gemm_swiglu returns plain
  activations. The weight rows are re-interleaved into 32-row gate/up blocks per
  call (a copy of the weight and its scales).
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from ..offsets import splits_to_offsets
from ..problem import GemmCall, Problem
from ..quantize import QuantizedTensor
from ..scale_layout import blocked_numel, to_blocked
from ..tensor import GroupedTensor
from .base import Backend

FORWARD_TOKEN_MULTIPLE = 256  # cuDNN frontend m_aligned / FIX_PAD_SIZE (forward, dgrad, glu)
WGRAD_TOKEN_MULTIPLE = 128  # token ends of wgrad's offsets_tensor
MAX_EXPERTS = 1024  # GroupedGemmQuantSm100 / GroupedGemmGluSm100: expert_cnt <= 1024
GLU_N_MULTIPLE = 64  # GLU: N divisible by 64 (gate/up 32-column block pairs)
GLU_BLOCK = 32  # gate/up interleave granularity along N

WRAPPERS = {
    "forward": "grouped_gemm_quant_wrapper_sm100",
    "dgrad": "grouped_gemm_quant_wrapper_sm100",
    "wgrad": "grouped_gemm_wgrad_wrapper_sm100",
    "swiglu": "grouped_gemm_glu_wrapper_sm100",
}
# sf_vec_size and the scale dtype cuDNN wants for each format.
SF_VEC_SIZE = {"mxfp8": 32, "nvfp4": 16}
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
        f"to a multiple of {multiple} when dispatching, or choose another backend"
    )


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


def _device_counts(call: GemmCall) -> torch.Tensor:
    """Per-expert token counts on the operands' device (int64), without a host sync."""
    if call.split_sizes is not None:
        return torch.tensor(call.split_sizes, dtype=torch.int64).to(call.device, non_blocking=True)
    if call.device_counts is not None:
        return call.device_counts.to(torch.int64)
    ends = call.device_offsets.to(torch.int64)
    return torch.diff(ends, prepend=ends.new_zeros(1))


def padded_offsets(call: GemmCall, counts: torch.Tensor | None = None) -> torch.Tensor:
    """int32 inclusive end offsets (G,) from splits_to_offsets, one 16-byte aligned allocation.

    The token rule is refused, not padded, so these are the plain end offsets.
    """
    counts = _device_counts(call) if counts is None else counts
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


# ---- call-level refusals ----------------------------------------------------------------------


def _valid_rows(call: GemmCall) -> int:
    """Rows handed to cuDNN for forward/dgrad: the split total (host sizes) or all rows (GPU sizes)."""
    return sum(call.split_sizes) if call.split_sizes is not None else call.m_total


def call_refusal(call: GemmCall) -> str | None:
    """Why this backend refuses this particular call (data-dependent rules the Problem cannot see)."""
    layout = call.layout
    if call.num_groups > MAX_EXPERTS:
        return (
            f"cuDNN frontend's grouped GEMMs take at most {MAX_EXPERTS} experts (expert_cnt <= 1024), "
            f"got {call.num_groups}"
        )
    if layout == "wgrad":
        if isinstance(call.a, GroupedTensor) or isinstance(call.b, GroupedTensor):
            return (
                "wgrad needs dY and X as QuantizedTensors (grouped.quantize(..., axis=0, split_sizes=...)), "
                "not GroupedTensors"
            )
        sizes = call.split_sizes if call.split_sizes is not None else call.a.split_sizes
        return token_rule_violation(layout, sizes)
    if call.split_sizes is not None:
        reason = token_rule_violation(layout, call.split_sizes)
        if reason:
            return reason
    elif call.m_total % FORWARD_TOKEN_MULTIPLE:
        return (
            f"with split sizes on the GPU the whole token tensor goes to cuDNN frontend, whose row count must be "
            f"a multiple of {FORWARD_TOKEN_MULTIPLE}; got {call.m_total} rows"
        )
    a = call.a
    if (
        call.fmt.name == "nvfp4"
        and isinstance(a, QuantizedTensor)
        and a.split_sizes is not None
        and call.split_sizes is not None
        and tuple(a.split_sizes) != tuple(call.split_sizes)
    ):
        return (
            f"a was quantized with split_sizes {list(a.split_sizes)} (one NVFP4 tensor scale per group) but the call "
            f"has {list(call.split_sizes)}; alpha is per expert, so they must match"
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


def _refuse(call: GemmCall) -> None:
    reason = call_refusal(call)
    if reason is not None:
        raise ValueError(f"cudnn backend cannot serve this call ({call.problem.describe()}): {reason}")


# ---- argument builders (plain torch: they run on CPU tensors in the tests) ------------------------


def forward_arguments(call: GemmCall, out: torch.Tensor | None = None) -> dict | None:
    """kwargs for ``cudnn.grouped_gemm_quant_wrapper_sm100``, forward (Y = X W^T) or dgrad (dX = dY W).

    ``out`` is the full output buffer (default: the call's, or a new one); rows
    [:valid_m] of it go in as ``d_tensor``, a view (same data pointer and strides).
    Returns None when there are no rows to compute. Raises ValueError (before any
    write) when the call breaks a rule this backend refuses.
    """
    if call.layout not in ("forward", "dgrad"):
        raise ValueError(f"forward_arguments is for forward and dgrad, not {call.layout}")
    _refuse(call)
    out = call.output() if out is None else out
    rows = _valid_rows(call)
    if rows == 0:
        return None
    return {
        **_blockscaled_operands(call, rows, columnwise=call.layout == "dgrad"),
        "d_dtype": out.dtype,
        "d_tensor": out[:rows],
        "generate_amax": False,
    }


def _blockscaled_operands(call: GemmCall, rows: int, *, columnwise: bool, interleave=None) -> dict:
    """The A / B / scales / offsets / alpha kwargs the quant and GLU wrappers share."""
    fmt = call.fmt.name
    counts = _device_counts(call)
    if call.split_sizes is None:
        _check_counts_on_device(counts, FORWARD_TOKEN_MULTIPLE)
    a_data, sfa, s_a = _token_operand(call.a, rows)
    b_data, sfb, s_b = _weight_operand(call.b, columnwise=columnwise, interleave=interleave)
    return {
        "a_tensor": _data_view(a_data, fmt),
        "sfa_tensor": _scale_bytes_view(sfa, fmt),
        "padded_offsets": padded_offsets(call, counts),
        "alpha_tensor": _alpha(fmt, s_a, s_b, call.num_groups, call.device),
        "b_tensor": _data_view(b_data, fmt),
        "sfb_tensor": _scale_bytes_view(sfb, fmt),
        "b_major": "k",
        "cd_major": "n",
        "sf_vec_size": SF_VEC_SIZE[fmt],
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
    """
    if call.layout != "wgrad":
        raise ValueError(f"wgrad_arguments is for wgrad, not {call.layout}")
    _refuse(call)
    fmt = call.fmt.name
    dy, x = call.a, call.b
    out = call.output() if out is None else out
    if dy.data.shape[1] == 0:
        return None
    counts = _device_counts(call)
    if call.split_sizes is None:
        _check_counts_on_device(counts, WGRAD_TOKEN_MULTIPLE)
    sizes = dy.split_sizes  # host sizes of the quantized operands (equal to the call's; checked by prepare)
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
        "offsets_tensor": padded_offsets(call, counts),
        "output_mode": "dense",
        "wgrad_tensor": out,
        "global_scale_a": gs_a,
        "global_scale_b": gs_b,
        "wgrad_dtype": out.dtype,
        "sf_vec_size": SF_VEC_SIZE[fmt],
        "accumulate_on_output": call.problem.accumulate,
    }


def glu_interleave(n: int, device=None) -> torch.Tensor:
    """Row order for GLU: position 64j + h*32 + c holds source row h*(n/2) + 32j + c (h 0 gate, 1 up)."""
    half = n // 2
    idx = torch.arange(n, device=device).view(2, half // GLU_BLOCK, GLU_BLOCK)
    return idx.transpose(0, 1).reshape(-1)


def glu_refusal(call: GemmCall, probs: torch.Tensor | None, out_dtype: torch.dtype) -> str | None:
    """Why ``grouped_gemm_glu_wrapper_sm100`` cannot serve FC1 + SwiGLU for this call (None: it can)."""
    if call.layout != "forward":
        return "the GLU wrapper fuses a forward GEMM only"
    if call.fmt.name == "mxfp8":
        return (
            "for FP8 inputs cuDNN frontend's GLU wrapper always emits a block-scaled D (SFD row/col outputs, "
            "norm_const required), not the plain activation gemm_swiglu returns"
        )
    n = call.out_shape[1]
    if n % GLU_N_MULTIPLE:
        return (
            f"the GLU wrapper needs N = 2 x ffn_hidden to be a multiple of {GLU_N_MULTIPLE} "
            f"(gate/up 32-column block pairs), got N = {n}"
        )
    if out_dtype != torch.bfloat16:
        return (
            "the GLU wrapper's fused output is used in bf16 here (no fp32 D for FP8 inputs, "
            f"nor for FP4 without bias), got {out_dtype}"
        )
    if not call.problem.aligned:
        return "the GLU wrapper needs 16-byte aligned rows"
    return call_refusal(call)


def glu_arguments(call: GemmCall, probs: torch.Tensor | None = None) -> dict | None:
    """kwargs for ``cudnn.grouped_gemm_glu_wrapper_sm100``: FC1 + SwiGLU (+ probs) in one kernel.

    Same A/SFA/padded_offsets/alpha as ``forward_arguments``; the weight rows are
    re-interleaved into 32-row gate/up blocks (our W1 has gate rows first, then
    up rows). The wrapper returns D (valid_m, n/2) bf16 in our column order.
    """
    reason = glu_refusal(call, probs, torch.bfloat16)
    if reason is not None:
        raise ValueError(f"cudnn backend cannot fuse FC1 + SwiGLU here ({call.problem.describe()}): {reason}")
    rows = _valid_rows(call)
    if rows == 0:
        return None
    perm = glu_interleave(call.out_shape[1], call.device)
    prob = None if probs is None else probs[:rows].to(torch.float32).contiguous()
    return {
        **_blockscaled_operands(call, rows, columnwise=False, interleave=perm),
        "prob_tensor": prob,
        "c_dtype": torch.bfloat16,
        "d_dtype": torch.bfloat16,
        "act_func": "swiglu",
        "generate_c": False,
    }


def _wrapper(name: str):
    import cudnn  # lazily: an optional extra, never imported by `import grouped`

    try:
        return getattr(cudnn, name)
    except (AttributeError, ImportError) as e:
        version = getattr(cudnn, "__version__", "unknown")
        raise ImportError(
            f"cudnn backend: nvidia-cudnn-frontend {version} does not provide {name} ({e}); "
            "install nvidia-cudnn-frontend>=1.32 (pip install 'grouped-gemm[blackwell]')"
        ) from e


class CudnnBackend(Backend):
    name = "cudnn"
    formats = ("mxfp8", "nvfp4")
    graph_safe = True  # offsets, alpha and scales are built on the device; the first call compiles

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
        if not problem.aligned:
            return "cuDNN frontend needs 16-byte aligned rows (N and K multiples of 32 for NVFP4, 16 for MXFP8)"
        if problem.layout in ("forward", "dgrad") and problem.fmt == "mxfp8" and problem.out_dtype == torch.float32:
            return "grouped_gemm_quant_wrapper_sm100 has no fp32 output for FP8 inputs (bf16/fp16 only)"
        if problem.layout == "wgrad" and problem.grouped_operands:
            return "wgrad needs dY and X as QuantizedTensors (one token-major matrix each), not GroupedTensors"
        return None

    def note(self, problem: Problem) -> str | None:
        if problem.layout == "wgrad":
            how = "grouped_gemm_wgrad_wrapper_sm100 into the buffer as wgrad_tensor"
        else:
            how = "grouped_gemm_quant_wrapper_sm100 into the buffer as d_tensor (dense rows only)"
        multiple = token_multiple(problem.layout)
        return (
            f"cuDNN frontend {how}; every expert's token count must be a multiple of {multiple} "
            f"(refused at call time otherwise, never padded); {NOT_RUN_NOTE}"
        )

    def run(self, call: GemmCall) -> torch.Tensor:
        out = call.output()
        if call.layout == "wgrad":
            kwargs = wgrad_arguments(call, out)
            if kwargs is None:  # no tokens: every expert's dW is zero (unchanged when accumulating)
                return out if call.problem.accumulate else out.zero_()
        else:
            kwargs = forward_arguments(call, out)
            if kwargs is None:
                return out
        _wrapper(WRAPPERS[call.layout])(**kwargs)
        return out

    def run_swiglu(self, call: GemmCall, probs: torch.Tensor | None = None) -> torch.Tensor:
        """FC1 + SwiGLU (+ probs) fused: D (valid_m, N/2) bf16, as the GLU wrapper allocated it."""
        kwargs = glu_arguments(call, probs)
        if kwargs is None:
            return torch.empty(0, call.out_shape[1] // 2, dtype=torch.bfloat16, device=call.device)
        result = _wrapper(WRAPPERS["swiglu"])(**kwargs)
        return result["d_tensor"]
