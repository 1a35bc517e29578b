"""The quantize host functions: check the call, pick the kernel, size the grid, launch."""

from __future__ import annotations

import torch

from ..cache import CACHE
from ..device import sm_count
from . import compile as c
from .checks import can_implement_amax, can_implement_both, can_implement_columnwise, can_implement_rowwise, ceil_div
from .config import AMAX_COLS, AMAX_ROWS, REGISTER_TILE_COLS, TILE_COLS, TILE_ROWS, WARP_TILE_COLS, WARP_TILE_WARPS

# Launch tuning, measured on an H200 (docs/performance.md, "Quantize kernels"); run-time
# arguments, so none of it is compiled in.
# fused_rowcol.py: resident CTAs an SM by (format, input bits) (shared memory and registers
# allow it) and the neighbouring column tiles a CTA takes in a row as its unit of work.
TILE_CTAS_PER_SM = {("mxfp8", 16): 3, ("nvfp4", 16): 4, ("mxfp8", 32): 2, ("nvfp4", 32): 2}
TILE_COLUMN_UNIT = 2
# The bf16 kernels deal tiles in bands of this many row tiles (tiles.banded_tile); MXFP8 runs
# one CTA a tile, NVFP4 a persistent grid of WARP_TILE_CTAS_PER_SM one-warp CTAs an SM.
REGISTER_TILE_GROUP_ROWS = 8
WARP_TILE_GROUP_ROWS = 16
WARP_TILE_CTAS_PER_SM = 12
AMAX_CTAS_PER_SM = {16: 8, 32: 4}  # group_amax: resident CTAs an SM (registers), by input bits
GRID_LIMIT: int | None = None  # tests cap the persistent grids, so each CTA runs a long pipeline


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


def _words(data: torch.Tensor) -> torch.Tensor:
    return data.view(torch.uint8).reshape(-1).view(torch.int32)


def _grid(units: int, limit: int) -> int:
    return max(1, min(units, limit, GRID_LIMIT or units))


def _tiles_upper_bound(x: torch.Tensor, fmt, n_groups: int, rows: int, cols: int) -> int:
    blocks = ceil_div(x.shape[0], fmt.block_size) + n_groups  # >= sum_g ceil(m_g / block)
    return ceil_div(blocks, rows // fmt.block_size) * ceil_div(x.shape[1], cols)


def quantize_rowwise(x, fmt, data, scale, row_scale=None) -> None:
    """Quantize x (R, K) with blocks along K into ``data`` / ``scale`` (see the package doc)."""
    reason = can_implement_rowwise(x, fmt, data, scale, row_scale)
    if reason:
        raise ValueError(f"quantize_rowwise: {reason}")
    if x.numel() == 0:
        return
    n_blocks = x.numel() // fmt.block_size
    args = [x.view(-1), _words(data), scale.view(torch.uint8).reshape(-1)]
    if fmt.name == "nvfp4":
        args += [row_scale, n_blocks, x.shape[1] // fmt.block_size]
    else:
        args.append(n_blocks)
    with torch.cuda.device(x.device):
        kernel(fmt, x.dtype, "rowwise")(*args, _stream(x))


def quantize_columnwise(x, fmt, data, scale, groups, col_scale=None) -> None:
    """Quantize the row groups of x (M, K) with blocks down the rows, transposed (see the package doc)."""
    reason = can_implement_columnwise(x, fmt, data, scale, groups, col_scale)
    if reason:
        raise ValueError(f"quantize_columnwise: {reason}")
    n_groups = groups.shape[0]
    rows, k = x.shape
    if x.numel() == 0 or n_groups == 0 or data.numel() == 0:
        return
    grid_blocks = ceil_div(rows, fmt.block_size) + n_groups
    steps = (n_groups - 1).bit_length()  # binary-search steps over BLOCK_START
    args = [x.view(-1), groups.view(-1), _words(data), scale.view(torch.uint8).reshape(-1)]
    if fmt.name == "nvfp4":
        args.append(col_scale)
    with torch.cuda.device(x.device):
        sizes = (k, x.numel(), data.numel() // 4, scale.numel())
        kernel(fmt, x.dtype, "columnwise")(*args, n_groups, steps, *sizes, grid_blocks, _stream(x))


def kernel(fmt, input_dtype: torch.dtype, direction: str):
    """quantize_rowwise's or quantize_columnwise's compiled kernel."""
    return CACHE.get(c.direction_spec(fmt, input_dtype, direction), lambda: c.compile_config(fmt, input_dtype,
                                                                                              direction))


def quantize_both(x, fmt, row_data, row_scale, col_data, col_scale, groups,
                  row_scale_s=None, col_scale_s=None) -> None:
    """quantize_rowwise and quantize_columnwise of x in one pass over x (see the package doc).

    bf16 x goes to the register-tile kernel (MXFP8) or the per-warp tile kernel (NVFP4); fp32 x,
    and bf16 x whose tiles do not fit 32-bit tile numbers, to the shared-memory tile kernel.
    """
    reason = can_implement_both(x, fmt, row_data, row_scale, col_data, col_scale, groups, row_scale_s, col_scale_s)
    if reason:
        raise ValueError(f"quantize_both: {reason}")
    n_groups = groups.shape[0]
    rows, k = x.shape
    if x.numel() == 0 or n_groups == 0:
        return
    nvfp4 = fmt.name == "nvfp4"
    if x.dtype == torch.float32 or _tiles_upper_bound(x, fmt, n_groups, TILE_ROWS, 32) >= 2**31:
        kernel, unit = "tiles", TILE_COLUMN_UNIT
        units = _tiles_upper_bound(x, fmt, n_groups, TILE_ROWS, TILE_COLS * unit)
        grid = _grid(units, sm_count(x.device) * TILE_CTAS_PER_SM[(fmt.name, x.dtype.itemsize * 8)])
    elif nvfp4:
        kernel, unit = "warp-tiles", WARP_TILE_GROUP_ROWS
        tiles = _tiles_upper_bound(x, fmt, n_groups, TILE_ROWS, WARP_TILE_COLS)
        grid = _grid(ceil_div(tiles, WARP_TILE_WARPS), sm_count(x.device) * WARP_TILE_CTAS_PER_SM)
    else:  # one CTA a tile
        kernel, unit = "register-tiles", REGISTER_TILE_GROUP_ROWS
        tiles = _tiles_upper_bound(x, fmt, n_groups, TILE_ROWS, REGISTER_TILE_COLS)
        grid = _grid(tiles, tiles)
    u8 = [t.view(torch.uint8).reshape(-1) for t in (row_data, row_scale, col_data, col_scale)]  # flat bytes
    args = [x.view(-1), groups.view(-1), *u8]
    if nvfp4:  # rows without their own S take their group's
        args += [col_scale_s if row_scale_s is None else row_scale_s, col_scale_s]
    args += [n_groups, (n_groups - 1).bit_length(), rows, k]
    if nvfp4:
        args.append(0 if row_scale_s is None else 1)
    args += [u8[2].numel(), u8[3].numel(), unit, grid]
    with torch.cuda.device(x.device):
        CACHE.get(c.both_spec(fmt, x.dtype, kernel), lambda: c.compile_both(fmt, x.dtype, kernel))(*args, _stream(x))


def group_amax(x, fmt, groups, global_scale) -> torch.Tensor:
    """Each NVFP4 group's finite amax (G,) int32 (fp32 bits, view them as float32), by atomic max
    the largest |x| over the finite elements of the group's rows of the table; and its S, written
    into ``global_scale`` (G,) fp32: fp32(amax_to_s / amax) capped at the largest finite fp32, 1
    where amax = 0. The amaxes live in a zeroed (G + 1,) buffer whose last entry counts the CTAs
    done; the last one turns them into S."""
    reason = can_implement_amax(x, fmt, groups, global_scale)
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
    tiles = _tiles_upper_bound(x, fmt, n_groups, AMAX_ROWS, AMAX_COLS)
    grid = _grid(tiles, sm_count(x.device) * per_sm)
    args = [x.view(-1), groups.view(-1), amax_and_count, global_scale, n_groups, (n_groups - 1).bit_length(),
            x.shape[0], x.shape[1], grid]
    with torch.cuda.device(x.device):
        CACHE.get(c.amax_spec(fmt, x.dtype), lambda: c.compile_amax(fmt, x.dtype))(*args, _stream(x))
    return amax_and_count[:n_groups]
