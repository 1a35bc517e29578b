"""Kernel specs and compile entries of the quantize kernels (host side; no GPU needed when
CUTE_DSL_ARCH is set). cutlass and the device modules are imported only inside the compile
entries, so a process whose kernels are all in the disk cache never imports them.

Every config carries the kernel's FormatFacts and the shapes of config.py it compiles in, and the
spec's sources are every file of this package: a change to either compiles anew.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..cache import ARCH, KernelSpec, compile_kernel
from .checks import INPUT_DTYPES
from .config import (AMAX_COLS, AMAX_ROWS, AMAX_THREADS, COL_THREADS, COLS_PER_LANE, REGISTER_TILE_WARPS, ROW_THREADS,
                     ROWS_PER_LANE, TABLE_COLS, TILE_COLS, TILE_ROWS, TILE_STAGES, TILE_THREADS, WARP_TILE_COLS,
                     WARP_TILE_WARPS, FormatFacts)

DIRECTIONS = ("rowwise", "columnwise")
SOURCES = tuple(sorted(str(p) for p in Path(__file__).parent.glob("*.py")))


def _flat(dtype, align=None):
    """A fake 1-D tensor of symbolic (64-bit) length, to compile against; ``dtype`` a cutlass type or
    a torch input dtype."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor

    dtype = {torch.bfloat16: cutlass.BFloat16, torch.float32: cutlass.Float32}.get(dtype, dtype)
    return make_fake_compact_tensor(dtype, (cute.sym_int(64),), assumed_align=align)


# ---- one direction ----------------------------------------------------------------------------


def direction_spec(fmt: FormatFacts, input_dtype: torch.dtype, direction: str) -> KernelSpec:
    threads = ROW_THREADS if direction == "rowwise" else COL_THREADS
    config = (fmt, str(input_dtype), direction, threads, TABLE_COLS)
    return KernelSpec(f"quantize_{fmt.name}_{direction}", config, ARCH, SOURCES)


def compile_config(fmt: FormatFacts, input_dtype: torch.dtype, direction: str):
    """Compile quantize_rowwise's or quantize_columnwise's kernel (a TVM-FFI compiled function)."""
    import cutlass

    x = _flat(input_dtype, 16 if direction == "rowwise" else None)
    words, scale = _flat(cutlass.Int32, 16), _flat(cutlass.Uint8, 1)
    s = _flat(cutlass.Float32, 4)
    nvfp4 = fmt.name == "nvfp4"
    if direction == "rowwise":
        from . import rowwise as k

        if nvfp4:
            return compile_kernel(k.rowwise_nvfp4_host, x, words, scale, s, cutlass.Int64(1), cutlass.Int64(1), fmt)
        return compile_kernel(k.rowwise_mxfp8_host, x, words, scale, cutlass.Int64(1), fmt)
    from . import columnwise as k

    table = _flat(cutlass.Int64, 16)
    # n_groups, steps, K, x numel, data words, scale bytes, grid blocks (64-bit sizes travel as
    # scalars: the DSL reads tensor extents back as Int32)
    scalars = (cutlass.Int32(1), cutlass.Int32(0), *[cutlass.Int64(1)] * 4, cutlass.Int32(1))
    if nvfp4:
        return compile_kernel(k.columnwise_nvfp4_host, x, table, words, scale, s, *scalars, fmt)
    return compile_kernel(k.columnwise_mxfp8_host, x, table, words, scale, *scalars, fmt)


# ---- both directions in one pass --------------------------------------------------------------


def tiles_spec(fmt: FormatFacts, input_dtype: torch.dtype) -> KernelSpec:
    """The shared-memory tile kernel (fused_rowcol.py)."""
    config = (fmt, str(input_dtype), "both", TILE_THREADS, TILE_ROWS, TILE_COLS, TILE_STAGES, TABLE_COLS)
    return KernelSpec(f"quantize_{fmt.name}_both", config, ARCH, SOURCES)


def compile_tiles(fmt: FormatFacts, input_dtype: torch.dtype):
    import cutlass

    from . import fused_rowcol as k

    x, table = _flat(input_dtype, 16), _flat(cutlass.Int64, 16)
    row_data, row_scale = _flat(cutlass.Uint8, 16), _flat(cutlass.Uint8, 1)
    col_data, col_scale = _flat(cutlass.Uint8, 16), _flat(cutlass.Uint8, 1)
    head = (cutlass.Int32(1), cutlass.Int32(0), cutlass.Int64(1), cutlass.Int64(1))  # n_groups, steps, M, K
    tail = (cutlass.Int64(1), cutlass.Int64(1), cutlass.Int32(1), cutlass.Int32(1))  # col bytes, ct_group, grid
    tensors = (x, table, row_data, row_scale, col_data, col_scale)
    if fmt.name == "mxfp8":
        return compile_kernel(k.fused_rowcol_mxfp8_host, *tensors, *head, *tail, fmt)
    s_row, s_col = _flat(cutlass.Float32, 4), _flat(cutlass.Float32, 4)
    return compile_kernel(k.fused_rowcol_nvfp4_host, *tensors, s_row, s_col, *head, cutlass.Int32(0), *tail, fmt)


def _bf16_tensors():
    """x, table, row data / scales, column data / scales of the bf16 one-pass kernels."""
    import cutlass

    return (_flat(torch.bfloat16, 16), _flat(cutlass.Int64, 16), _flat(cutlass.Uint8, 16), _flat(cutlass.Uint8, 4),
            _flat(cutlass.Uint8, 16), _flat(cutlass.Uint8, 1))


def bf16_spec(fmt: FormatFacts) -> KernelSpec:
    """The bf16 one-pass kernel of fmt: register tiles (MXFP8) or per-warp shared-memory tiles (NVFP4)."""
    if fmt.name == "mxfp8":
        config = (fmt, "torch.bfloat16", "both-registers", ROWS_PER_LANE, COLS_PER_LANE, REGISTER_TILE_WARPS,
                  TILE_ROWS, TABLE_COLS)
    else:
        config = (fmt, "torch.bfloat16", "both-warp-tiles", WARP_TILE_WARPS, TILE_ROWS, WARP_TILE_COLS, TABLE_COLS)
    return KernelSpec(f"quantize_{fmt.name}_both_bf16", config, ARCH, SOURCES)


def compile_bf16(fmt: FormatFacts):
    import cutlass

    if fmt.name == "mxfp8":
        from . import fused_rowcol_mxfp8_bf16 as k

        # n_groups, steps, M, K, col data / scale bytes, group_rows, grid
        scalars = (cutlass.Int32(1), cutlass.Int32(0), cutlass.Int64(1), cutlass.Int64(1), cutlass.Int64(1),
                   cutlass.Int64(1), cutlass.Int32(1), cutlass.Int32(1))
        return compile_kernel(k.fused_rowcol_mxfp8_bf16_host, *_bf16_tensors(), *scalars, fmt)
    from . import fused_rowcol_nvfp4_bf16 as k

    s_row, s_col = _flat(cutlass.Float32, 4), _flat(cutlass.Float32, 4)
    # n_groups, steps, M, K, row_s_mode, col data / scale bytes, group_rows, grid
    scalars = (cutlass.Int32(1), cutlass.Int32(0), cutlass.Int64(1), cutlass.Int64(1), cutlass.Int32(0),
               cutlass.Int64(1), cutlass.Int64(1), cutlass.Int32(1), cutlass.Int32(1))
    return compile_kernel(k.fused_rowcol_nvfp4_bf16_host, *_bf16_tensors(), s_row, s_col, *scalars, fmt)


# ---- NVFP4's per-group amax -------------------------------------------------------------------


def amax_spec(fmt: FormatFacts, input_dtype: torch.dtype) -> KernelSpec:
    config = (fmt, str(input_dtype), AMAX_THREADS, AMAX_ROWS, AMAX_COLS, TABLE_COLS)
    return KernelSpec(f"quantize_{fmt.name}_group_amax", config, ARCH, SOURCES)


def compile_amax(fmt: FormatFacts, input_dtype: torch.dtype):
    import cutlass

    from . import amax as k

    return compile_kernel(k.amax_host, _flat(input_dtype, 16), _flat(cutlass.Int64, 16), _flat(cutlass.Int32, 4),
                          _flat(cutlass.Float32, 4), cutlass.Int32(1), cutlass.Int32(0), cutlass.Int64(1),
                          cutlass.Int64(1), cutlass.Int32(1), fmt)


def configs(formats) -> list:
    """(spec, build) of every config the library can pick for ``formats`` (FormatFacts)."""
    out = []
    for f in formats:
        out += [(direction_spec(f, d, r), (lambda f=f, d=d, r=r: compile_config(f, d, r)))
                for d in INPUT_DTYPES for r in DIRECTIONS]
        out += [(tiles_spec(f, d), (lambda f=f, d=d: compile_tiles(f, d))) for d in INPUT_DTYPES]
        out.append((bf16_spec(f), (lambda f=f: compile_bf16(f))))
        if f.name == "nvfp4":
            out += [(amax_spec(f, d), (lambda f=f, d=d: compile_amax(f, d))) for d in INPUT_DTYPES]
    return out
