"""quantize_both for bf16 x to NVFP4: per-warp shared-memory tiles, rolled loops (device code).

Unrolled like the MXFP8 register-tile kernel, an NVFP4 tile takes ~12k instructions, more than
the instruction cache holds. Here each warp runs on its own (no CTA barriers) over tiles of
TILE_ROWS x 64: lane (g, c) = (lane / 4, lane % 4) owns rows 16 g .. 16 g + 15 and columns
16 c .. 16 c + 15 of a tile, one padded block both ways, kept in a 512-byte slot of shared
memory. Eight lanes cp.async a whole 128-byte row of the tile, a __syncwarp makes it visible;
the warp loads, then quantizes (12 one-warp CTAs an SM keep the loads in flight). Chunk k (row
k / 2, half k % 2) of a slot sits at (k & ~7) | ((k ^ lane) & 7): the lanes of a quarter-warp
meet different banks for 16-byte accesses; the 4-byte column reads of a column's eight lanes
meet 4-way conflicts, the price of 64-byte contiguous column stores. Rows (two a step) and column
pairs are rolled loops (~2.1k instructions in all). Scale bytes go through two small staging
areas: rowwise four bytes a row (one 4-byte store where K % 64 == 0), columnwise the tile's eight
blocks of a column (one 8-byte store where they are one group's, 8-byte aligned; else a byte a
block, straight from the column pass). The codec is codec.py's bf16 form. Measurements and what
was tried: docs/performance.md.
"""

from types import SimpleNamespace

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint8, Uint32

from ..ptx import cp_async16, f32, hmax_abs, join64, ld, pred, prmt, sel, shfl_idx, split64, st, vote_all, vote_any
from .codec import amax_halves, e2m1_bf16, hmax_tree, nvfp4_pair_scales
from .config import (
    DATA_OFFSET,
    DATA_STRIDE,
    ROW_START,
    SCALE_OFFSET,
    SCALE_STRIDE,
    TILE_ROWS,
    WARP_TILE_COLS,
    WARP_TILE_WARPS,
)
from .tiles import banded_tile, find_block, tile_counts

BLOCK = 16
STAGE_BYTES = 16384  # one warp's tile: 32 lanes x 16 rows x 32 bytes
WARP_SMEM = STAGE_BYTES + 512 + 512  # the tile, row-scale and column-scale staging


def _tile_info(ctx, t):
    """Tile t's facts for this lane's block: column tile, group, table row, j, valid rows of the
    block, first x row, first column, real rows of the lane's piece (0 past K)."""
    rt, ct = banded_tile(t, ctx.n_rt, ctx.n_ct, ctx.group_rows)
    table = ctx.table
    grp, trow, j, valid = find_block(table, Int64(rt) * (TILE_ROWS // BLOCK) + Int64(ctx.g), ctx.n_groups,
                                     ctx.steps, ctx.total_blocks, BLOCK)
    first = table[trow + ROW_START] + j * BLOCK
    col0 = Int64(ct) * WARP_TILE_COLS + Int64(ctx.c * 16)
    n_rows = Int32(cutlass.max(cutlass.min(cutlass.min(valid, ctx.m_rows - first), Int64(16)), Int64(0)))
    n_ok = sel(col0 < ctx.k_cols, n_rows, 0, Int32)
    return SimpleNamespace(ct=ct, grp=grp, trow=trow, j=j, valid=valid, first=first, col0=col0, n_rows=n_rows,
                           n_ok=n_ok)


def _chunk_slot(k, lane7):
    """Slot of chunk k (run-time) in a lane's 32 chunks."""
    return (k & Int32(~7)) | ((k & Int32(7)) ^ lane7)


def _issue_tile(ctx, t, stage):
    """cp.async tile t into stage (zeros for rows not real and columns past K). Eight lanes load a
    whole 128-byte tile row an instruction, through L1 ("ca"): one L2 request a line. Instruction
    4 g + i loads rows 4 i .. 4 i + 3 of block g (its first row and size from lane 4 g)."""
    tile = _tile_info(ctx, t)
    lane = ctx.lane
    chunk = lane & 7  # the 16-byte chunk of the row: chunk & 1 of lane chunk / 2's piece
    warp_col0 = Int64(tile.ct) * WARP_TILE_COLS
    chunk_ok = warp_col0 + Int64(chunk * 8) < ctx.k_cols
    first_w = split64(tile.first)
    for g in range(8):
        first = join64(shfl_idx(first_w[0], g * 4), shfl_idx(first_w[1], g * 4))
        n_rows = sel(chunk_ok, Int32(shfl_idx(Uint32(tile.n_rows), g * 4)), 0, Int32)
        owner = g * 4 + (chunk >> 1)
        base = stage + owner * 512
        src0 = ctx.x_addr + (first * ctx.k_cols + warp_col0) * 2 + Int64(chunk * 16)
        for i in range(4):
            r = (lane >> 3) + 4 * i
            ok = r < n_rows
            src = sel(ok, src0 + Int64(r) * ctx.row_pitch, ctx.x_addr, Int64)
            cp_async16(base + _chunk_slot(2 * r + (chunk & 1), owner & 7) * 16, src, sel(ok, 16, 0, Int32), "ca")


def _row_words(ctx, base, r):
    return (ld("shared", base + _chunk_slot(2 * r, ctx.lane7) * 16, 4)
            + ld("shared", base + _chunk_slot(2 * r + 1, ctx.lane7) * 16, 4))


def _col_words(ctx, base, h, wsel):
    return [ld("shared", base + _chunk_slot(h + 2 * r, ctx.lane7) * 16 + wsel * 4, 1)[0] for r in range(16)]


def _store_row(ctx, tile, r, out):
    at = ctx.row_data_addr + (tile.first + Int64(r)) * (ctx.k_cols // 2) + tile.col0 // 2
    st("global", at, out, 32, pred(r < tile.n_ok))


def _store_col(ctx, tile, place, cc, out):
    col = tile.col0 + Int64(cc)
    data_at = place.d_off + col * place.d_stride + tile.j * 8
    ok = place.blk_ok & (data_at >= Int64(0)) & (data_at + 8 <= ctx.col_data_bytes)
    st("global", ctx.col_data_addr + data_at, out, 32, pred(ok))


def _quantize_rows(ctx, facts, tile, base, s_grp, rp):
    """Rows 2 rp, 2 rp + 1 of the lane's piece: rowwise blocks, data to memory, scales to staging.
    Returns the fix-up bits of the two rows (bit r: r = inf)."""
    rows = [rp * 2, rp * 2 + 1]
    w = []
    s_rows = []
    for r in rows:
        w.append(_row_words(ctx, base, r))
        ok = r < tile.n_ok
        loaded = ld("global", ctx.s_row_addr + (tile.first + Int64(r)) * 4, pred=pred(ok & ctx.per_row))[0]
        s_rows.append(sel(ctx.per_row, f32(loaded), s_grp, Float32))
    m0, m1 = hmax_tree(w[0]), hmax_tree(w[1])
    mm = hmax_abs(prmt(m0, m1, 0x5410), prmt(m0, m1, 0x7632))
    scales = nvfp4_pair_scales(facts, amax_halves(mm), s_rows)
    fix = Uint32(0)
    for h in range(2):
        r = rows[h]
        d, rr, skip, need = scales[h]
        codes = e2m1_bf16(facts, w[h], "row", 0, rr)
        _store_row(ctx, tile, r, [sel(skip, 0, cw, Uint32) for cw in codes])
        st("shared", ctx.rs_stage + (ctx.g * 16 + r) * 4 + ctx.c, d, 8)
        fix = fix | (sel(need, 1, 0, Uint32) << Uint32(r))
    return fix


def _quantize_cols(ctx, facts, tile, place, base, s_grp, t2):
    """Column pair t2 of the lane's piece: two columnwise blocks. Returns their fix-up bits (bit
    16 + column)."""
    h = t2 >> 2
    wsel = t2 & 3
    kw = t2
    words = _col_words(ctx, base, h, wsel)
    cm = hmax_tree(words)
    scales = nvfp4_pair_scales(facts, amax_halves(cm), [s_grp, s_grp])
    fix = Uint32(0)
    for e in range(2):
        d, rr, skip, need = scales[e]
        cc = kw * 2 + e
        codes = e2m1_bf16(facts, words, "col", e, rr)
        _store_col(ctx, tile, place, cc, [sel(skip, 0, cw, Uint32) for cw in codes])
        col = tile.col0 + Int64(cc)
        scale_at = place.s_off + col * place.s_stride + tile.j
        scale_ok = place.blk_ok & (scale_at >= Int64(0)) & (scale_at < ctx.col_scale_bytes) & (~place.oct_ok)
        st("global", ctx.col_scale_addr + scale_at, d, 8, pred(scale_ok))
        st("shared", ctx.cs_stage + (ctx.c * 16 + cc) * 8 + ctx.g, d, 8)
        fix = fix | (sel(need, 1, 0, Uint32) << Uint32(16 + cc))
    return fix


def _flush_scales(ctx, tile, place):
    """Staged scale bytes to memory: rowwise 4 bytes a row, columnwise 8 bytes a column."""
    k_cols = ctx.k_cols
    lane = ctx.lane
    quad = (k_cols % 64) == Int64(0)
    first_w = split64(tile.first)
    row_col0 = Int64(tile.ct) * WARP_TILE_COLS
    for q in range(4):
        big = lane + 32 * q  # row of the tile
        src = (big >> 4) * 4  # a lane of the block holding it
        first = join64(shfl_idx(first_w[0], src), shfl_idx(first_w[1], src))
        n_ok = Int32(shfl_idx(Uint32(tile.n_ok), src))
        ok = (big & 15) < n_ok
        word = ld("shared", ctx.rs_stage + big * 4, 1)[0]
        at = ctx.row_scale_addr + (first + Int64(big & 15)) * (k_cols // 16) + row_col0 // 16
        st("global", at, word, 32, pred(ok & quad))
        for b in range(4):
            st("global", at + b, word >> Uint32(8 * b), 8, pred(ok & (~quad) & (row_col0 + 16 * b < k_cols)))
    j0 = tile.j - Int64(ctx.g)
    v = ld("shared", ctx.cs_stage + lane * 16, 4)
    for e in range(2):
        col = row_col0 + Int64(lane * 2 + e)
        scale_at = place.s_off + col * place.s_stride + j0
        ok = place.oct_ok & (col < k_cols) & (scale_at >= Int64(0)) & (scale_at + 8 <= ctx.col_scale_bytes)
        st("global", ctx.col_scale_addr + scale_at, v[2 * e:2 * e + 2], 32, pred(ok))


@cute.kernel
def fused_rowcol_nvfp4_bf16_kernel(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor, s_row: cute.Tensor, s_col: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, row_s_mode: Int32,
    col_data_bytes: Int64, col_scale_bytes: Int64, group_rows: Int32, facts: cutlass.Constexpr,
):
    warps = WARP_TILE_WARPS
    tid = Int32(cute.arch.thread_idx()[0])
    lane = tid % 32
    warp = tid // 32
    smem = cutlass.utils.SmemAllocator()
    buf = smem.allocate_tensor(Uint8, cute.make_layout(warps * WARP_SMEM), byte_alignment=128)
    wbase = Int32(buf.iterator.toint()) + warp * WARP_SMEM
    n_rt, n_ct, total_blocks = tile_counts(table, n_groups, k_cols, BLOCK, TILE_ROWS, WARP_TILE_COLS)
    n_tiles = Int32(n_rt * n_ct)
    bid, _, _ = cute.arch.block_idx()
    nb, _, _ = cute.arch.grid_dim()
    gw = Int32(bid) * warps + warp  # this warp's first tile
    tw = Int32(nb) * warps  # warps in the grid: the tile stride
    count = sel(gw < n_tiles, (n_tiles - gw + tw - 1) // tw, 0, Int32)
    # what every tile of this warp shares
    ctx = SimpleNamespace(table=table, n_groups=n_groups, steps=steps, total_blocks=total_blocks, m_rows=m_rows,
                          k_cols=k_cols, row_pitch=k_cols * 2, n_rt=Int32(n_rt), n_ct=Int32(n_ct),
                          group_rows=group_rows, lane=lane, lane7=lane & 7, g=lane >> 2, c=lane & 3,
                          x_addr=x.iterator.toint(), row_data_addr=row_data.iterator.toint(),
                          row_scale_addr=row_scale.iterator.toint(), col_data_addr=col_data.iterator.toint(),
                          col_scale_addr=col_scale.iterator.toint(), s_row_addr=s_row.iterator.toint(),
                          per_row=row_s_mode != 0, col_data_bytes=col_data_bytes, col_scale_bytes=col_scale_bytes,
                          rs_stage=wbase + STAGE_BYTES, cs_stage=wbase + STAGE_BYTES + 512)
    for it in cutlass.range(count, unroll=1):
        t = gw + it * tw
        _issue_tile(ctx, t, wbase)
        cute.arch.cp_async_commit_group()
        tile = _tile_info(ctx, t)
        s_grp = s_col[tile.grp]
        trow = tile.trow
        s_off = table[trow + SCALE_OFFSET]
        s_stride = table[trow + SCALE_STRIDE]
        grp0 = Int32(shfl_idx(Uint32(tile.grp), 0))
        oct_ok = vote_all(pred((tile.valid > Int64(0)) & (tile.grp == grp0)
                               & ((ctx.col_scale_addr + s_off + tile.j - Int64(ctx.g)) % 8 == Int64(0))
                               & (s_stride % 8 == Int64(0)))) != 0
        place = SimpleNamespace(d_off=table[trow + DATA_OFFSET], d_stride=table[trow + DATA_STRIDE], s_off=s_off,
                                s_stride=s_stride, blk_ok=(tile.col0 < k_cols) & (tile.valid > Int64(0)),
                                oct_ok=oct_ok)
        base = wbase + lane * 512
        cute.arch.cp_async_wait_group(0)
        cute.arch.sync_warp()  # the piece of a lane was loaded by the four lanes of its block row
        fix = Uint32(0)
        for rp in cutlass.range(8, unroll=1):
            fix = fix | _quantize_rows(ctx, facts, tile, base, s_grp, rp)
        for t2 in cutlass.range(8, unroll=1):
            fix = fix | _quantize_cols(ctx, facts, tile, place, base, s_grp, t2)
        # r = inf (S / d overflowed) with codes used: zero values must keep code 0 (rare: a group of
        # subnormals); those blocks again, from the staged input still here
        if vote_any(pred(fix != Uint32(0))) != 0:
            for fr in cutlass.range(16, unroll=1):
                if ((fix >> Uint32(fr)) & Uint32(1)) != Uint32(0):
                    _store_row(ctx, tile, fr, e2m1_bf16(facts, _row_words(ctx, base, fr), "row", 0, Float32(0.0), True))
            for fc in cutlass.range(16, unroll=1):
                if ((fix >> Uint32(16 + fc)) & Uint32(1)) != Uint32(0):
                    fkw = fc >> 1
                    fwords = _col_words(ctx, base, fkw >> 2, fkw & 3)
                    c0 = e2m1_bf16(facts, fwords, "col", 0, Float32(0.0), True)
                    c1 = e2m1_bf16(facts, fwords, "col", 1, Float32(0.0), True)
                    odd = (fc & 1) != 0
                    _store_col(ctx, tile, place, fc, [sel(odd, c1[i], c0[i], Uint32) for i in range(2)])
        cute.arch.sync_warp()
        _flush_scales(ctx, tile, place)
        cute.arch.sync_warp()


def launch(x, table, row_data, row_scale, col_data, col_scale, s_row, s_col, scalars, grid_ctas, stream, facts):
    """Launch from a @cute.jit entry (fused_rowcol_entry.py); scalars: n_groups .. group_rows."""
    fused_rowcol_nvfp4_bf16_kernel(
        x, table, row_data, row_scale, col_data, col_scale, s_row, s_col, *scalars, facts
    ).launch(grid=(grid_ctas, 1, 1), block=(32 * WARP_TILE_WARPS, 1, 1), smem=WARP_TILE_WARPS * WARP_SMEM,
             stream=stream)
