"""quantize_both for bf16 x to MXFP8: register tiles, no shared memory for the data (device code).

Each warp quantizes a tile of TILE_ROWS rows (four padded blocks of 32) by 32 columns on its own;
REGISTER_TILE_WARPS warps of a CTA take neighbouring column tiles of the same rows (whole
128-byte lines of rowwise output). A lane (g, c) = (lane / 4, lane % 4) loads ROWS_PER_LANE = 16
rows (half a padded block) x COLS_PER_LANE = 8 columns with 16-byte loads, all in flight at
once, and keeps them in registers as packed bf16 pairs: a row block spans 4 lanes (its amax
reduced by two shuffles, two rows a shuffle), a column block two lanes (one shuffle).

Rowwise blocks go from registers to memory (16-byte stores a row), then columnwise ones (16
bytes a column); a column's four block scales of the tile are gathered by shuffles into one
4-byte store, and a row's block scales of the CTA's warps go through a small shared staging
area (one barrier a tile) into one 4-byte store: byte-sized scale stores cost as much L2
bandwidth as whole sectors. The whole tile is unrolled (~1.9k instructions: it fits the
instruction cache). Tiles are dealt to CTAs in bands of ``group_rows`` row tiles (banded_tile),
one CTA a tile. The codec is codec.py's bf16 form.
"""

from types import SimpleNamespace

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64, Uint8, Uint32

from ..ptx import hmax_abs, join64, ld, pred, prmt, sel, shfl_bfly, shfl_idx, split64, st, vote_all
from .codec import amax_halves, hmax_tree, mxfp8_scale_bits, mxfp8_word, nan_word
from .config import (
    COLS_PER_LANE,
    DATA_OFFSET,
    DATA_STRIDE,
    REGISTER_TILE_COLS,
    REGISTER_TILE_WARPS,
    ROW_START,
    ROWS_PER_LANE,
    SCALE_OFFSET,
    SCALE_STRIDE,
    TILE_ROWS,
)
from .tiles import banded_tile, find_block, tile_counts

BLOCK = 32
LANES_ACROSS = 32 // (TILE_ROWS // ROWS_PER_LANE)  # lanes across a warp's columns (4)
WARP_COLS = LANES_ACROSS * COLS_PER_LANE  # 32
CTA_COLS = REGISTER_TILE_COLS  # 128: the CTA's warps side by side
ROW_SCALE_STAGE = TILE_ROWS * REGISTER_TILE_WARPS  # bytes: [tile row][warp]


def _tile(ctx, facts, row_scale_stage: Int32, rt: Int32, ct: Int32):
    """One warp's tile: row tile rt, column tile ct of the CTA's columns (predicated, no branches).
    Returns the first x row of the lane's rows and how many of them are real."""
    rows = ROWS_PER_LANE
    k_cols, lane, warp = ctx.k_cols, ctx.lane, ctx.warp
    g, c = lane // LANES_ACROSS, lane % LANES_ACROSS
    slot = g // 2  # the tile's padded block this lane's rows lie in
    local0 = Int64((g % 2) * 16)  # its first row in the block
    table = ctx.table
    grp, trow, j, valid = find_block(table, Int64(rt) * (TILE_ROWS // BLOCK) + Int64(slot), ctx.n_groups, ctx.steps,
                                     ctx.total_blocks, BLOCK)
    first = table[trow + ROW_START] + j * BLOCK
    col0 = Int64(ct) * CTA_COLS + Int64(warp * WARP_COLS + c * COLS_PER_LANE)
    col_ok = col0 < k_cols
    # rows of the lane's piece that are real: in the group (valid) and in x, none past K
    n_rows = Int32(cutlass.max(cutlass.min(cutlass.min(valid - local0, ctx.m_rows - (first + local0)), Int64(rows)),
                               Int64(0)))
    n_ok = sel(col_ok, n_rows, 0, Int32)
    row_ok = [Int32(i) < n_ok for i in range(rows)]

    # ---- loads: every row of the lane's piece, 16 bytes (its 8 columns) each, all issued before any use
    x_row0 = ctx.x_addr + ((first + local0) * k_cols + col0) * 2
    row_pitch = k_cols * 2
    x_words = [ld("global", x_row0 + Int64(i) * row_pitch, 4, pred=pred(row_ok[i]), ld="ld.global")
               for i in range(rows)]
    blk_ok = col_ok & (valid > Int64(0))
    d_off, d_stride = table[trow + DATA_OFFSET], table[trow + DATA_STRIDE]
    s_off, s_stride = table[trow + SCALE_OFFSET], table[trow + SCALE_STRIDE]

    # ---- rowwise: a row block is 4 lanes' 8 columns; two rows' amaxes a shuffle
    row_data_at = ctx.row_data_addr + (first + local0) * k_cols + col0
    for i in range(0, rows, 2):
        m0, m1 = hmax_tree(x_words[i]), hmax_tree(x_words[i + 1])
        row_m = hmax_abs(prmt(m0, m1, 0x5410), prmt(m0, m1, 0x7632))
        row_m = hmax_abs(row_m, shfl_bfly(row_m, 1))
        row_m = hmax_abs(row_m, shfl_bfly(row_m, 2))
        scales = []
        for h, a in enumerate(amax_halves(row_m)):
            r = i + h
            byte, inv, bad = mxfp8_scale_bits(a, facts)
            scales.append(byte)
            out = [sel(bad, nan_word(facts), mxfp8_word(x_words[r][2 * q:2 * q + 2], "row", 0, inv), Uint32)
                   for q in range(2)]
            st("global", row_data_at + Int64(r) * k_cols, out, 32, pred(row_ok[r]))
        for h in range(2):  # to the CTA's staging area; _flush_row_scales stores them
            st("shared", row_scale_stage + (Int32(g * rows + i + h) * REGISTER_TILE_WARPS + warp), scales[h], 8)

    # column scales: the tile's 4 blocks of a column in one 4-byte store where they are one
    # group's consecutive blocks, 4-byte aligned (warp-uniform), else a byte a block
    bslot = Uint32(slot)
    grp0 = Int32(shfl_idx(Uint32(grp), 0))
    quad_base = ctx.col_scale_addr + s_off + j - Int64(slot)  # block 0 of the tile, column 0
    quad_ok = Int32(vote_all(pred((valid > Int64(0)) & (grp == grp0) & (quad_base % 4 == Int64(0))
                                  & (s_stride % 4 == Int64(0))))) != 0
    # ---- columnwise: 8 columns of the lane's 16 rows, the block's other half on lane ^ 4
    for kw in range(4):
        col_m = hmax_tree([x_words[i][kw] for i in range(rows)])
        col_m = hmax_abs(col_m, shfl_bfly(col_m, 4))
        for h, a in enumerate(amax_halves(col_m)):
            col = col0 + (2 * kw + h)
            byte, inv, bad = mxfp8_scale_bits(a, facts)
            col_words = [x_words[i][kw] for i in range(rows)]
            out = [sel(bad, nan_word(facts), mxfp8_word(col_words[4 * q:4 * q + 4], "col", h, inv), Uint32)
                   for q in range(rows // 4)]
            data_at = d_off + col * d_stride + j * 32
            ok = blk_ok & (data_at >= Int64(0)) & (data_at + 32 <= ctx.col_data_bytes)
            st("global", ctx.col_data_addr + data_at + local0, out, 32, pred(ok))
            scale_at = s_off + col * s_stride + j
            scale_ok = blk_ok & (scale_at >= Int64(0)) & (scale_at < ctx.col_scale_bytes) & ((g % 2) == 0)
            st("global", ctx.col_scale_addr + scale_at, byte, 8, pred(scale_ok & (~quad_ok)))
            quad = byte << (Uint32(8) * bslot)
            quad = quad | shfl_bfly(quad, 8)  # lanes of the neighbouring block of this column
            quad = quad | shfl_bfly(quad, 16)
            quad_store_ok = quad_ok & (g == 0) & col_ok & (scale_at >= Int64(0)) & (scale_at + 4 <= ctx.col_scale_bytes)
            st("global", ctx.col_scale_addr + scale_at, quad, 32, pred(quad_store_ok))
    return first + local0, n_rows


def _flush_row_scales(ctx, row_scale_stage: Int32, first_row, n_rows, ct):
    """The CTA's staged row scales of the tile ([TILE_ROWS rows][warps] bytes): one 4-byte store a
    row where K / 32 is a multiple of 4 and the CTA's columns lie inside K, else a byte a block. A
    row's x row and validity come from the lanes of its 16 rows (g = row / 16)."""
    warps = REGISTER_TILE_WARPS
    k_cols = ctx.k_cols
    blk0 = Int64(ct) * (CTA_COLS // 32)  # the CTA's first row block
    whole = ((k_cols // 32) % warps == Int64(0)) & (Int64(ct) * CTA_COLS + CTA_COLS <= k_cols)
    fw = split64(first_row)
    for q in range(TILE_ROWS // (32 * warps)):
        big = ctx.tid + 32 * warps * q  # row of the tile
        src = (big >> 4) * 4
        first = join64(shfl_idx(fw[0], src), shfl_idx(fw[1], src))
        ok = (big & 15) < Int32(shfl_idx(Uint32(n_rows), src))
        at = ctx.row_scale_addr + (first + Int64(big & 15)) * (k_cols // 32) + blk0
        vals = [ld("shared", row_scale_stage + big * warps + b, bits=8)[0] for b in range(warps)]
        packed = vals[0]
        for b in range(1, warps):
            packed = packed | (vals[b] << Uint32(8 * b))
        st("global", at, packed, 8 * warps, pred(ok & whole))
        for b in range(warps):
            st("global", at + b, vals[b], 8, pred(ok & (~whole) & (Int64(ct) * CTA_COLS + 32 * b < k_cols)))


@cute.kernel
def fused_rowcol_mxfp8_bf16_kernel(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, col_data_bytes: Int64, col_scale_bytes: Int64,
    group_rows: Int32, facts: cutlass.Constexpr,
):
    tid = Int32(cute.arch.thread_idx()[0])
    n_rt, n_ct, total_blocks = tile_counts(table, n_groups, k_cols, BLOCK, TILE_ROWS, CTA_COLS)
    n_rt32, n_ct32 = Int32(n_rt), Int32(n_ct)
    n_tiles = n_rt32 * n_ct32
    bid, _, _ = cute.arch.block_idx()
    nb, _, _ = cute.arch.grid_dim()
    b = Int32(bid)
    count = sel(b < n_tiles, (n_tiles - b + Int32(nb) - 1) // Int32(nb), 0, Int32)
    # what every tile of this CTA shares
    ctx = SimpleNamespace(table=table, n_groups=n_groups, steps=steps, total_blocks=total_blocks, m_rows=m_rows,
                          k_cols=k_cols, lane=tid % 32, warp=tid // 32, x_addr=x.iterator.toint(),
                          row_data_addr=row_data.iterator.toint(), row_scale_addr=row_scale.iterator.toint(),
                          col_data_addr=col_data.iterator.toint(), col_scale_addr=col_scale.iterator.toint(),
                          col_data_bytes=col_data_bytes, col_scale_bytes=col_scale_bytes, tid=tid)
    smem = cutlass.utils.SmemAllocator()
    stages = smem.allocate_tensor(Uint8, cute.make_layout(2 * ROW_SCALE_STAGE), byte_alignment=16)
    stage0 = Int32(stages.iterator.toint())
    for it in cutlass.range(count, unroll=1):
        rt, ct = banded_tile(b + it * Int32(nb), n_rt32, n_ct32, group_rows)
        stage = stage0 + (it % 2) * ROW_SCALE_STAGE  # two by tile parity: one barrier a tile
        first_row, n_rows = _tile(ctx, facts, stage, rt, ct)
        cute.arch.sync_threads()
        _flush_row_scales(ctx, stage, first_row, n_rows, ct)


def launch(x, table, row_data, row_scale, col_data, col_scale, scalars, grid_ctas, stream, facts):
    """Launch from a @cute.jit entry (fused_rowcol_entry.py); scalars: n_groups .. group_rows."""
    fused_rowcol_mxfp8_bf16_kernel(x, table, row_data, row_scale, col_data, col_scale, *scalars, facts).launch(
        grid=(grid_ctas, 1, 1), block=(32 * REGISTER_TILE_WARPS, 1, 1), smem=2 * ROW_SCALE_STAGE + 64, stream=stream
    )
