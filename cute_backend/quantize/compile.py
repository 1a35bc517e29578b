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
from .config import (
    AMAX_COLS,
    AMAX_ROWS,
    AMAX_THREADS,
    COL_THREADS,
    COLS_PER_LANE,
    REGISTER_TILE_WARPS,
    ROW_THREADS,
    ROWS_PER_LANE,
    TABLE_COLS,
    TILE_COLS,
    TILE_ROWS,
    TILE_STAGES,
    TILE_THREADS,
    WARP_TILE_COLS,
    WARP_TILE_WARPS,
    FormatFacts,
)

DIRECTIONS = ("rowwise", "columnwise")
SOURCES = tuple(sorted(str(p) for p in [*Path(__file__).parent.glob("*.py"), Path(__file__).parents[1] / "ptx.py"]))


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


def both_spec(fmt: FormatFacts, input_dtype: torch.dtype, kernel: str) -> KernelSpec:
    """quantize_both by ``kernel``: "tiles" (fused_rowcol.py, any input), or for bf16 input
    "register-tiles" (MXFP8) / "warp-tiles" (NVFP4)."""
    if kernel == "tiles":
        config = (fmt, str(input_dtype), "both", TILE_THREADS, TILE_ROWS, TILE_COLS, TILE_STAGES, TABLE_COLS)
        return KernelSpec(f"quantize_{fmt.name}_both", config, ARCH, SOURCES)
    if kernel == "register-tiles":
        shape = (ROWS_PER_LANE, COLS_PER_LANE, REGISTER_TILE_WARPS, TILE_ROWS)
    else:
        shape = (WARP_TILE_WARPS, TILE_ROWS, WARP_TILE_COLS)
    config = (fmt, str(input_dtype), f"both-{kernel}", *shape, TABLE_COLS)
    return KernelSpec(f"quantize_{fmt.name}_both_bf16", config, ARCH, SOURCES)


def compile_both(fmt: FormatFacts, input_dtype: torch.dtype, kernel: str):
    import cutlass

    from . import fused_rowcol_entry as k

    # x, table, row data / scales (the bf16 kernels store 4 scale bytes at a time), column data / scales
    tensors = (_flat(input_dtype, 16), _flat(cutlass.Int64, 16), _flat(cutlass.Uint8, 16),
               _flat(cutlass.Uint8, 1 if kernel == "tiles" else 4), _flat(cutlass.Uint8, 16), _flat(cutlass.Uint8, 1))
    head = (cutlass.Int32(1), cutlass.Int32(0), cutlass.Int64(1), cutlass.Int64(1))  # n_groups, steps, M, K
    tail = (cutlass.Int64(1), cutlass.Int64(1), cutlass.Int32(1), cutlass.Int32(1))  # col bytes, unit, grid
    if fmt.name == "mxfp8":
        return compile_kernel(k.both_mxfp8_host, *tensors, *head, *tail, fmt, kernel)
    s_row, s_col = _flat(cutlass.Float32, 4), _flat(cutlass.Float32, 4)
    return compile_kernel(k.both_nvfp4_host, *tensors, s_row, s_col, *head, cutlass.Int32(0), *tail, fmt, kernel)


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
        bf16_kernel = "register-tiles" if f.name == "mxfp8" else "warp-tiles"
        for d, kernel in [(d, "tiles") for d in INPUT_DTYPES] + [(torch.bfloat16, bf16_kernel)]:
            out.append((both_spec(f, d, kernel), (lambda f=f, d=d, kernel=kernel: compile_both(f, d, kernel))))
        if f.name == "nvfp4":
            out += [(amax_spec(f, d), (lambda f=f, d=d: compile_amax(f, d))) for d in INPUT_DTYPES]
    return out
