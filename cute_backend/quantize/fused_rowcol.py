"""quantize_both's shared-memory tile kernel (device code): both directions in one pass over x.

Serves fp32 x (and bf16 x too large for the bf16 kernels' 32-bit tile numbers). Tiles of
TILE_ROWS x TILE_COLS, a tile's rows TILE_ROWS / block consecutive padded blocks of the group
table, each block's rows from its own group: rows past the group's end (and columns past K) load
as zeros, so a columnwise block never straddles a group, and are not written rowwise.

A persistent grid takes units of ``ct_group`` neighbouring column tiles of one row tile, row tile
fastest, grid-stride: CTAs running together work on neighbouring rows of the same columns, so the
pieces of each transposed output row are written together. A CTA loads its tiles by 16-byte
cp.async, ``stages`` deep (XOR-swizzled chunks: no bank conflicts); a few threads look up each
tile's blocks in the group table ahead of time into shared memory; each thread quantizes one row
of the tile (two 32-element segments) and two columns of 32 rows into shared staging buffers
(again swizzled), which the CTA then writes out with 16-byte stores, a warp covering whole
128-byte runs of the column output and of the row output.

In the @cute.jit helpers a name assigned inside a run-time ``if`` is unique to it: the DSL
carries a name across a region when it was assigned before.
"""

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint8, Uint32

from .codec import mxfp8_block, nvfp4_block, packed_amax
from .config import (DATA_OFFSET, DATA_STRIDE, ROW_START, SCALE_OFFSET, SCALE_STRIDE, TILE_COLS, TILE_ROWS,
                     TILE_STAGES, TILE_THREADS)
from .ptx import cp_async16, f32, join64, ld, sel, split64, st, u32
from .tiles import find_block, tile_counts

# A tile's group facts live in shared memory, one INFO_BYTES record a padded block, written by
# thread bi for block bi: first x row, j, DATA_OFFSET, DATA_STRIDE, SCALE_OFFSET, SCALE_STRIDE
# (Int64 each, from byte 0), then valid rows (Int32), group (Int32), the group's S (fp32 bits).
INFO_BYTES = 64
_J, _DATA_PLACE, _SCALE_PLACE, _VALID = 8, 16, 32, 48


@dataclass(frozen=True)
class TileShape:
    """Sizes of a tile and of its shared-memory buffers, in bytes unless said (Python ints)."""

    block: int  # elements a block
    epb: int  # elements a data byte
    nvfp4: bool
    bf16: bool
    in_bytes: int  # bytes an input element
    stages: int

    @staticmethod
    def of(facts, in_bits: int, stages: int) -> "TileShape":
        return TileShape(facts.block_size, facts.elements_per_byte, facts.name == "nvfp4", in_bits == 16,
                         in_bits // 8, stages)

    @property
    def blocks(self) -> int:  # padded blocks a tile
        return TILE_ROWS // self.block

    @property
    def row_bytes(self) -> int:  # a staged input row
        return TILE_COLS * self.in_bytes

    @property
    def tile_bytes(self) -> int:  # one stage
        return TILE_ROWS * self.row_bytes

    @property
    def col_out(self) -> int:  # staged data of one column (all the tile's blocks)
        return TILE_ROWS // self.epb

    @property
    def row_out(self) -> int:  # staged data of one row
        return TILE_COLS // self.epb

    @property
    def slots(self) -> int:  # info records: tiles it .. it + stages live in iteration it
        return self.stages + 2

    def smem_bytes(self) -> int:
        return (self.stages * self.tile_bytes + TILE_COLS * self.col_out + TILE_ROWS * self.row_out
                + TILE_COLS * self.blocks + self.slots * self.blocks * INFO_BYTES + 512)


# ---- schedule ----------------------------------------------------------------------------------


def _unit_schedule(table: cute.Tensor, n_groups: Int32, k_cols: Int64, n: int, ct_group: Int32):
    """Units of ct_group neighbouring column tiles of one row tile, numbered row tile fastest,
    dealt to the CTAs grid-stride; a CTA reads ct_group * TILE_COLS contiguous elements of each of
    its rows. Returns (row tile, column unit, tiles of this CTA counting a unit's column tiles past
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


def _next_unit_tile(rt: Int32, cu: Int32, h: Int32, n_rt: Int32, dq: Int32, dr: Int32, ct_group: Int32):
    """The next tile (row tile, column unit, tile in the unit) of this CTA."""
    last = h + 1 == ct_group
    rt2 = rt + dr
    wrap = rt2 >= n_rt
    new_rt = sel(wrap, rt2 - n_rt, rt2, Int32)
    new_cu = cu + dq + sel(wrap, 1, 0, Int32)
    return (sel(last, new_rt, rt, Int32), sel(last, new_cu, cu, Int32), sel(last, 0, h + 1, Int32))


# ---- a tile's group facts ----------------------------------------------------------------------


def _write_info(table, s_col, slot_addr: Int32, tid: Int32, rt: Int32, n_groups, steps, total_blocks, n: int,
                nvfp4: bool):
    """Thread bi < TILE_ROWS / n: look block bi of row tile rt up and store its record."""
    g, row, j, valid = find_block(table, Int64(rt) * (TILE_ROWS // n) + Int64(tid), n_groups, steps,
                                  total_blocks, n)
    first = table[row + ROW_START] + j * n
    s_bits = Uint32(0)
    if nvfp4:
        s_bits = u32(s_col[g])
    at = slot_addr + tid * INFO_BYTES
    st("shared", at, split64(first) + split64(j))
    st("shared", at + 16, split64(table[row + DATA_OFFSET]) + split64(table[row + DATA_STRIDE]))
    st("shared", at + 32, split64(table[row + SCALE_OFFSET]) + split64(table[row + SCALE_STRIDE]))
    st("shared", at + 48, [Uint32(valid), Uint32(g), s_bits, Uint32(0)])


def _read_first_valid(slot_addr: Int32, bi):
    """(first x row, valid rows, group S bits) of block bi's record."""
    w = ld("shared", slot_addr + bi * INFO_BYTES, 2)
    v = ld("shared", slot_addr + bi * INFO_BYTES + _VALID, 4)
    return join64(w[0], w[1]), Int64(Int32(v[0])), v[2]


def _read_placement(slot_addr: Int32, bi, data: bool):
    """(j, offset, stride, valid rows) of block bi's record: data's or scale's."""
    w = ld("shared", slot_addr + bi * INFO_BYTES + _J, 2)
    p = ld("shared", slot_addr + bi * INFO_BYTES + (_DATA_PLACE if data else _SCALE_PLACE), 4)
    v = ld("shared", slot_addr + bi * INFO_BYTES + _VALID, 1)
    return join64(w[0], w[1]), join64(p[0], p[1]), join64(p[2], p[3]), Int64(Int32(v[0]))


def _issue_tile(x_addr: Int64, stage_addr: Int32, slot_addr: Int32, tid: Int32, col0: Int64, m_rows: Int64,
                k_cols: Int64, n: int, eb: int):
    """cp.async the tile's rows (zeros for rows past their group, past x, or columns past K).

    The tile lands XOR-swizzled: 16-byte chunk L of row r at slot L ^ (r & 7), so a warp reading
    one chunk of 8 rows, a whole row, or a run of 4-/8-byte columns meets every bank once.
    """
    row_bytes = TILE_COLS * eb
    cpr = row_bytes // 16  # 16-byte chunks a row
    rows_per_load = TILE_THREADS // cpr
    chunk = tid % cpr
    u = tid // cpr
    chunk_col = col0 + Int64(chunk * (16 // eb))
    col_ok = chunk_col < k_cols
    dst = stage_addr + u * row_bytes + (chunk ^ (u & 7)) * 16  # rows_per_load is a multiple of 8
    records = {}
    for i in range(TILE_ROWS // rows_per_load):
        r = i * rows_per_load  # + u
        bi = r // n  # u < rows_per_load never crosses a block
        if bi not in records:
            records[bi] = _read_first_valid(slot_addr, bi)
        first, valid, _ = records[bi]
        local = Int64(r - bi * n) + Int64(u)
        src_row = first + local
        ok = col_ok & (local < valid) & (src_row < m_rows)
        src = sel(ok, x_addr + (src_row * k_cols + chunk_col) * eb, x_addr, Int64)
        cp_async16(dst + r * row_bytes, src, sel(ok, 16, 0, Int32))


# ---- quantize a staged tile into the output staging buffers -------------------------------------


@cute.jit
def _quantize_row(shape: cutlass.Constexpr, facts: cutlass.Constexpr, tid: Int32, stage_addr, slot, col0: Int64,
                  k_cols: Int64, k64, row_block: Int32, row_local: Int64, row_stage: Int32, row_scale_addr: Int64,
                  s_row: cute.Tensor, row_s_mode: Int32):
    """Row ``tid`` of the tile (TILE_COLS / 32 segments of 32): data into the row staging buffer,
    its 2 (MXFP8) / 4 (NVFP4) scale bytes straight to memory."""
    n = shape.block
    seg_chunks = 32 * shape.in_bytes // 16  # 16-byte input chunks of a 32-element row segment
    rfirst, rvalid, rs_bits = _read_first_valid(slot, row_block)
    xrow = rfirst + row_local
    if row_local < rvalid and col0 < k_cols:
        rs = Float32(1.0)
        if cutlass.const_expr(shape.nvfp4):
            rs = f32(rs_bits)
            if row_s_mode != 0:
                rs = s_row[xrow]
        rscales = Uint32(0)
        for seg in cutlass.range_constexpr(TILE_COLS // 32):
            rsrc = stage_addr + tid * shape.row_bytes
            rxb = cute.make_rmem_tensor(32, Uint32)
            rpacked = cute.make_rmem_tensor(16, Uint32)
            for rc in cutlass.range_constexpr(seg_chunks):
                w4 = ld("shared", rsrc + ((seg * seg_chunks + rc) ^ (tid & 7)) * 16, 4)
                for rq in cutlass.range_constexpr(4):
                    if cutlass.const_expr(shape.bf16):
                        rpacked[4 * rc + rq] = w4[rq]
                        rxb[8 * rc + 2 * rq] = w4[rq] << Uint32(16)
                        rxb[8 * rc + 2 * rq + 1] = w4[rq] & Uint32(0xFFFF0000)
                    else:
                        rxb[4 * rc + rq] = w4[rq]
            rout = row_stage + tid * shape.row_out
            if cutlass.const_expr(not shape.nvfp4):
                ramax = None
                if cutlass.const_expr(shape.bf16):
                    rm = packed_amax(rpacked, 0, 16)
                    ramax = cutlass.max(rm & Uint32(0xFFFF), rm >> Uint32(16)) << Uint32(16)
                rwords = cute.make_rmem_tensor(8, Uint32)
                rbyte = mxfp8_block(facts, rxb, rwords, ramax)
                # 32 bytes = chunks 2 seg, 2 seg + 1 of the row's 4; slot k ^ ((row >> 1) & 3)
                for rk in cutlass.range_constexpr(2):
                    st("shared", rout + ((2 * seg + rk) ^ ((tid >> 1) & 3)) * 16,
                       [rwords[4 * rk + i] for i in range(4)])
                rscales = rscales | (rbyte << Uint32(8 * seg))
            else:
                rwords = cute.make_rmem_tensor(4, Uint32)
                for rh in cutlass.range_constexpr(2):
                    rxh = cute.make_rmem_tensor(16, Uint32)
                    for ri in cutlass.range_constexpr(16):
                        rxh[ri] = rxb[16 * rh + ri]
                    rhmax = None
                    if cutlass.const_expr(shape.bf16):
                        rhm = packed_amax(rpacked, 8 * rh, 8)
                        rhmax = cutlass.max(rhm & Uint32(0xFFFF), rhm >> Uint32(16)) << Uint32(16)
                    rwh = cute.make_rmem_tensor(2, Uint32)
                    rhbyte = nvfp4_block(facts, rxh, rwh, rs, rhmax)
                    rwords[2 * rh] = rwh[0]
                    rwords[2 * rh + 1] = rwh[1]
                    rscales = rscales | (rhbyte << Uint32(8 * (2 * seg + rh)))
                # 16 bytes = chunk seg of the row's 2; slot seg ^ ((row >> 2) & 1)
                st("shared", rout + (seg ^ ((tid >> 2) & 1)) * 16, [rwords[0], rwords[1], rwords[2], rwords[3]])
        rsat = row_scale_addr + xrow * (k_cols // n) + col0 // n
        rfull = col0 + TILE_COLS <= k_cols
        if cutlass.const_expr(not shape.nvfp4):
            if rfull and k64:
                st("global", rsat, rscales, 16)
            else:
                st("global", rsat, rscales, 8)
                if col0 + 32 < k_cols:
                    st("global", rsat + 1, rscales >> Uint32(8), 8)
        else:
            if rfull and k64:
                st("global", rsat, [rscales])
            else:
                for rb in cutlass.range_constexpr(4):
                    if col0 + 16 * rb < k_cols:
                        st("global", rsat + rb, rscales >> Uint32(8 * rb), 8)


@cute.jit
def _quantize_columns(shape: cutlass.Constexpr, facts: cutlass.Constexpr, stage_addr, slot, col0: Int64,
                      k_cols: Int64, cpair: Int32, quarter: Int32, col_byte: Int32, col_stage: Int32,
                      col_scale_stage: Int32):
    """Columns 2 cpair, 2 cpair + 1 of rows 32 quarter .. 32 quarter + 31: data and scale bytes into
    the column staging buffers."""
    n = shape.block
    lo = cute.make_rmem_tensor(32, Uint32)  # bf16: both columns packed; fp32: column 2 cpair
    hi = cute.make_rmem_tensor(32, Uint32)  # fp32: column 2 cpair + 1
    for rr in cutlass.range_constexpr(32):
        crow = 32 * quarter + rr
        caddr = stage_addr + crow * shape.row_bytes + (((col_byte // 16) ^ (rr & 7)) * 16) + col_byte % 16
        if cutlass.const_expr(shape.bf16):
            lo[rr] = ld("shared", caddr, 1)[0]
        else:
            pair = ld("shared", caddr, 2)
            lo[rr] = pair[0]
            hi[rr] = pair[1]
    for cb in cutlass.range_constexpr(32 // n):
        cbi = quarter * (32 // n) + cb  # the tile's block this thread quantizes
        cfirst, cvalid, cs_bits = _read_first_valid(slot, cbi)
        if cvalid > Int64(0) and col0 < k_cols:
            cm = Uint32(0)
            if cutlass.const_expr(shape.bf16):
                cm = packed_amax(lo, cb * n, n)
            cs = f32(cs_bits)
            for ch in cutlass.range_constexpr(2):
                cc = 2 * cpair + ch  # column within the tile
                cxb = cute.make_rmem_tensor(n, Uint32)
                for ci in cutlass.range_constexpr(n):
                    if cutlass.const_expr(shape.bf16):
                        if cutlass.const_expr(ch == 0):
                            cxb[ci] = lo[cb * n + ci] << Uint32(16)
                        else:
                            cxb[ci] = lo[cb * n + ci] & Uint32(0xFFFF0000)
                    else:
                        cxb[ci] = lo[cb * n + ci] if ch == 0 else hi[cb * n + ci]
                camax = None
                if cutlass.const_expr(shape.bf16):
                    camax = (cm << Uint32(16)) if ch == 0 else (cm & Uint32(0xFFFF0000))
                cwords = cute.make_rmem_tensor(n // shape.epb // 4, Uint32)
                if cutlass.const_expr(not shape.nvfp4):
                    cbyte = mxfp8_block(facts, cxb, cwords, camax)
                    # 32 bytes = chunks 2 quarter, 2 quarter + 1 of the column's 8; slot k ^ (cpair & 7)
                    for ck in cutlass.range_constexpr(2):
                        st("shared", col_stage + cc * shape.col_out + ((2 * quarter + ck) ^ (cpair & 7)) * 16,
                           [cwords[4 * ck + i] for i in range(4)])
                else:
                    cbyte = nvfp4_block(facts, cxb, cwords, cs, camax)
                    # 8 bytes = half cb of chunk quarter of the column's 4; slot quarter ^ (cpair & 3)
                    st("shared", col_stage + cc * shape.col_out + (quarter ^ (cpair & 3)) * 16 + 8 * cb,
                       [cwords[0], cwords[1]])
                st("shared", col_scale_stage + cc * shape.blocks + cbi, cbyte, 8)


# ---- write the staged tile out: every warp store covers whole runs of an output row -------------


@cute.jit
def _write_row_data(shape: cutlass.Constexpr, tid: Int32, slot, col0: Int64, k_cols: Int64, k32, row_stage: Int32,
                    row_data_addr: Int64):
    """TILE_ROWS rows x row_out bytes, 16-byte chunks, a row's chunks on neighbouring threads."""
    n = shape.block
    row_chunks = shape.row_out // 16
    for wi in cutlass.range_constexpr(TILE_ROWS * row_chunks // TILE_THREADS):
        wk = tid + TILE_THREADS * wi
        wr = wk // row_chunks
        wq = wk % row_chunks
        wfirst, wvalid, _ws = _read_first_valid(slot, wr // n)
        wlocal = Int64(wr - (wr // n) * n)
        wseg_col = col0 + Int64((16 if not shape.nvfp4 else 32) * wq)  # first column of the chunk
        if wlocal < wvalid and wseg_col < k_cols:
            wsw = ((wr >> 1) & 3) if not shape.nvfp4 else ((wr >> 2) & 1)
            ww = ld("shared", row_stage + wr * shape.row_out + (wq ^ wsw) * 16, 4)
            wxrow = wfirst + wlocal
            if cutlass.const_expr(not shape.nvfp4):
                st("global", row_data_addr + wxrow * k_cols + wseg_col, ww)
            else:
                wat = row_data_addr + wxrow * (k_cols // 2) + wseg_col // 2
                if k32 and wseg_col + 16 < k_cols:
                    st("global", wat, ww)
                else:
                    st("global", wat, [ww[0], ww[1]])
                    if wseg_col + 16 < k_cols:
                        st("global", wat + 8, [ww[2], ww[3]])


@cute.jit
def _write_col_data(shape: cutlass.Constexpr, tid: Int32, slot, col0: Int64, k_cols: Int64, col_stage: Int32,
                    col_data_addr: Int64, col_data_bytes: Int64):
    """TILE_COLS columns x col_out bytes."""
    col_chunks = shape.col_out // 16
    block_bytes = shape.block // shape.epb
    for vi in cutlass.range_constexpr(TILE_COLS * col_chunks // TILE_THREADS):
        vk = tid + TILE_THREADS * vi
        vc = vk // col_chunks
        vq = vk % col_chunks
        vcol = col0 + Int64(vc)
        vsw = ((vc >> 1) & 7) if not shape.nvfp4 else ((vc >> 1) & 3)
        vw = ld("shared", col_stage + vc * shape.col_out + (vq ^ vsw) * 16, 4)
        for vh in cutlass.range_constexpr(2 if shape.nvfp4 else 1):
            vbi = (vq // 2) if not shape.nvfp4 else (2 * vq + vh)
            vj, voff, vstride, vvalid = _read_placement(slot, vbi, True)
            if vvalid > Int64(0) and vcol < k_cols:
                vat = voff + vcol * vstride + vj * block_bytes
                if vat >= Int64(0) and vat + block_bytes <= col_data_bytes:
                    if cutlass.const_expr(not shape.nvfp4):
                        st("global", col_data_addr + vat + 16 * (vq % 2), vw)
                    else:
                        st("global", col_data_addr + vat, [vw[2 * vh], vw[2 * vh + 1]])


@cute.jit
def _write_col_scales(shape: cutlass.Constexpr, tid: Int32, slot, col0: Int64, k_cols: Int64,
                      col_scale_stage: Int32, col_scale_addr: Int64, col_scale_bytes: Int64):
    """TILE_COLS columns x the tile's blocks, a byte each."""
    tb = shape.blocks
    for si in cutlass.range_constexpr(TILE_COLS * tb // TILE_THREADS):
        sk = tid + TILE_THREADS * si
        sc = sk // tb
        sbi = sk % tb
        scol = col0 + Int64(sc)
        sj, soff, sstride, svalid = _read_placement(slot, sbi, False)
        if svalid > Int64(0) and scol < k_cols:
            sat = soff + scol * sstride + sj
            if sat >= Int64(0) and sat < col_scale_bytes:
                st("global", col_scale_addr + sat, ld("shared", col_scale_stage + sk, bits=8)[0], 8)


# ---- the kernel ---------------------------------------------------------------------------------


@cute.kernel
def fused_rowcol_kernel(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor, s_row: cute.Tensor, s_col: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, row_s_mode: Int32,
    col_data_bytes: Int64, col_scale_bytes: Int64, ct_group: Int32,
    facts: cutlass.Constexpr, in_bits: cutlass.Constexpr, stages: cutlass.Constexpr,
):
    shape = TileShape.of(facts, in_bits, stages)
    n, tb, eb = shape.block, shape.blocks, shape.in_bytes
    info_bytes = tb * INFO_BYTES  # one tile's records

    tid = Int32(cute.arch.thread_idx()[0])
    smem = cutlass.utils.SmemAllocator()
    staged = smem.allocate_tensor(Uint8, cute.make_layout(stages * shape.tile_bytes), byte_alignment=128)
    col_stage = smem.allocate_tensor(Uint8, cute.make_layout(TILE_COLS * shape.col_out), byte_alignment=128)
    row_stage = smem.allocate_tensor(Uint8, cute.make_layout(TILE_ROWS * shape.row_out), byte_alignment=128)
    col_scale_stage = smem.allocate_tensor(Uint8, cute.make_layout(TILE_COLS * tb), byte_alignment=16)
    info = smem.allocate_tensor(Uint8, cute.make_layout(shape.slots * info_bytes), byte_alignment=16)
    sbase = staged.iterator.toint()
    cbase = col_stage.iterator.toint()
    rbase = row_stage.iterator.toint()
    csbase = col_scale_stage.iterator.toint()
    ibase = info.iterator.toint()
    x_addr = x.iterator.toint()
    row_data_addr = row_data.iterator.toint()
    row_scale_addr = row_scale.iterator.toint()
    col_data_addr = col_data.iterator.toint()
    col_scale_addr = col_scale.iterator.toint()
    rt, cu, count, n_rt, n_ct, total_blocks, dq, dr = _unit_schedule(table, n_groups, k_cols, n, ct_group)
    k32 = (k_cols % 32) == Int64(0)
    k64 = (k_cols % 64) == Int64(0)

    # compute-phase roles: the row part takes row `tid`; the column part columns 2 cpair,
    # 2 cpair + 1 of rows 32 quarter .. 32 quarter + 31
    cpair = tid % 32
    quarter = tid // 32
    col_byte = 2 * eb * cpair
    row_block = tid // n
    row_local = Int64(tid - row_block * n)

    # Three cursors over this CTA's tiles, each (row tile, column unit, tile in the unit):
    # (rt, cu, h) computed next, (rt_in, cu_in, h_in) loaded next, (rt_nf, cu_nf, h_nf) looked up
    # next. Tile t's group facts sit in info slot t % slots, its input in stage t % stages.
    # Iteration it: load tile it + stages - 1, look up tile it + stages (threads < tb, overlapping
    # the wait), wait for tile it, compute it into the staging buffers, write them out.
    # A unit's column tiles past K are empty: nothing loaded, computed or written.
    h = Int32(0)
    rt_in = rt
    cu_in = cu
    h_in = h
    rt_nf = rt
    cu_nf = cu
    h_nf = h
    for pf in cutlass.range_constexpr(stages):
        if tid < tb:
            _write_info(table, s_col, ibase + pf * info_bytes, tid, rt_nf, n_groups, steps, total_blocks, n,
                        shape.nvfp4)
        rt_nf, cu_nf, h_nf = _next_unit_tile(rt_nf, cu_nf, h_nf, n_rt, dq, dr, ct_group)
    cute.arch.sync_threads()
    for p in cutlass.range_constexpr(stages - 1):
        ctp = cu_in * ct_group + h_in
        if Int32(p) < count and ctp < n_ct:
            _issue_tile(x_addr, sbase + p * shape.tile_bytes, ibase + p * info_bytes, tid, Int64(ctp) * TILE_COLS,
                        m_rows, k_cols, n, eb)
        cute.arch.cp_async_commit_group()
        rt_in, cu_in, h_in = _next_unit_tile(rt_in, cu_in, h_in, n_rt, dq, dr, ct_group)

    for it in cutlass.range(count, unroll=1):
        nxt = it + (stages - 1)
        ctn = cu_in * ct_group + h_in
        if nxt < count and ctn < n_ct:
            _issue_tile(x_addr, sbase + (nxt % stages) * shape.tile_bytes, ibase + (nxt % shape.slots) * info_bytes,
                        tid, Int64(ctn) * TILE_COLS, m_rows, k_cols, n, eb)
        cute.arch.cp_async_commit_group()
        rt_in, cu_in, h_in = _next_unit_tile(rt_in, cu_in, h_in, n_rt, dq, dr, ct_group)
        if tid < tb:
            _write_info(table, s_col, ibase + ((it + stages) % shape.slots) * info_bytes, tid, rt_nf, n_groups,
                        steps, total_blocks, n, shape.nvfp4)
        rt_nf, cu_nf, h_nf = _next_unit_tile(rt_nf, cu_nf, h_nf, n_rt, dq, dr, ct_group)
        cute.arch.cp_async_wait_group(stages - 1)
        cute.arch.sync_threads()

        stage_addr = sbase + (it % stages) * shape.tile_bytes
        slot = ibase + (it % shape.slots) * info_bytes
        col0 = Int64(cu * ct_group + h) * TILE_COLS
        rt, cu, h = _next_unit_tile(rt, cu, h, n_rt, dq, dr, ct_group)

        _quantize_row(shape, facts, tid, stage_addr, slot, col0, k_cols, k64, row_block, row_local, rbase,
                      row_scale_addr, s_row, row_s_mode)
        _quantize_columns(shape, facts, stage_addr, slot, col0, k_cols, cpair, quarter, col_byte, cbase, csbase)
        cute.arch.sync_threads()
        _write_row_data(shape, tid, slot, col0, k_cols, k32, rbase, row_data_addr)
        _write_col_data(shape, tid, slot, col0, k_cols, cbase, col_data_addr, col_data_bytes)
        _write_col_scales(shape, tid, slot, col0, k_cols, csbase, col_scale_addr, col_scale_bytes)


def _launch(x, table, row_data, row_scale, col_data, col_scale, s_row, s_col, scalars, grid_ctas, stream, facts):
    bits = x.element_type.width
    fused_rowcol_kernel(
        x, table, row_data, row_scale, col_data, col_scale, s_row, s_col, *scalars, facts, bits, TILE_STAGES
    ).launch(grid=(grid_ctas, 1, 1), block=(TILE_THREADS, 1, 1), smem=TileShape.of(facts, bits, TILE_STAGES).smem_bytes(),
             stream=stream)


@cute.jit
def fused_rowcol_mxfp8_host(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, col_data_bytes: Int64, col_scale_bytes: Int64,
    ct_group: Int32, grid_ctas: Int32, facts: cutlass.Constexpr, stream,
):
    scalars = (n_groups, steps, m_rows, k_cols, Int32(0), col_data_bytes, col_scale_bytes, ct_group)
    _launch(x, table, row_data, row_scale, col_data, col_scale, table, table, scalars, grid_ctas, stream, facts)


@cute.jit
def fused_rowcol_nvfp4_host(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor, s_row: cute.Tensor, s_col: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, row_s_mode: Int32,
    col_data_bytes: Int64, col_scale_bytes: Int64, ct_group: Int32, grid_ctas: Int32, facts: cutlass.Constexpr,
    stream,
):
    scalars = (n_groups, steps, m_rows, k_cols, row_s_mode, col_data_bytes, col_scale_bytes, ct_group)
    _launch(x, table, row_data, row_scale, col_data, col_scale, s_row, s_col, scalars, grid_ctas, stream, facts)
