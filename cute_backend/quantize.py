"""BF16 / FP32 -> MXFP8 and NVFP4 quantize kernels, rowwise and group-aware columnwise.

Bit-exact with the torch reference ``grouped.quantize`` (grouped/formats.py,
grouped/elements.py): the same fp32 operations in the same order, each a
correctly rounded PTX instruction (``mul.rn.f32``, ``div.rn.f32``, no ftz),
E4M3 by ``cvt.rn.satfinite.e4m3x2.f32``, the E8M0 exponent worked out on bit
patterns, the E2M1 rounding by correctly rounded fp32 adds onto 2^23 (see
quantize_kernel._e2m1_block_ptx). Block amaxes are integer maxima of the
fp32 bit patterns with the sign cleared (finite < Inf < NaN, NaN never
dropped); a block is non-finite iff that maximum is >= 0x7F800000, and gets
the NaN scale (E8M0 0xFF / E4M3 0x7F) with E4M3 NaN elements (MXFP8, 0x7F)
or zero codes (NVFP4).

SIMT kernels, one thread per block of 32 (MXFP8) or 16 (NVFP4) elements.

Rowwise (blocks along the last dim), ``quantize_rowwise``:
    x (R, K) contiguous bf16/fp32, K a multiple of the block;
    MXFP8: data (R, K) float8_e4m3fn, scale (R, K/32) uint8 (E8M0);
    NVFP4: data (R, K/2) uint8 (first element in the low nibble),
           scale (R, K/16) float8_e4m3fn, row_scale (R,) fp32: the per-tensor
           S of the member each row belongs to (grouped.formats
           NVFP4Format.global_scale; the torch reference broadcasts it the
           same way, grouped.quantize._Geometry.broadcast_global_scale).
    Adjacent threads take adjacent blocks of a row: 16-byte vector loads
    and stores, coalesced scale bytes.

Columnwise (blocks down the rows, per group), ``quantize_columnwise``:
    x (M, K) contiguous; the rows form groups; group g's rows are quantized
    in blocks that restart at the group's first row, the last one zero-padded;
    the output is transposed: column k of group g, block j, goes to
    ``data`` bytes  [DATA_OFFSET_g + k * DATA_STRIDE_g + j * block / epb, ...)
    (epb = elements per byte: 1 MXFP8, 2 NVFP4) and its scale byte to
    ``scale`` byte  SCALE_OFFSET_g + k * SCALE_STRIDE_g + j.
    Threads of a CTA take consecutive columns of one padded block: coalesced
    loads down the rows; each thread writes its block's bytes (32 B MXFP8,
    8 B NVFP4) with one or two vector stores.

The group table
---------------
``groups`` is a (G, TABLE_COLS) int64 CUDA tensor, one row a group:

    ROW_START     first row of the group in x
    ROWS          m_g, rows in the group (0 allowed: the group writes nothing)
    BLOCK_START   padded blocks of the groups before it: sum_{h<g} ceil(m_h / block)
                  (non-decreasing; it numbers the blocks the grid runs over)
    DATA_OFFSET   byte offset of the group's (column 0, block 0) in ``data``
    DATA_STRIDE   bytes from one column k to the next (a row of the stored,
                  transposed data)
    SCALE_OFFSET  byte offset of the group's (column 0, block 0) in ``scale``
    SCALE_STRIDE  bytes from one column to the next in ``scale``
    (column 7)    reserved, 0

``data`` and ``scale`` are any contiguous 1-byte tensors (a (K, P) matrix or a
flat byte buffer): the kernel sees their bytes. Offsets and strides must keep
each block's data 16-byte aligned (MXFP8) / 8-byte aligned (NVFP4) — true for
both uses below. Entries are read on the device and trusted: a table that
points past x reads zeros, and writes past ``data`` / ``scale`` are dropped
(never out-of-bounds memory), but neither is reported.

``group_table`` builds it with torch ops on the device of the split sizes (no
host sync, so it can be captured in a CUDA graph):
- grouped.quantize(x, f, axis=0, split_sizes=s): one (K, P) matrix,
  ``group_table(s, f, data_row_bytes=data.shape[1], scale_row_bytes=scale.shape[1])``:
  offsets are the padded prefix (BLOCK_START * block / epb bytes of data,
  BLOCK_START bytes of scale), strides the row lengths;
- GroupedTensor columnwise regions ((K, pad(m_g)) at their own byte offsets
  in the flat ``columnwise_data`` / ``columnwise_scale`` buffers): pass
  ``data_offsets``, ``data_strides`` (= pad(m_g) / epb), ``scale_offsets``,
  ``scale_strides`` (= pad(m_g) / block) per group.

The grid is sized from host numbers only: ceil(M / block) + G blocks (an upper
bound on sum_g ceil(m_g / block)) times ceil(K / COL_THREADS); a CTA finds its
group by binary search on BLOCK_START and returns when its block is past the
group's end. NVFP4 takes ``col_scale`` (G,) fp32, each group's S.

Both directions in one pass over x, ``quantize_both``, and NVFP4's per-group
finite amax, ``group_amax``: see the notes above their code below.

Host side here (checks, compile entry, launch; no cutlass import — works on a
machine with no GPU when CUTE_DSL_ARCH is set); device code in
quantize_kernel.py, imported only to compile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .cache import ARCH, CACHE, KernelSpec, compile_kernel
from .device import sm_count

ROW_THREADS = 128  # threads a CTA, rowwise: one block each
COL_THREADS = 128  # threads a CTA, columnwise: one column each
FORMATS = ("mxfp8", "nvfp4")
INPUT_DTYPES = (torch.bfloat16, torch.float32)
DIRECTIONS = ("rowwise", "columnwise")
BLOCK = {"mxfp8": 32, "nvfp4": 16}
ELEMENTS_PER_BYTE = {"mxfp8": 1, "nvfp4": 2}
DATA_DTYPE = {"mxfp8": torch.float8_e4m3fn, "nvfp4": torch.uint8}
SCALE_DTYPE = {"mxfp8": torch.uint8, "nvfp4": torch.float8_e4m3fn}
DATA_ALIGN = {"mxfp8": 16, "nvfp4": 8}  # bytes: where a columnwise block's data may start

# fused rowwise + columnwise (quantize_both) and the per-group amax (group_amax)
FUSED_THREADS = 128  # threads a CTA
FUSED_ROWS = 128  # rows of a tile: 4 MXFP8 / 8 NVFP4 padded blocks
FUSED_COLS = 64  # columns of a tile
# by (format, input bits): cp.async stages (compiled in), resident CTAs an SM (the persistent
# grid; shared memory and registers allow it), and neighbouring column tiles a CTA takes in a
# row as its unit of work (a run-time argument). bf16: the fastest of a sweep on an H200
# (stages 2-3, 2-4 CTAs, units of 1-4 tiles); fp32: what fits (64 KB of stages a CTA).
FUSED_STAGES = {("mxfp8", 16): 2, ("nvfp4", 16): 2, ("mxfp8", 32): 2, ("nvfp4", 32): 2}
FUSED_CTAS_PER_SM = {("mxfp8", 16): 3, ("nvfp4", 16): 4, ("mxfp8", 32): 2, ("nvfp4", 32): 2}
FUSED_CT_GROUP = {("mxfp8", 16): 2, ("nvfp4", 16): 2, ("mxfp8", 32): 2, ("nvfp4", 32): 2}
_GRID_LIMIT: int | None = None  # tests cap the persistent grid, so each CTA runs a long pipeline
# bf16 x (quantize_both): MXFP8 by the register-tile kernel (quantize_kernel.fused2_kernel): rows
# a lane (16 or 32), warps a CTA (side by side in columns), the load instruction, CTAs an SM of a
# persistent grid (0: one CTA a tile), the tile order (bands of group_rows row tiles,
# quantize_kernel._tile_rc) and whether a row's block scales of the CTA's warps are staged into
# one store (rl 16, 2 or 4 warps). 32768 x 7168 on an H200, one run (copy 4213 GB/s): this 0.322
# ms (70.4% of copy); group_rows 4 0.323, 16 0.330, 32 0.350; 2 warps 0.345; loads ld.global.cg
# 0.325, ld.global.nc 0.357, ld.global.L1::no_allocate 0.369, ld.global.lu with st.global.cs
# stores 0.329; a persistent grid of 3 CTAs an SM 0.339. Earlier (read-only loads): rl 32 0.476,
# group_rows 1 (column tile fastest) 0.426, 2^20 (row tile fastest) 0.425; the shared-memory
# kernel 0.421.
FUSED2 = dict(rl=16, warps=4, ld="ld.global", ctas_per_sm=0, group_rows=8, stage_rows=True)
# NVFP4 by the per-warp shared-memory kernel (quantize_kernel.fused3_kernel): warps a CTA, CTAs an
# SM (a warp takes 17 KB of shared memory with one stage, 33 KB with two), the same tile order,
# and the stages. An earlier H200 run, shared-memory kernel 0.463 ms: this 0.387 ms; warps 4 x 3 CTAs 0.384;
# 8 or 10 one-warp CTAs 0.44; two stages (6 warps an SM) 0.518.
FUSED3 = dict(warps=1, ctas_per_sm=12, group_rows=16, stages=1)
AMAX_ROWS = 32  # group_amax's tile: rows (two NVFP4 blocks) ...
AMAX_COLS = 256  # ... and columns
AMAX_CTAS_PER_SM = {16: 8, 32: 4}  # resident CTAs an SM (registers), by input bits

# group table columns
TABLE_COLS = 8
ROW_START, ROWS, BLOCK_START, DATA_OFFSET, DATA_STRIDE, SCALE_OFFSET, SCALE_STRIDE = range(7)

_SOURCES = (__file__, str(Path(__file__).with_name("quantize_kernel.py")))


def _fmt_name(fmt) -> str | None:
    name = getattr(fmt, "name", fmt)
    return name.lower() if isinstance(name, str) and name.lower() in FORMATS else None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---- checks -------------------------------------------------------------------------------


def _check_x(x, fmt: str, *, rowwise: bool) -> str | None:
    if not isinstance(x, torch.Tensor):
        return f"x must be a torch.Tensor, got {type(x).__name__}"
    if x.device.type != "cuda":
        return f"x must be on a CUDA device, got {x.device}"
    if x.dtype not in INPUT_DTYPES:
        return f"x must be bf16 or fp32, got {x.dtype}"
    if x.dim() != 2:
        return f"x must be 2-D, got shape {tuple(x.shape)}"
    if not x.is_contiguous():
        return "x must be contiguous"
    if rowwise:
        if x.shape[1] % BLOCK[fmt]:
            return f"x's last dim {x.shape[1]} is not a multiple of the {fmt} block size {BLOCK[fmt]}"
        if x.data_ptr() % 16:
            return "x must start 16-byte aligned"
    return None


def _check_bytes(name: str, t, allowed: tuple, device, *, align: int) -> str | None:
    if not isinstance(t, torch.Tensor):
        return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if t.device != device:
        return f"{name} is on {t.device}, x on {device}"
    if t.dtype not in allowed:
        return f"{name} must have dtype {' or '.join(str(d) for d in allowed)}, got {t.dtype}"
    if not t.is_contiguous():
        return f"{name} must be contiguous"
    if t.data_ptr() % align:
        return f"{name} must start {align}-byte aligned"
    return None


def _check_global_scale(name: str, s, n: int, device, fmt: str) -> str | None:
    if fmt == "mxfp8":
        return None if s is None else f"{name} is for NVFP4 only; MXFP8 has no per-tensor scale"
    if not isinstance(s, torch.Tensor):
        return f"NVFP4 needs {name}, a ({n},) fp32 tensor of per-tensor scales S"
    if s.device != device or s.dtype != torch.float32 or tuple(s.shape) != (n,) or not s.is_contiguous():
        return (
            f"{name} must be a contiguous ({n},) fp32 tensor on {device}, "
            f"got shape {tuple(s.shape)}, {s.dtype} on {s.device}"
        )
    return None


def can_implement_rowwise(x, fmt_name, data, scale, row_scale=None) -> str | None:
    """None if quantize_rowwise can run this call, else why not."""
    fmt = _fmt_name(fmt_name)
    if fmt is None:
        return f"fmt must be one of {FORMATS}, got {fmt_name!r}"
    reason = _check_x(x, fmt, rowwise=True) or _check_rowwise_outputs(x, fmt, ("data", data), ("scale", scale), 1)
    if reason:
        return reason
    return _check_global_scale("row_scale", row_scale, x.shape[0], x.device, fmt)


def _check_rowwise_outputs(x, fmt: str, data: tuple, scale: tuple, scale_align: int) -> str | None:
    """The rowwise data and scale buffers ((name, tensor) each) for x: dtype (or uint8), device,
    alignment (data 16 bytes, scale ``scale_align``) and shape."""
    rows, k = x.shape
    for (name, t), dtype, shape, align in (
        (data, DATA_DTYPE[fmt], (rows, k // ELEMENTS_PER_BYTE[fmt]), 16),
        (scale, SCALE_DTYPE[fmt], (rows, k // BLOCK[fmt]), scale_align),
    ):
        reason = _check_bytes(name, t, (dtype, torch.uint8), x.device, align=align)
        if reason:
            return reason
        if tuple(t.shape) != shape:
            return f"{name} must have shape {shape} for x of shape {tuple(x.shape)} ({fmt}), got {tuple(t.shape)}"
    return None


def can_implement_columnwise(x, fmt_name, data, scale, groups, col_scale=None) -> str | None:
    """None if quantize_columnwise can run this call, else why not."""
    fmt = _fmt_name(fmt_name)
    if fmt is None:
        return f"fmt must be one of {FORMATS}, got {fmt_name!r}"
    reason = _check_x(x, fmt, rowwise=False)
    if reason:
        return reason
    reason = _check_groups(groups, x)
    if reason:
        return reason
    reason = _check_bytes("data", data, (DATA_DTYPE[fmt], torch.uint8), x.device, align=16) or _check_bytes(
        "scale", scale, (SCALE_DTYPE[fmt], torch.uint8), x.device, align=1
    )
    if reason:
        return reason
    if data.numel() % 4:
        return f"data must hold a multiple of 4 bytes, got {data.numel()}"
    grid_blocks = _ceil_div(x.shape[0], BLOCK[fmt]) + groups.shape[0]
    if grid_blocks >= 2**31 or _ceil_div(x.shape[1], COL_THREADS) >= 2**16:
        return f"x of shape {tuple(x.shape)} is too large for one launch"
    return _check_global_scale("col_scale", col_scale, groups.shape[0], x.device, fmt)


# ---- the group table ----------------------------------------------------------------------


def _per_group(value, n: int, device, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.shape != (n,):
            raise ValueError(f"group_table: {name} must have {n} entries, got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=torch.int64)
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.full((n,), value, dtype=torch.int64, device=device)
    if isinstance(value, Sequence) and len(value) == n and all(isinstance(v, int) for v in value):
        return torch.tensor(list(value), dtype=torch.int64).to(device)
    raise ValueError(f"group_table: {name} must be an int, a list of {n} ints or a ({n},) tensor, got {value!r:.80}")


def group_table(
    split_sizes,
    fmt_name,
    *,
    data_row_bytes: int | None = None,
    scale_row_bytes: int | None = None,
    data_offsets=None,
    data_strides=None,
    scale_offsets=None,
    scale_strides=None,
    row_starts=None,
    device=None,
) -> torch.Tensor:
    """The (G, TABLE_COLS) int64 group table of quantize_columnwise (see the module doc).

    split_sizes: a 1-D int tensor (kept on its device: no sync) or a list of ints.
    Defaults: groups are consecutive rows of x (ROW_START the prefix sum),
    data / scale offsets the padded prefix of one (K, P) matrix; pass
    ``data_row_bytes`` (= P / epb) and ``scale_row_bytes`` (= P / block) for it.
    Each of data_offsets, data_strides, scale_offsets, scale_strides,
    row_starts overrides the default with an int, a list or a (G,) tensor.
    """
    fmt = _fmt_name(fmt_name)
    if fmt is None:
        raise ValueError(f"group_table: fmt must be one of {FORMATS}, got {fmt_name!r}")
    block, epb = BLOCK[fmt], ELEMENTS_PER_BYTE[fmt]
    if isinstance(split_sizes, torch.Tensor):
        if split_sizes.dim() != 1 or split_sizes.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"group_table: split_sizes must be a 1-D int32/int64 tensor, got {tuple(split_sizes.shape)} "
                f"{split_sizes.dtype}"
            )
        m = split_sizes.to(device=device or split_sizes.device, dtype=torch.int64)
    else:
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in split_sizes):
            raise ValueError(f"group_table: split_sizes must be non-negative ints, got {split_sizes!r:.80}")
        m = torch.tensor(list(split_sizes), dtype=torch.int64).to(device or "cpu")
    n = m.shape[0]
    for name, value in (("data_offsets", data_offsets), ("data_strides", data_strides),
                        ("data_row_bytes", data_row_bytes)):
        host = [value] if isinstance(value, int) else value
        if isinstance(host, Sequence) and any(v % DATA_ALIGN[fmt] for v in host):
            raise ValueError(f"group_table: {fmt} {name} must be multiples of {DATA_ALIGN[fmt]} bytes, got {value}")
    if data_strides is None and data_row_bytes is None:
        raise ValueError("group_table: give data_strides or data_row_bytes")
    if scale_strides is None and scale_row_bytes is None:
        raise ValueError("group_table: give scale_strides or scale_row_bytes")

    def given(value, name):
        return _per_group(value, n, m.device, name)

    n_blocks = torch.div(m + (block - 1), block, rounding_mode="floor")
    block_start = torch.cumsum(n_blocks, 0) - n_blocks
    columns = [torch.zeros_like(m)] * TABLE_COLS
    columns[ROW_START] = torch.cumsum(m, 0) - m if row_starts is None else given(row_starts, "row_starts")
    columns[ROWS] = m
    columns[BLOCK_START] = block_start
    columns[DATA_OFFSET] = block_start * (block // epb) if data_offsets is None else given(data_offsets, "data_offsets")
    columns[DATA_STRIDE] = given(data_row_bytes if data_strides is None else data_strides, "data_strides")
    columns[SCALE_OFFSET] = block_start if scale_offsets is None else given(scale_offsets, "scale_offsets")
    columns[SCALE_STRIDE] = given(scale_row_bytes if scale_strides is None else scale_strides, "scale_strides")
    return torch.stack(columns, dim=1).contiguous()


# ---- compile ------------------------------------------------------------------------------


def _spec(fmt: str, input_dtype: torch.dtype, direction: str) -> KernelSpec:
    threads = ROW_THREADS if direction == "rowwise" else COL_THREADS
    config = (fmt, str(input_dtype), direction, threads, TABLE_COLS)
    return KernelSpec(f"quantize_{fmt}_{direction}", config, ARCH, _SOURCES)


def _flat(dtype, align=None):
    """A fake 1-D tensor of symbolic (64-bit) length, to compile against; ``dtype`` a cutlass type or
    a torch input dtype."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor

    dtype = {torch.bfloat16: cutlass.BFloat16, torch.float32: cutlass.Float32}.get(dtype, dtype)
    return make_fake_compact_tensor(dtype, (cute.sym_int(64),), assumed_align=align)


def compile_config(fmt: str, input_dtype: torch.dtype, direction: str):
    """Compile one kernel config (a TVM-FFI compiled function); no GPU needed."""
    import cutlass

    from . import quantize_kernel as k

    x = _flat(input_dtype, 16 if direction == "rowwise" else None)
    words, scale = _flat(cutlass.Int32, 16), _flat(cutlass.Uint8, 1)
    s = _flat(cutlass.Float32, 4)
    if direction == "rowwise":
        if fmt == "mxfp8":
            return compile_kernel(k.rowwise_mxfp8_host, x, words, scale, cutlass.Int64(1))
        return compile_kernel(k.rowwise_nvfp4_host, x, words, scale, s, cutlass.Int64(1), cutlass.Int64(1))
    table = _flat(cutlass.Int64, 16)
    # n_groups, steps, K, x numel, data words, scale bytes, grid blocks (64-bit sizes travel as
    # scalars: the DSL reads tensor extents back as Int32)
    scalars = (cutlass.Int32(1), cutlass.Int32(0), *[cutlass.Int64(1)] * 4, cutlass.Int32(1))
    if fmt == "mxfp8":
        return compile_kernel(k.columnwise_mxfp8_host, x, table, words, scale, *scalars)
    return compile_kernel(k.columnwise_nvfp4_host, x, table, words, scale, s, *scalars)


def configs() -> list:
    """(spec, build) of every config: format x input dtype x direction."""
    return [
        (_spec(f, d, r), (lambda f=f, d=d, r=r: compile_config(f, d, r)))
        for f in FORMATS
        for d in INPUT_DTYPES
        for r in DIRECTIONS
    ] + fused_configs()


def kernel(fmt: str, input_dtype: torch.dtype, direction: str):
    return CACHE.get(_spec(fmt, input_dtype, direction), lambda: compile_config(fmt, input_dtype, direction))


# ---- launch -------------------------------------------------------------------------------


def _words(data: torch.Tensor) -> torch.Tensor:
    return data.view(torch.uint8).reshape(-1).view(torch.int32)


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


def quantize_rowwise(x, fmt_name, data, scale, row_scale=None) -> None:
    """Quantize x (R, K) with blocks along K into ``data`` / ``scale`` (see the module doc)."""
    reason = can_implement_rowwise(x, fmt_name, data, scale, row_scale)
    if reason:
        raise ValueError(f"quantize_rowwise: {reason}")
    if x.numel() == 0:
        return
    fmt = _fmt_name(fmt_name)
    n_blocks = x.numel() // BLOCK[fmt]
    args = [x.view(-1), _words(data), scale.view(torch.uint8).reshape(-1)]
    if fmt == "nvfp4":
        args += [row_scale, n_blocks, x.shape[1] // BLOCK[fmt]]
    else:
        args.append(n_blocks)
    with torch.cuda.device(x.device):
        kernel(fmt, x.dtype, "rowwise")(*args, _stream(x))


def quantize_columnwise(x, fmt_name, data, scale, groups, col_scale=None) -> None:
    """Quantize the row groups of x (M, K) with blocks down the rows, transposed (see the module doc)."""
    reason = can_implement_columnwise(x, fmt_name, data, scale, groups, col_scale)
    if reason:
        raise ValueError(f"quantize_columnwise: {reason}")
    n_groups = groups.shape[0]
    rows, k = x.shape
    if x.numel() == 0 or n_groups == 0 or data.numel() == 0:
        return
    fmt = _fmt_name(fmt_name)
    grid_blocks = _ceil_div(rows, BLOCK[fmt]) + n_groups
    steps = (n_groups - 1).bit_length()  # binary-search steps over BLOCK_START
    args = [x.view(-1), groups.view(-1), _words(data), scale.view(torch.uint8).reshape(-1)]
    if fmt == "nvfp4":
        args.append(col_scale)
    with torch.cuda.device(x.device):
        sizes = (k, x.numel(), data.numel() // 4, scale.numel())
        kernel(fmt, x.dtype, "columnwise")(*args, n_groups, steps, *sizes, grid_blocks, _stream(x))


# ---- fused rowwise + columnwise, and the per-group finite amax ---------------------------------
#
# quantize_both(x, fmt, row_data, row_scale, col_data, col_scale, groups, row_scale_s, col_scale_s)
#     One pass over x: the bytes of quantize_rowwise (for the rows that belong
#     to a group) and of quantize_columnwise (same group table), x read once.
#     Three kernels, the same bytes: bf16 x goes to fused2_kernel (MXFP8,
#     registers, FUSED2) or fused3_kernel (NVFP4, shared memory per warp,
#     FUSED3) -- their notes are in quantize_kernel.py; fp32 x (and bf16 x too
#     large for 32-bit tile numbers) to the shared-memory tile kernel below.
#     Tiles of FUSED_ROWS rows x FUSED_COLS columns; a tile's rows are
#     FUSED_ROWS / block consecutive padded blocks of the group table (the
#     numbering the columnwise kernel's grid runs over), each block's rows from
#     its own group: rows past the group's end (and columns past K) load as
#     zeros, so a columnwise block never straddles a group, and are not written
#     rowwise. Rows that belong to no group are written in neither direction.
#     A persistent grid (FUSED_CTAS_PER_SM CTAs an SM) takes units of
#     FUSED_CT_GROUP neighbouring column tiles of one row tile, row tile
#     fastest, grid-stride: CTAs running together work on neighbouring rows of
#     the same columns, so the pieces of each transposed output row are written
#     together. A CTA loads its tiles by 16-byte cp.async, FUSED_STAGES deep
#     (XOR-swizzled chunks: no bank conflicts); a few threads look up each
#     tile's blocks in the group table ahead of time into shared memory; each
#     thread quantizes one row of the tile (two 32-element segments) and two
#     columns of 32 rows, into shared staging buffers (again swizzled), which
#     the CTA then writes out with 16-byte stores, a warp covering whole
#     128-byte runs of the column output (64 columns x one 128-byte line for
#     MXFP8) and of the row output.
#     NVFP4: col_scale_s (G,) fp32 is each group's S; row_scale_s (R,) fp32 is
#     each row's S, or None to use its group's S (the same value wherever rows
#     and groups correspond, as in grouped.quantize and GroupedTensor).
#     Numerics: the block codecs of quantize_kernel.py, the same as the
#     one-direction kernels, byte for byte.
#
# group_amax(x, groups, global_scale) -> amax
#     NVFP4's per-group finite amax and S in one pass: returns amax (G,) int32
#     (fp32 bit patterns, view them as float32), by atomic max the largest |x|
#     over the finite elements of each group's rows (NaN / Inf ignored), and
#     writes global_scale (G,) fp32, each group's S by the rule of
#     grouped.formats (fp32(2688 / amax) capped at the largest finite fp32, 1
#     where amax = 0): the amaxes live in a zeroed (G + 1,) buffer whose last
#     entry counts the CTAs done, and the last one turns them into S, so S
#     costs no further launch. Groups are those of the table (the NVFP4 group
#     table: blocks of 16). The amax is exact: a max of bit patterns, no
#     arithmetic. A CTA streams along its rows (a contiguous run of AMAX_ROWS x
#     AMAX_COLS tiles) and does one atomic max a group it met.


def _check_groups(groups, x) -> str | None:
    if not isinstance(groups, torch.Tensor):
        return f"groups must be the (G, {TABLE_COLS}) int64 table of group_table(), got {type(groups).__name__}"
    if (
        groups.device != x.device or groups.dtype != torch.int64 or groups.dim() != 2
        or groups.shape[1] != TABLE_COLS or not groups.is_contiguous()
    ):
        return (
            f"groups must be a contiguous (G, {TABLE_COLS}) int64 tensor on {x.device} (see group_table), "
            f"got shape {tuple(groups.shape)}, {groups.dtype} on {groups.device}"
        )
    if groups.data_ptr() % 16:
        return "groups must start 16-byte aligned"
    return None


def can_implement_both(x, fmt_name, row_data, row_scale, col_data, col_scale, groups,
                       row_scale_s=None, col_scale_s=None) -> str | None:
    """None if quantize_both can run this call, else why not."""
    fmt = _fmt_name(fmt_name)
    if fmt is None:
        return f"fmt must be one of {FORMATS}, got {fmt_name!r}"
    reason = _check_x(x, fmt, rowwise=True) or _check_groups(groups, x) or _check_rowwise_outputs(
        x, fmt, ("row_data", row_data), ("row_scale", row_scale), 4
    )
    if reason:
        return reason
    rows, k = x.shape
    reason = _check_bytes("col_data", col_data, (DATA_DTYPE[fmt], torch.uint8), x.device, align=16) or _check_bytes(
        "col_scale", col_scale, (SCALE_DTYPE[fmt], torch.uint8), x.device, align=1
    )
    if reason:
        return reason
    if rows * k >= 2**62 or groups.shape[0] >= 2**31:
        return f"x of shape {tuple(x.shape)} is too large for one launch"
    if fmt == "mxfp8":
        if row_scale_s is not None or col_scale_s is not None:
            return "row_scale_s / col_scale_s are for NVFP4 only; MXFP8 has no per-tensor scale"
        return None
    reason = _check_global_scale("col_scale_s", col_scale_s, groups.shape[0], x.device, fmt)
    if reason or row_scale_s is None:
        return reason
    return _check_global_scale("row_scale_s", row_scale_s, rows, x.device, fmt)


def can_implement_amax(x, groups, global_scale) -> str | None:
    """None if group_amax can run this call, else why not."""
    reason = _check_x(x, "nvfp4", rowwise=False) or _check_groups(groups, x)
    if reason:
        return reason
    if x.shape[1] % 16 or x.data_ptr() % 16:
        return "x's last dim must be a multiple of 16 and x 16-byte aligned"
    return _check_global_scale("global_scale", global_scale, groups.shape[0], x.device, "nvfp4")


def _fused_spec(fmt: str, input_dtype: torch.dtype) -> KernelSpec:
    bits = 16 if input_dtype == torch.bfloat16 else 32
    config = (fmt, str(input_dtype), "both", FUSED_THREADS, FUSED_ROWS, FUSED_COLS, FUSED_STAGES[(fmt, bits)],
              TABLE_COLS)
    return KernelSpec(f"quantize_{fmt}_both", config, ARCH, _SOURCES)


def _fused2_spec(rl: int, warps: int, ld: str, stage_rows: bool) -> KernelSpec:
    config = ("mxfp8", "torch.bfloat16", "both-registers", rl, warps, ld, stage_rows, FUSED_ROWS, TABLE_COLS)
    return KernelSpec("quantize_mxfp8_both_r", config, ARCH, _SOURCES)


def _fused2_key(c: dict) -> tuple:
    """(rl, warps, ld, stage_rows): what a fused2 compile depends on (staging only for rl 16 and 2 or 4
    warps: 2- or 4-byte row stores)."""
    return c["rl"], c["warps"], c["ld"], bool(c["stage_rows"] and c["rl"] == 16 and c["warps"] in (2, 4))


def _fused_bf16_tensors():
    """x, table, row data / scales, column data / scales of the bf16 fused kernels, to compile against."""
    import cutlass

    return (_flat(torch.bfloat16, 16), _flat(cutlass.Int64, 16), _flat(cutlass.Uint8, 16), _flat(cutlass.Uint8, 4),
            _flat(cutlass.Uint8, 16), _flat(cutlass.Uint8, 1))


def compile_fused2(rl: int, warps: int, ld: str, stage_rows: bool):
    """Compile the bf16 MXFP8 register-tile quantize_both (a TVM-FFI compiled function); no GPU needed."""
    import cutlass

    from . import quantize_kernel as k

    scalars = (cutlass.Int32(1), cutlass.Int32(0), cutlass.Int64(1), cutlass.Int64(1), cutlass.Int64(1),
               cutlass.Int64(1), cutlass.Int32(1), cutlass.Int32(1))
    return compile_kernel(k.fused2_mxfp8_host, *_fused_bf16_tensors(), *scalars, rl, warps, ld, stage_rows)


def _fused3_spec(warps: int, stages: int) -> KernelSpec:
    config = ("nvfp4", "torch.bfloat16", "both-warp-smem", warps, stages, FUSED_ROWS, TABLE_COLS)
    return KernelSpec("quantize_nvfp4_both_w", config, ARCH, _SOURCES)


def compile_fused3(warps: int, stages: int):
    """Compile the bf16 NVFP4 per-warp shared-memory quantize_both; no GPU needed."""
    import cutlass

    from . import quantize_kernel as k

    s_row, s_col = _flat(cutlass.Float32, 4), _flat(cutlass.Float32, 4)
    scalars = (cutlass.Int32(1), cutlass.Int32(0), cutlass.Int64(1), cutlass.Int64(1), cutlass.Int32(0),
               cutlass.Int64(1), cutlass.Int64(1), cutlass.Int32(1), cutlass.Int32(1))
    return compile_kernel(k.fused3_nvfp4_host, *_fused_bf16_tensors(), s_row, s_col, *scalars, warps, stages)


def _amax_spec(input_dtype: torch.dtype) -> KernelSpec:
    config = (str(input_dtype), FUSED_THREADS, AMAX_ROWS, AMAX_COLS, TABLE_COLS)
    return KernelSpec("quantize_nvfp4_group_amax", config, ARCH, _SOURCES)


def compile_fused(fmt: str, input_dtype: torch.dtype):
    """Compile quantize_both for one format and input dtype (a TVM-FFI compiled function); no GPU needed."""
    import cutlass

    from . import quantize_kernel as k

    x, table = _flat(input_dtype, 16), _flat(cutlass.Int64, 16)
    row_data, row_scale = _flat(cutlass.Uint8, 16), _flat(cutlass.Uint8, 1)
    col_data, col_scale = _flat(cutlass.Uint8, 16), _flat(cutlass.Uint8, 1)
    head = (cutlass.Int32(1), cutlass.Int32(0), cutlass.Int64(1), cutlass.Int64(1))  # n_groups, steps, M, K
    tail = (cutlass.Int64(1), cutlass.Int64(1), cutlass.Int32(1), cutlass.Int32(1))  # col bytes, ct_group, grid
    tensors = (x, table, row_data, row_scale, col_data, col_scale)
    if fmt == "mxfp8":
        return compile_kernel(k.fused_mxfp8_host, *tensors, *head, *tail)
    s_row, s_col = _flat(cutlass.Float32, 4), _flat(cutlass.Float32, 4)
    return compile_kernel(k.fused_nvfp4_host, *tensors, s_row, s_col, *head, cutlass.Int32(0), *tail)


def compile_amax(input_dtype: torch.dtype):
    import cutlass

    from . import quantize_kernel as k

    return compile_kernel(k.amax_host, _flat(input_dtype, 16), _flat(cutlass.Int64, 16), _flat(cutlass.Int32, 4),
                          _flat(cutlass.Float32, 4), cutlass.Int32(1), cutlass.Int32(0), cutlass.Int64(1),
                          cutlass.Int64(1), cutlass.Int32(1))


def fused_configs() -> list:
    return [
        (_fused_spec(f, d), (lambda f=f, d=d: compile_fused(f, d))) for f in FORMATS for d in INPUT_DTYPES
    ] + [
        (_fused2_spec(*_fused2_key(FUSED2)), lambda: compile_fused2(*_fused2_key(FUSED2))),
        (_fused3_spec(FUSED3["warps"], FUSED3["stages"]), lambda: compile_fused3(FUSED3["warps"], FUSED3["stages"])),
    ] + [(_amax_spec(d), (lambda d=d: compile_amax(d))) for d in INPUT_DTYPES]


def _tiles_upper_bound(x: torch.Tensor, fmt: str, n_groups: int, rows: int, cols: int) -> int:
    blocks = _ceil_div(x.shape[0], BLOCK[fmt]) + n_groups  # >= sum_g ceil(m_g / block)
    return _ceil_div(blocks, rows // BLOCK[fmt]) * _ceil_div(x.shape[1], cols)


def quantize_both(x, fmt_name, row_data, row_scale, col_data, col_scale, groups,
                  row_scale_s=None, col_scale_s=None) -> None:
    """quantize_rowwise and quantize_columnwise of x in one pass over x (see the notes above)."""
    reason = can_implement_both(x, fmt_name, row_data, row_scale, col_data, col_scale, groups,
                                row_scale_s, col_scale_s)
    if reason:
        raise ValueError(f"quantize_both: {reason}")
    n_groups = groups.shape[0]
    rows, k = x.shape
    if x.numel() == 0 or n_groups == 0:
        return
    fmt = _fmt_name(fmt_name)
    if x.dtype == torch.bfloat16:
        _quantize_both_bf16(x, fmt, row_data, row_scale, col_data, col_scale, groups, row_scale_s, col_scale_s)
    else:
        _quantize_both_smem(x, fmt, row_data, row_scale, col_data, col_scale, groups, row_scale_s, col_scale_s)


def _quantize_both_smem(x, fmt, row_data, row_scale, col_data, col_scale, groups, row_scale_s, col_scale_s) -> None:
    """quantize_both (checked already) by the shared-memory tile kernel (fused_kernel): fp32 x."""
    n_groups = groups.shape[0]
    rows, k = x.shape
    bits = 16 if x.dtype == torch.bfloat16 else 32
    ct_group = FUSED_CT_GROUP[(fmt, bits)]
    units = _tiles_upper_bound(x, fmt, n_groups, FUSED_ROWS, FUSED_COLS * ct_group)
    grid = max(1, min(units, sm_count(x.device) * FUSED_CTAS_PER_SM[(fmt, bits)], _GRID_LIMIT or units))
    steps = (n_groups - 1).bit_length()
    u8 = [t.view(torch.uint8).reshape(-1) for t in (row_data, row_scale, col_data, col_scale)]
    args = [x.view(-1), groups.view(-1), *u8]
    if fmt == "nvfp4":
        args += [col_scale_s if row_scale_s is None else row_scale_s, col_scale_s]
    args += [n_groups, steps, rows, k]
    if fmt == "nvfp4":
        args.append(0 if row_scale_s is None else 1)
    args += [u8[2].numel(), u8[3].numel(), ct_group, grid]
    with torch.cuda.device(x.device):
        CACHE.get(_fused_spec(fmt, x.dtype), lambda: compile_fused(fmt, x.dtype))(*args, _stream(x))


def _quantize_both_f3(x, row_data, row_scale, col_data, col_scale, groups, row_scale_s, col_scale_s,
                      config: dict | None = None, compiled=None) -> None:
    """quantize_both for bf16 x to NVFP4 (checked already): the per-warp shared-memory kernel."""
    c = {**FUSED3, **(config or {})}
    warps = c["warps"]
    n_groups = groups.shape[0]
    rows, k = x.shape
    tiles = _tiles_upper_bound(x, "nvfp4", n_groups, FUSED_ROWS, 64)
    grid = max(1, min(_ceil_div(tiles, warps), sm_count(x.device) * c["ctas_per_sm"], _GRID_LIMIT or tiles))
    u8 = [t.view(torch.uint8).reshape(-1) for t in (row_data, row_scale, col_data, col_scale)]
    args = [x.view(-1), groups.view(-1), *u8, col_scale_s if row_scale_s is None else row_scale_s, col_scale_s,
            n_groups, (n_groups - 1).bit_length(), rows, k, 0 if row_scale_s is None else 1,
            u8[2].numel(), u8[3].numel(), max(1, c["group_rows"]), grid]
    if compiled is None:
        compiled = CACHE.get(_fused3_spec(warps, c["stages"]), lambda: compile_fused3(warps, c["stages"]))
    with torch.cuda.device(x.device):
        compiled(*args, _stream(x))


def _quantize_both_f2(x, row_data, row_scale, col_data, col_scale, groups,
                      config: dict | None = None, compiled=None) -> None:
    """quantize_both for bf16 x to MXFP8 (checked already): the register-tile kernel."""
    c = {**FUSED2, **(config or {})}
    rl, warps = c["rl"], c["warps"]
    n_groups = groups.shape[0]
    rows, k = x.shape
    tiles = _tiles_upper_bound(x, "mxfp8", n_groups, FUSED_ROWS, (32 // (FUSED_ROWS // rl)) * 8 * warps)
    limit = sm_count(x.device) * c["ctas_per_sm"] if c["ctas_per_sm"] else tiles
    grid = max(1, min(tiles, limit, _GRID_LIMIT or tiles))
    u8 = [t.view(torch.uint8).reshape(-1) for t in (row_data, row_scale, col_data, col_scale)]
    args = [x.view(-1), groups.view(-1), *u8, n_groups, (n_groups - 1).bit_length(), rows, k,
            u8[2].numel(), u8[3].numel(), max(1, c["group_rows"]), grid]
    if compiled is None:
        key = _fused2_key(c)
        compiled = CACHE.get(_fused2_spec(*key), lambda: compile_fused2(*key))
    with torch.cuda.device(x.device):
        compiled(*args, _stream(x))


def _quantize_both_bf16(x, fmt, row_data, row_scale, col_data, col_scale, groups, row_scale_s, col_scale_s,
                        config: dict | None = None, compiled=None) -> None:
    """quantize_both for bf16 x (checked already): fused2 (MXFP8) or fused3 (NVFP4), FUSED2 / FUSED3
    updated by ``config``; the shared-memory kernel where the tiles do not fit 32-bit indices."""
    if _tiles_upper_bound(x, fmt, groups.shape[0], FUSED_ROWS, 32) >= 2**31:
        _quantize_both_smem(x, fmt, row_data, row_scale, col_data, col_scale, groups, row_scale_s, col_scale_s)
    elif fmt == "nvfp4":
        _quantize_both_f3(x, row_data, row_scale, col_data, col_scale, groups, row_scale_s, col_scale_s,
                          config, compiled)
    else:
        _quantize_both_f2(x, row_data, row_scale, col_data, col_scale, groups, config, compiled)


def group_amax(x, groups, global_scale) -> torch.Tensor:
    """Each NVFP4 group's finite amax (G,) int32 (fp32 bits), and its S written into
    ``global_scale`` (G,) fp32 (see the notes above)."""
    reason = can_implement_amax(x, groups, global_scale)
    if reason:
        raise ValueError(f"group_amax: {reason}")
    n_groups = groups.shape[0]
    amax_and_count = torch.zeros(n_groups + 1, dtype=torch.int32, device=x.device)
    if n_groups == 0:
        return amax_and_count[:0]
    if x.numel() == 0:  # every amax is 0
        global_scale.fill_(1.0)
        return amax_and_count[:n_groups]
    per_sm = AMAX_CTAS_PER_SM[16 if x.dtype == torch.bfloat16 else 32]
    tiles = _tiles_upper_bound(x, "nvfp4", n_groups, AMAX_ROWS, AMAX_COLS)
    grid = max(1, min(tiles, sm_count(x.device) * per_sm, _GRID_LIMIT or tiles))
    args = [x.view(-1), groups.view(-1), amax_and_count, global_scale, n_groups, (n_groups - 1).bit_length(),
            x.shape[0], x.shape[1], grid]
    with torch.cuda.device(x.device):
        CACHE.get(_amax_spec(x.dtype), lambda: compile_amax(x.dtype))(*args, _stream(x))
    return amax_and_count[:n_groups]
