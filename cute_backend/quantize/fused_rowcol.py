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

from ..ptx import cp_async16, f32, join64, ld, sel, split64, st, u32
from .codec import mxfp8_block, nvfp4_block, packed_amax
from .config import (
    DATA_OFFSET,
    DATA_STRIDE,
    ROW_START,
    SCALE_OFFSET,
    SCALE_STRIDE,
    TILE_COLS,
    TILE_ROWS,
    TILE_STAGES,
    TILE_THREADS,
)
from .tiles import find_block, next_unit_tile, unit_schedule

# A tile's group facts live in shared memory, one INFO_BYTES record a padded block, written by
# thread bi for block bi: first x row and j (Int64 each), at _DATA_PLACE its DATA_OFFSET and
# DATA_STRIDE, at _SCALE_PLACE SCALE_OFFSET and SCALE_STRIDE (Int64 each), at _VALID the valid
# rows, the group and the group's S (fp32 bits).
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
    st("shared", at + _DATA_PLACE, split64(table[row + DATA_OFFSET]) + split64(table[row + DATA_STRIDE]))
    st("shared", at + _SCALE_PLACE, split64(table[row + SCALE_OFFSET]) + split64(table[row + SCALE_STRIDE]))
    st("shared", at + _VALID, [Uint32(valid), Uint32(g), s_bits, Uint32(0)])


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
    first, valid, s_bits = _read_first_valid(slot, row_block)
    x_row = first + row_local
    if row_local < valid and col0 < k_cols:
        s = Float32(1.0)
        if cutlass.const_expr(shape.nvfp4):
            s = f32(s_bits)
            if row_s_mode != 0:
                s = s_row[x_row]
        scales = Uint32(0)
        for seg in cutlass.range_constexpr(TILE_COLS // 32):
            src = stage_addr + tid * shape.row_bytes
            xb = cute.make_rmem_tensor(32, Uint32)
            packed = cute.make_rmem_tensor(16, Uint32)
            for c in cutlass.range_constexpr(seg_chunks):
                w4 = ld("shared", src + ((seg * seg_chunks + c) ^ (tid & 7)) * 16, 4)
                for q in cutlass.range_constexpr(4):
                    if cutlass.const_expr(shape.bf16):
                        packed[4 * c + q] = w4[q]
                        xb[8 * c + 2 * q] = w4[q] << Uint32(16)
                        xb[8 * c + 2 * q + 1] = w4[q] & Uint32(0xFFFF0000)
                    else:
                        xb[4 * c + q] = w4[q]
            out = row_stage + tid * shape.row_out
            if cutlass.const_expr(not shape.nvfp4):
                amax = None
                if cutlass.const_expr(shape.bf16):
                    m = packed_amax(packed, 0, 16)
                    amax = cutlass.max(m & Uint32(0xFFFF), m >> Uint32(16)) << Uint32(16)
                words = cute.make_rmem_tensor(8, Uint32)
                byte = mxfp8_block(facts, xb, words, amax)
                # 32 bytes = chunks 2 seg, 2 seg + 1 of the row's 4; slot k ^ ((row >> 1) & 3)
                for k in cutlass.range_constexpr(2):
                    st("shared", out + ((2 * seg + k) ^ ((tid >> 1) & 3)) * 16,
                       [words[4 * k + i] for i in range(4)])
                scales = scales | (byte << Uint32(8 * seg))
            else:
                words = cute.make_rmem_tensor(4, Uint32)
                for h in cutlass.range_constexpr(2):
                    xh = cute.make_rmem_tensor(16, Uint32)
                    for i in cutlass.range_constexpr(16):
                        xh[i] = xb[16 * h + i]
                    half_amax = None
                    if cutlass.const_expr(shape.bf16):
                        half_m = packed_amax(packed, 8 * h, 8)
                        half_amax = cutlass.max(half_m & Uint32(0xFFFF), half_m >> Uint32(16)) << Uint32(16)
                    half_words = cute.make_rmem_tensor(2, Uint32)
                    half_byte = nvfp4_block(facts, xh, half_words, s, half_amax)
                    words[2 * h] = half_words[0]
                    words[2 * h + 1] = half_words[1]
                    scales = scales | (half_byte << Uint32(8 * (2 * seg + h)))
                # 16 bytes = chunk seg of the row's 2; slot seg ^ ((row >> 2) & 1)
                st("shared", out + (seg ^ ((tid >> 2) & 1)) * 16, [words[0], words[1], words[2], words[3]])
        scale_at = row_scale_addr + x_row * (k_cols // n) + col0 // n
        full = col0 + TILE_COLS <= k_cols
        if cutlass.const_expr(not shape.nvfp4):
            if full and k64:
                st("global", scale_at, scales, 16)
            else:
                st("global", scale_at, scales, 8)
                if col0 + 32 < k_cols:
                    st("global", scale_at + 1, scales >> Uint32(8), 8)
        else:
            if full and k64:
                st("global", scale_at, [scales])
            else:
                for b in cutlass.range_constexpr(4):
                    if col0 + 16 * b < k_cols:
                        st("global", scale_at + b, scales >> Uint32(8 * b), 8)


@cute.jit
def _quantize_columns(shape: cutlass.Constexpr, facts: cutlass.Constexpr, stage_addr, slot, col0: Int64,
                      k_cols: Int64, cpair: Int32, quarter: Int32, col_byte: Int32, col_stage: Int32,
                      col_scale_stage: Int32):
    """Columns 2 cpair, 2 cpair + 1 of rows 32 quarter .. 32 quarter + 31: data and scale bytes into
    the column staging buffers."""
    n = shape.block
    lo = cute.make_rmem_tensor(32, Uint32)  # bf16: both columns packed; fp32: column 2 cpair
    hi = cute.make_rmem_tensor(32, Uint32)  # fp32: column 2 cpair + 1
    for r in cutlass.range_constexpr(32):
        row = 32 * quarter + r
        addr = stage_addr + row * shape.row_bytes + (((col_byte // 16) ^ (r & 7)) * 16) + col_byte % 16
        if cutlass.const_expr(shape.bf16):
            lo[r] = ld("shared", addr, 1)[0]
        else:
            pair = ld("shared", addr, 2)
            lo[r] = pair[0]
            hi[r] = pair[1]
    for cb in cutlass.range_constexpr(32 // n):
        bi = quarter * (32 // n) + cb  # the tile's block this thread quantizes
        first, valid, s_bits = _read_first_valid(slot, bi)
        if valid > Int64(0) and col0 < k_cols:
            m = Uint32(0)
            if cutlass.const_expr(shape.bf16):
                m = packed_amax(lo, cb * n, n)
            s = f32(s_bits)
            for h in cutlass.range_constexpr(2):
                c = 2 * cpair + h  # column within the tile
                xb = cute.make_rmem_tensor(n, Uint32)
                for i in cutlass.range_constexpr(n):
                    if cutlass.const_expr(shape.bf16):
                        if cutlass.const_expr(h == 0):
                            xb[i] = lo[cb * n + i] << Uint32(16)
                        else:
                            xb[i] = lo[cb * n + i] & Uint32(0xFFFF0000)
                    else:
                        xb[i] = lo[cb * n + i] if h == 0 else hi[cb * n + i]
                amax = None
                if cutlass.const_expr(shape.bf16):
                    amax = (m << Uint32(16)) if h == 0 else (m & Uint32(0xFFFF0000))
                words = cute.make_rmem_tensor(n // shape.epb // 4, Uint32)
                if cutlass.const_expr(not shape.nvfp4):
                    byte = mxfp8_block(facts, xb, words, amax)
                    # 32 bytes = chunks 2 quarter, 2 quarter + 1 of the column's 8; slot k ^ (cpair & 7)
                    for k in cutlass.range_constexpr(2):
                        st("shared", col_stage + c * shape.col_out + ((2 * quarter + k) ^ (cpair & 7)) * 16,
                           [words[4 * k + i] for i in range(4)])
                else:
                    byte = nvfp4_block(facts, xb, words, s, amax)
                    # 8 bytes = half cb of chunk quarter of the column's 4; slot quarter ^ (cpair & 3)
                    st("shared", col_stage + c * shape.col_out + (quarter ^ (cpair & 3)) * 16 + 8 * cb,
                       [words[0], words[1]])
                st("shared", col_scale_stage + c * shape.blocks + bi, byte, 8)


# ---- write the staged tile out: every warp store covers whole runs of an output row -------------


@cute.jit
def _write_row_data(shape: cutlass.Constexpr, tid: Int32, slot, col0: Int64, k_cols: Int64, k32, row_stage: Int32,
                    row_data_addr: Int64):
    """TILE_ROWS rows x row_out bytes, 16-byte chunks, a row's chunks on neighbouring threads."""
    n = shape.block
    row_chunks = shape.row_out // 16
    for i in cutlass.range_constexpr(TILE_ROWS * row_chunks // TILE_THREADS):
        chunk = tid + TILE_THREADS * i
        row = chunk // row_chunks
        q = chunk % row_chunks
        first, valid, _ = _read_first_valid(slot, row // n)
        local = Int64(row - (row // n) * n)
        seg_col = col0 + Int64((16 if not shape.nvfp4 else 32) * q)  # first column of the chunk
        if local < valid and seg_col < k_cols:
            swizzle = ((row >> 1) & 3) if not shape.nvfp4 else ((row >> 2) & 1)
            words = ld("shared", row_stage + row * shape.row_out + (q ^ swizzle) * 16, 4)
            x_row = first + local
            if cutlass.const_expr(not shape.nvfp4):
                st("global", row_data_addr + x_row * k_cols + seg_col, words)
            else:
                at = row_data_addr + x_row * (k_cols // 2) + seg_col // 2
                if k32 and seg_col + 16 < k_cols:
                    st("global", at, words)
                else:
                    st("global", at, [words[0], words[1]])
                    if seg_col + 16 < k_cols:
                        st("global", at + 8, [words[2], words[3]])


@cute.jit
def _write_col_data(shape: cutlass.Constexpr, tid: Int32, slot, col0: Int64, k_cols: Int64, col_stage: Int32,
                    col_data_addr: Int64, col_data_bytes: Int64):
    """TILE_COLS columns x col_out bytes."""
    col_chunks = shape.col_out // 16
    block_bytes = shape.block // shape.epb
    for i in cutlass.range_constexpr(TILE_COLS * col_chunks // TILE_THREADS):
        chunk = tid + TILE_THREADS * i
        c = chunk // col_chunks
        q = chunk % col_chunks
        col = col0 + Int64(c)
        swizzle = ((c >> 1) & 7) if not shape.nvfp4 else ((c >> 1) & 3)
        words = ld("shared", col_stage + c * shape.col_out + (q ^ swizzle) * 16, 4)
        for h in cutlass.range_constexpr(2 if shape.nvfp4 else 1):
            bi = (q // 2) if not shape.nvfp4 else (2 * q + h)
            j, offset, stride, valid = _read_placement(slot, bi, True)
            if valid > Int64(0) and col < k_cols:
                at = offset + col * stride + j * block_bytes
                if at >= Int64(0) and at + block_bytes <= col_data_bytes:
                    if cutlass.const_expr(not shape.nvfp4):
                        st("global", col_data_addr + at + 16 * (q % 2), words)
                    else:
                        st("global", col_data_addr + at, [words[2 * h], words[2 * h + 1]])


@cute.jit
def _write_col_scales(shape: cutlass.Constexpr, tid: Int32, slot, col0: Int64, k_cols: Int64,
                      col_scale_stage: Int32, col_scale_addr: Int64, col_scale_bytes: Int64):
    """TILE_COLS columns x the tile's blocks, a byte each."""
    tb = shape.blocks
    for i in cutlass.range_constexpr(TILE_COLS * tb // TILE_THREADS):
        entry = tid + TILE_THREADS * i
        c = entry // tb
        bi = entry % tb
        col = col0 + Int64(c)
        j, offset, stride, valid = _read_placement(slot, bi, False)
        if valid > Int64(0) and col < k_cols:
            at = offset + col * stride + j
            if at >= Int64(0) and at < col_scale_bytes:
                st("global", col_scale_addr + at, ld("shared", col_scale_stage + entry, bits=8)[0], 8)


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
    # shared memory (bytes, alignment): input stages, column and row data staging, column scale
    # staging, info records
    buffers = [smem.allocate_tensor(Uint8, cute.make_layout(size), byte_alignment=align) for size, align in (
        (stages * shape.tile_bytes, 128), (TILE_COLS * shape.col_out, 128), (TILE_ROWS * shape.row_out, 128),
        (TILE_COLS * tb, 16), (shape.slots * info_bytes, 16))]
    stage_base, col_stage, row_stage, col_scale_stage, info_base = [b.iterator.toint() for b in buffers]
    x_addr, row_data_addr, row_scale_addr, col_data_addr, col_scale_addr = [
        t.iterator.toint() for t in (x, row_data, row_scale, col_data, col_scale)]
    rt, cu, count, n_rt, n_ct, total_blocks, dq, dr = unit_schedule(table, n_groups, k_cols, n, ct_group)
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
            _write_info(table, s_col, info_base + pf * info_bytes, tid, rt_nf, n_groups, steps, total_blocks, n,
                        shape.nvfp4)
        rt_nf, cu_nf, h_nf = next_unit_tile(rt_nf, cu_nf, h_nf, n_rt, dq, dr, ct_group)
    cute.arch.sync_threads()
    for p in cutlass.range_constexpr(stages - 1):
        ctp = cu_in * ct_group + h_in
        if Int32(p) < count and ctp < n_ct:
            _issue_tile(x_addr, stage_base + p * shape.tile_bytes, info_base + p * info_bytes, tid,
                        Int64(ctp) * TILE_COLS, m_rows, k_cols, n, eb)
        cute.arch.cp_async_commit_group()
        rt_in, cu_in, h_in = next_unit_tile(rt_in, cu_in, h_in, n_rt, dq, dr, ct_group)

    for it in cutlass.range(count, unroll=1):
        nxt = it + (stages - 1)
        ctn = cu_in * ct_group + h_in
        if nxt < count and ctn < n_ct:
            _issue_tile(x_addr, stage_base + (nxt % stages) * shape.tile_bytes,
                        info_base + (nxt % shape.slots) * info_bytes, tid, Int64(ctn) * TILE_COLS, m_rows, k_cols,
                        n, eb)
        cute.arch.cp_async_commit_group()
        rt_in, cu_in, h_in = next_unit_tile(rt_in, cu_in, h_in, n_rt, dq, dr, ct_group)
        if tid < tb:
            _write_info(table, s_col, info_base + ((it + stages) % shape.slots) * info_bytes, tid, rt_nf, n_groups,
                        steps, total_blocks, n, shape.nvfp4)
        rt_nf, cu_nf, h_nf = next_unit_tile(rt_nf, cu_nf, h_nf, n_rt, dq, dr, ct_group)
        cute.arch.cp_async_wait_group(stages - 1)
        cute.arch.sync_threads()

        stage_addr = stage_base + (it % stages) * shape.tile_bytes
        slot = info_base + (it % shape.slots) * info_bytes
        col0 = Int64(cu * ct_group + h) * TILE_COLS
        rt, cu, h = next_unit_tile(rt, cu, h, n_rt, dq, dr, ct_group)

        _quantize_row(shape, facts, tid, stage_addr, slot, col0, k_cols, k64, row_block, row_local, row_stage,
                      row_scale_addr, s_row, row_s_mode)
        _quantize_columns(shape, facts, stage_addr, slot, col0, k_cols, cpair, quarter, col_byte, col_stage,
                          col_scale_stage)
        cute.arch.sync_threads()
        _write_row_data(shape, tid, slot, col0, k_cols, k32, row_stage, row_data_addr)
        _write_col_data(shape, tid, slot, col0, k_cols, col_stage, col_data_addr, col_data_bytes)
        _write_col_scales(shape, tid, slot, col0, k_cols, col_scale_stage, col_scale_addr, col_scale_bytes)


def launch(x, table, row_data, row_scale, col_data, col_scale, s_row, s_col, scalars, grid_ctas, stream, facts):
    """Launch from a @cute.jit entry (fused_rowcol_entry.py); scalars: n_groups .. ct_group."""
    bits = x.element_type.width
    smem = TileShape.of(facts, bits, TILE_STAGES).smem_bytes()
    fused_rowcol_kernel(
        x, table, row_data, row_scale, col_data, col_scale, s_row, s_col, *scalars, facts, bits, TILE_STAGES
    ).launch(grid=(grid_ctas, 1, 1), block=(TILE_THREADS, 1, 1), smem=smem, stream=stream)
