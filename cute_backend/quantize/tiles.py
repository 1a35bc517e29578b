"""The group table on the device: which group a padded block is in, and the orders tiles are
dealt to CTAs in (device code).

Padded blocks are numbered as BLOCK_START numbers them: group g's ceil(m_g / block) blocks
follow the groups before it. A tile of TILE_ROWS rows is TILE_ROWS / block consecutive padded
blocks, each block's rows from its own group.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64

from ..ptx import sel
from .config import BLOCK_START, ROWS, TABLE_COLS, TILE_COLS, TILE_ROWS


@cute.jit
def group_of_block(table: cute.Tensor, b: Int64, n_groups: Int32, steps: Int32):
    """(group, its table row offset) of padded block b: the last g with BLOCK_START[g] <= b,
    by a binary search of ``steps`` halvings."""
    lo = Int32(0)
    hi = n_groups
    for _ in cutlass.range(steps, unroll=1):
        mid = (lo + hi) // 2
        if mid > lo:
            if table[Int64(mid) * TABLE_COLS + BLOCK_START] <= b:
                lo = mid
            else:
                hi = mid
    return lo, Int64(lo) * TABLE_COLS


@cute.jit
def find_block(table: cute.Tensor, b: Int64, n_groups: Int32, steps: Int32, total_blocks: Int64,
               n: cutlass.Constexpr):
    """Padded block b -> (group, table row offset, block index j in the group, rows of it that are real).

    The real rows are 0 for a block past the table's last block or past its group's rows.
    """
    lo, row = group_of_block(table, b, n_groups, steps)
    j = b - table[row + BLOCK_START]
    valid = cutlass.min(table[row + ROWS] - j * n, Int64(n))
    ok = (b < total_blocks) & (j >= Int64(0)) & (valid > Int64(0))
    return lo, row, j, sel(ok, valid, 0, Int64)


def tile_counts(table: cute.Tensor, n_groups: Int32, k_cols: Int64, n: int, tile_rows: int, tile_cols: int):
    """Row tiles (tile_rows / n padded blocks each), column tiles, and the padded blocks in all."""
    tb = tile_rows // n
    last = Int64(n_groups - 1) * TABLE_COLS
    total_blocks = table[last + BLOCK_START] + (table[last + ROWS] + (n - 1)) // n
    n_rt = (total_blocks + (tb - 1)) // tb
    n_ct = (k_cols + (tile_cols - 1)) // tile_cols
    return n_rt, n_ct, total_blocks


def banded_tile(t, n_rt, n_ct, group_rows):
    """Tile t -> (row tile, column tile): bands of group_rows row tiles, row tile fastest within a
    band, bands one after another (1: column tile fastest; >= row tiles: row tile fastest). Tiles
    running at the same time then cover a block of rows x columns: long runs of x rows read and of
    transposed output rows written."""
    span = group_rows * n_ct
    band = t // span
    rem = t - band * span
    rows_in = cutlass.min(group_rows, n_rt - band * group_rows)
    return band * group_rows + rem % rows_in, rem // rows_in


def unit_schedule(table: cute.Tensor, n_groups: Int32, k_cols: Int64, n: int, ct_group: Int32):
    """fused_rowcol's order: units of ct_group neighbouring column tiles of one row tile, numbered
    row tile fastest, dealt to the CTAs grid-stride. CTAs running together then work on
    neighbouring row tiles of the same columns, so the pieces of a transposed output row are
    written together; a CTA reads ct_group * TILE_COLS contiguous elements of each of its rows.
    Returns (row tile, column unit, tiles of this CTA counting a unit's column tiles past
    K, row tiles, column tiles, padded blocks, unit stride as (column units, row tiles))."""
    n_rt, n_ct, total_blocks = tile_counts(table, n_groups, k_cols, n, TILE_ROWS, TILE_COLS)
    n_cu = (Int32(n_ct) + (ct_group - 1)) // ct_group
    n_units = Int32(n_rt) * n_cu
    bid, _, _ = cute.arch.block_idx()
    nb, _, _ = cute.arch.grid_dim()
    b = Int32(bid)
    g = Int32(nb)
    rt32 = cutlass.max(Int32(n_rt), Int32(1))  # (no row tiles: no units)
    units = sel(b < n_units, (n_units - b + (g - 1)) // g, 0, Int32)
    return b % rt32, b // rt32, units * ct_group, rt32, Int32(n_ct), total_blocks, g // rt32, g % rt32


def next_unit_tile(rt: Int32, cu: Int32, h: Int32, n_rt: Int32, dq: Int32, dr: Int32, ct_group: Int32):
    """The next tile (row tile, column unit, tile in the unit) of this CTA."""
    last = h + 1 == ct_group
    rt2 = rt + dr
    wrap = rt2 >= n_rt
    new_rt = sel(wrap, rt2 - n_rt, rt2, Int32)
    new_cu = cu + dq + sel(wrap, 1, 0, Int32)
    return (sel(last, new_rt, rt, Int32), sel(last, new_cu, cu, Int32), sel(last, 0, h + 1, Int32))
