"""group_amax's kernel (device code): each NVFP4 group's finite amax, and its S from it.

The amax is exact: a max of fp32 bit patterns with the sign cleared, NaN and Inf ignored, no
arithmetic. A CTA streams along its rows (a contiguous run of AMAX_ROWS x AMAX_COLS tiles,
column tile fastest) and does one atomic max a group it met; the last CTA to finish turns every
amax into S, so S costs no further launch.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint32

from ..ptx import atom_add_u32, div_rn, f32, fence_gpu, fp32_bits, ld, red_max_u32, sel, st, u32, warp_max_u32
from .codec import ABS_MASK, INF_BITS
from .config import AMAX_COLS, AMAX_ROWS, AMAX_THREADS, ROW_START
from .tiles import find_block, tile_counts

FP32_MAX_BITS = 0x7F7FFFFF


def _tile_range(table: cute.Tensor, n_groups: Int32, k_cols: Int64, n: int):
    """This CTA's contiguous share of the tiles, numbered column tile fastest. Returns (first row
    tile, first column tile, count, column tiles, padded blocks)."""
    n_rt, n_ct, total_blocks = tile_counts(table, n_groups, k_cols, n, AMAX_ROWS, AMAX_COLS)
    n_tiles = n_rt * n_ct
    bid, _, _ = cute.arch.block_idx()
    nb, _, _ = cute.arch.grid_dim()
    start = Int64(bid) * n_tiles // Int64(nb)
    count = Int32((Int64(bid) + 1) * n_tiles // Int64(nb) - start)
    rt = start // n_ct
    return Int32(rt), Int32(start - rt * n_ct), count, Int32(n_ct), total_blocks


def _next_tile(rt: Int32, ct: Int32, n_ct: Int32):
    """The tile after (rt, ct) in column tile fastest order."""
    wrap = ct + 1 == n_ct
    return sel(wrap, rt + 1, rt, Int32), sel(wrap, 0, ct + 1, Int32)


def _tile_blocks(table, rt: Int32, ct: Int32, n_groups, steps, total_blocks, n: int):
    """(column 0 of tile (rt, ct), [(group, table row, j, valid rows, first x row)] per padded block)."""
    tb = AMAX_ROWS // n
    blocks = []
    for bi in range(tb):
        g, row, j, valid = find_block(table, Int64(rt) * tb + bi, n_groups, steps, total_blocks, n)
        blocks.append((g, row, j, valid, table[row + ROW_START] + j * n))
    return Int64(ct) * AMAX_COLS, blocks


def _finite_abs(bits: Uint32) -> Uint32:
    a = bits & Uint32(ABS_MASK)
    return sel(a < Uint32(INF_BITS), a, 0, Uint32)


@cute.jit
def _flush(acc: Uint32, group: Int32, out_addr: Int64, reduce_addr: Int32, tid: Int32):
    """CTA max of acc -> one atomic max into out[group] (every thread calls; group is CTA-uniform)."""
    m = warp_max_u32(acc)
    if tid % 32 == 0:
        st("shared", reduce_addr + (tid // 32) * 4, m)
    cute.arch.sync_threads()
    if tid == 0 and group >= 0:
        w = ld("shared", reduce_addr, 4)
        total = cutlass.max(cutlass.max(w[0], w[1]), cutlass.max(w[2], w[3]))
        if total > Uint32(0):
            red_max_u32(out_addr + Int64(group) * 4, total)
    cute.arch.sync_threads()


def _global_scale_bits(facts, amax_bits: Uint32) -> Uint32:
    """NVFP4's S from a finite amax >= 0: fp32(amax_to_s / amax) capped at the largest finite fp32
    (a min of bit patterns: both positive), 1 where amax = 0."""
    s = u32(div_rn(Float32(facts.amax_to_s), f32(amax_bits)))
    return sel(amax_bits == Uint32(0), fp32_bits(1.0), cutlass.min(s, Uint32(FP32_MAX_BITS)), Uint32)


@cute.jit
def _last_cta_scales(facts: cutlass.Constexpr, out_addr: Int64, scale_addr: Int64, n_groups: Int32,
                     reduce_addr: Int32, tid: Int32):
    """Count this CTA done in out[n_groups]; the last one to finish turns every group's amax into
    S. Thread 0 did this CTA's atomic maxes, so its acquire-release count orders them before the
    last CTA's reads (the usual "last block" reduction)."""
    if tid == 0:
        fence_gpu()
        done = atom_add_u32(out_addr + Int64(n_groups) * 4, 1)
        st("shared", reduce_addr, sel(done == Uint32(cute.arch.grid_dim()[0] - 1), 1, 0, Uint32))
    cute.arch.sync_threads()
    if ld("shared", reduce_addr)[0] != Uint32(0):
        fence_gpu()
        for g in cutlass.range(tid, n_groups, AMAX_THREADS, unroll=1):
            amax = ld("global", out_addr + Int64(g) * 4, ld="ld.relaxed.gpu.global")[0]
            st("global", scale_addr + Int64(g) * 4, _global_scale_bits(facts, amax))


@cute.kernel
def amax_kernel(x: cute.Tensor, table: cute.Tensor, out: cute.Tensor, scale: cute.Tensor, n_groups: Int32,
                steps: Int32, m_rows: Int64, k_cols: Int64, facts: cutlass.Constexpr, in_bits: cutlass.Constexpr):
    n = facts.block_size
    eb = in_bits // 8
    cpr = AMAX_COLS * eb // 16
    rows_per_load = AMAX_THREADS // cpr
    n_loads = AMAX_ROWS // rows_per_load
    tid = Int32(cute.arch.thread_idx()[0])
    smem = cutlass.utils.SmemAllocator()
    reduce = smem.allocate_tensor(Uint32, cute.make_layout(AMAX_THREADS // 32), byte_alignment=16)
    reduce_addr = reduce.iterator.toint()
    x_addr = x.iterator.toint()
    out_addr = out.iterator.toint()
    rt, ct, count, n_ct, total_blocks = _tile_range(table, n_groups, k_cols, n)
    chunk = tid % cpr
    u = tid // cpr
    current = Int32(-1)
    acc = Uint32(0)
    for it in cutlass.range(count, unroll=1):
        col0, blocks = _tile_blocks(table, rt, ct, n_groups, steps, total_blocks, n)
        rt, ct = _next_tile(rt, ct, n_ct)
        chunk_col = col0 + Int64(chunk * (16 // eb))
        col_ok = chunk_col < k_cols
        loaded = []
        for i in cutlass.range_constexpr(n_loads):
            r = i * rows_per_load
            bi = r // n
            local = Int64(r - bi * n) + Int64(u)
            src_row = blocks[bi][4] + local
            ok = col_ok & (local < blocks[bi][3]) & (src_row < m_rows)
            src = sel(ok, x_addr + (src_row * k_cols + chunk_col) * eb, x_addr, Int64)
            loaded.append(ld("global", src, 4, pred=sel(ok, 1, 0, Int32)))
        for gbi in cutlass.range_constexpr(AMAX_ROWS // n):
            if blocks[gbi][0] != current:
                _flush(acc, current, out_addr, reduce_addr, tid)
                current = blocks[gbi][0]
                acc = Uint32(0)
            for gi in cutlass.range_constexpr(n_loads):
                if cutlass.const_expr((gi * rows_per_load) // n == gbi):
                    for w in loaded[gi]:
                        if cutlass.const_expr(in_bits == 16):
                            acc = cutlass.max(acc, _finite_abs(w << Uint32(16)))
                            acc = cutlass.max(acc, _finite_abs(w & Uint32(0xFFFF0000)))
                        else:
                            acc = cutlass.max(acc, _finite_abs(w))
    _flush(acc, current, out_addr, reduce_addr, tid)
    _last_cta_scales(facts, out_addr, scale.iterator.toint(), n_groups, reduce_addr, tid)


@cute.jit
def amax_host(x: cute.Tensor, table: cute.Tensor, out: cute.Tensor, scale: cute.Tensor, n_groups: Int32,
              steps: Int32, m_rows: Int64, k_cols: Int64, grid_ctas: Int32, facts: cutlass.Constexpr, stream):
    amax_kernel(x, table, out, scale, n_groups, steps, m_rows, k_cols, facts, x.element_type.width).launch(
        grid=(grid_ctas, 1, 1), block=(AMAX_THREADS, 1, 1), smem=64, stream=stream
    )
