"""BF16 / FP32 -> MXFP8 and NVFP4 quantize kernels: rowwise, group-aware columnwise, both in one
pass, and NVFP4's per-group amax.

Host side (no cutlass import; works on a machine with no GPU when CUTE_DSL_ARCH is set):
config.py (what host and device share, FormatFacts), checks.py, table.py (group_table),
compile.py (specs, compile entries), launch.py (the functions below). Device code, imported only
to compile: ptx.py (inline PTX), codec.py (the block codec), tiles.py (the group table on the
device) and one file a kernel: rowwise.py, columnwise.py, amax.py, and for both directions in one
pass fused_rowcol.py (shared-memory tiles, any input), fused_rowcol_mxfp8_bf16.py,
fused_rowcol_nvfp4_bf16.py, with their compiled entries in fused_rowcol_entry.py. Measurements
and what was tried: docs/performance.md.

``fmt`` is a FormatFacts everywhere: the caller's format facts (grouped.quantize.kernel_facts);
the kernels compile them in. Bit-exact with the torch reference ``grouped.quantize``
(grouped/formats.py, grouped/elements.py): the same fp32 operations in the same order, each a
correctly rounded PTX instruction (``mul.rn.f32``, ``div.rn.f32``, no ftz), E4M3 by
``cvt.rn.satfinite.e4m3x2.f32``, the E8M0 exponent worked out on bit patterns, the E2M1 rounding
by correctly rounded fp32 adds onto 2^23 (codec.py). Block amaxes are integer maxima of the fp32
bit patterns with the sign cleared (finite < Inf < NaN, NaN never dropped); a block is non-finite
iff that maximum is >= 0x7F800000, and gets the NaN scale (``fmt.nan_scale``) with NaN elements
(MXFP8, ``fmt.nan_element``) or zero codes (NVFP4).

quantize_rowwise(x, fmt, data, scale, row_scale=None): blocks along the last dim.
    x (R, K) contiguous bf16/fp32, K a multiple of the block;
    MXFP8: data (R, K) float8_e4m3fn, scale (R, K/32) uint8 (E8M0);
    NVFP4: data (R, K/2) uint8 (first element in the low nibble), scale (R, K/16)
    float8_e4m3fn, row_scale (R,) fp32: the per-tensor S of the member each row belongs to.

quantize_columnwise(x, fmt, data, scale, groups, col_scale=None): blocks down the rows, per group.
    The rows of x (M, K) form groups; group g's rows are quantized in blocks that restart at the
    group's first row, the last one zero-padded; the output is transposed: column k of group g,
    block j, goes to ``data`` bytes [DATA_OFFSET_g + k * DATA_STRIDE_g + j * block / epb, ...)
    (epb: elements a byte) and its scale byte to ``scale`` byte SCALE_OFFSET_g + k *
    SCALE_STRIDE_g + j. NVFP4 takes col_scale (G,) fp32, each group's S.

quantize_both(x, fmt, row_data, row_scale, col_data, col_scale, groups, row_scale_s, col_scale_s):
    one pass over x: the bytes of quantize_rowwise (for the rows that belong to a group) and of
    quantize_columnwise (same group table). Rows that belong to no group are written in neither
    direction. NVFP4: col_scale_s (G,) is each group's S; row_scale_s (R,) each row's S, or None
    for its group's S (the same value wherever rows and groups correspond).

group_amax(x, fmt, groups, global_scale) -> amax: NVFP4's per-group finite amax and S in one pass.

The group table
---------------
``groups`` is a (G, TABLE_COLS) int64 CUDA tensor, one row a group:

    ROW_START     first row of the group in x
    ROWS          m_g, rows in the group (0 allowed: the group writes nothing)
    BLOCK_START   padded blocks of the groups before it: sum_{h<g} ceil(m_h / block)
                  (non-decreasing; it numbers the blocks the grids run over)
    DATA_OFFSET   byte offset of the group's (column 0, block 0) in ``data``
    DATA_STRIDE   bytes from one column k to the next (a row of the stored, transposed data)
    SCALE_OFFSET  byte offset of the group's (column 0, block 0) in ``scale``
    SCALE_STRIDE  bytes from one column to the next in ``scale``
    (column 7)    reserved, 0

``data`` and ``scale`` are any contiguous 1-byte tensors (a (K, P) matrix or a flat byte buffer):
the kernels see their bytes. Offsets and strides must keep each block's data 16-byte aligned
(MXFP8) / 8-byte aligned (NVFP4). Entries are read on the device and trusted: a table that points
past x reads zeros, and writes past ``data`` / ``scale`` are dropped (never out-of-bounds memory),
but neither is reported.

``group_table`` builds it with torch ops on the device of the split sizes (no host sync, so it can
be captured in a CUDA graph):
- grouped.quantize(x, f, axis=0, split_sizes=s): one (K, P) matrix, ``group_table(s, fmt,
  data_row_bytes=data.shape[1], scale_row_bytes=scale.shape[1])``: offsets are the padded prefix
  (BLOCK_START * block / epb bytes of data, BLOCK_START bytes of scale), strides the row lengths;
- GroupedTensor columnwise regions ((K, pad(m_g)) at their own byte offsets in the flat buffers):
  pass ``data_offsets``, ``data_strides`` (= pad(m_g) / epb), ``scale_offsets``,
  ``scale_strides`` (= pad(m_g) / block) per group.
"""

from .checks import (
                     DATA_DTYPE,
                     INPUT_DTYPES,
                     SCALE_DTYPE,
                     can_implement_amax,
                     can_implement_both,
                     can_implement_columnwise,
                     can_implement_rowwise,
)
from .compile import DIRECTIONS, compile_config, configs
from .config import (
                     BLOCK_START,
                     COL_THREADS,
                     DATA_ALIGN,
                     DATA_OFFSET,
                     DATA_STRIDE,
                     FORMATS,
                     ROW_START,
                     ROW_THREADS,
                     ROWS,
                     SCALE_OFFSET,
                     SCALE_STRIDE,
                     TABLE_COLS,
                     FormatFacts,
)
from .launch import group_amax, kernel, quantize_both, quantize_columnwise, quantize_rowwise
from .table import group_table

__all__ = [
    "BLOCK_START", "COL_THREADS", "DATA_ALIGN", "DATA_DTYPE", "DATA_OFFSET", "DATA_STRIDE", "DIRECTIONS", "FORMATS",
    "INPUT_DTYPES", "ROWS", "ROW_START", "ROW_THREADS", "SCALE_DTYPE", "SCALE_OFFSET", "SCALE_STRIDE", "TABLE_COLS",
    "FormatFacts", "can_implement_amax", "can_implement_both", "can_implement_columnwise", "can_implement_rowwise",
    "compile_config", "configs", "group_amax", "group_table", "kernel", "quantize_both", "quantize_columnwise",
    "quantize_rowwise",
]
