"""quantize_columnwise's kernel (device code): blocks down the rows of each group, transposed.

Threads of a CTA take consecutive columns of one padded block: coalesced loads down the rows;
each thread writes its block's bytes (32 B MXFP8, 8 B NVFP4) with one or two vector stores. A
CTA finds its group by binary search on BLOCK_START and returns when its block is past the
group's end (the grid is sized from host numbers only).
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint8, Uint32

from .codec import block, raw_view, to_bits
from .config import (
    BLOCK_START,
    COL_THREADS,
    DATA_ALIGN,
    DATA_OFFSET,
    DATA_STRIDE,
    ROW_START,
    ROWS,
    SCALE_OFFSET,
    SCALE_STRIDE,
)
from .tiles import group_of_block


@cute.kernel
def columnwise_kernel(
    x: cute.Tensor, table: cute.Tensor, data: cute.Tensor, scale: cute.Tensor, col_scale: cute.Tensor,
    n_groups: Int32, steps: Int32, k_cols: Int64, x_numel: Int64, data_words: Int64, scale_bytes: Int64,
    facts: cutlass.Constexpr, in_bits: cutlass.Constexpr,
):
    n = facts.block_size
    n_words = n // 4 // facts.elements_per_byte
    block_bytes = n // facts.elements_per_byte
    tid, _, _ = cute.arch.thread_idx()
    b, col_tile, _ = cute.arch.block_idx()
    padded_block = Int64(b)
    col = Int64(col_tile) * COL_THREADS + Int64(tid)

    lo, row = group_of_block(table, padded_block, n_groups, steps)
    rows = table[row + ROWS]
    j = padded_block - table[row + BLOCK_START]
    if j >= 0 and j * n < rows and col < k_cols:
        first = (table[row + ROW_START] + j * n) * k_cols + col
        valid = rows - j * n
        xr = raw_view(x, in_bits)
        xb = cute.make_rmem_tensor(n, Uint32)
        for i in cutlass.range_constexpr(n):
            at = first + i * k_cols
            value = Uint32(0)
            if Int64(i) < valid and at < x_numel:  # rows past the group: the zero padding
                value = to_bits(xr[at], in_bits)
            xb[i] = value
        words = cute.make_rmem_tensor(n_words, Uint32)
        s = Float32(1.0)
        if cutlass.const_expr(facts.name == "nvfp4"):
            s = col_scale[lo]
        byte = block(facts, xb, words, s)

        data_at = table[row + DATA_OFFSET] + col * table[row + DATA_STRIDE] + j * block_bytes
        if data_at >= 0 and data_at + block_bytes <= data_words * 4:
            out = cute.make_rmem_tensor(n_words, Int32)
            for w in cutlass.range_constexpr(n_words):
                out[w] = Int32(words[w])
            dst = cute.make_tensor(
                data.iterator + cute.assume(data_at // 4, divby=DATA_ALIGN[facts.name] // 4), cute.make_layout(n_words)
            )
            cute.autovec_copy(out, dst)
        scale_at = table[row + SCALE_OFFSET] + col * table[row + SCALE_STRIDE] + j
        if scale_at >= 0 and scale_at < scale_bytes:
            scale[scale_at] = Uint8(byte)


def _launch(x, table, data, scale, col_scale, n_groups, steps, sizes, grid_blocks, stream, facts):
    k_cols = sizes[0]
    col_tiles = Int32((k_cols + (COL_THREADS - 1)) // COL_THREADS)
    columnwise_kernel(
        x, table, data, scale, col_scale, n_groups, steps, *sizes, facts, x.element_type.width
    ).launch(grid=(grid_blocks, col_tiles, 1), block=(COL_THREADS, 1, 1), stream=stream)


@cute.jit
def columnwise_mxfp8_host(
    x: cute.Tensor, table: cute.Tensor, data: cute.Tensor, scale: cute.Tensor,
    n_groups: Int32, steps: Int32, k_cols: Int64, x_numel: Int64, data_words: Int64, scale_bytes: Int64,
    grid_blocks: Int32, facts: cutlass.Constexpr, stream,
):
    sizes = (k_cols, x_numel, data_words, scale_bytes)
    _launch(x, table, data, scale, scale, n_groups, steps, sizes, grid_blocks, stream, facts)


@cute.jit
def columnwise_nvfp4_host(
    x: cute.Tensor, table: cute.Tensor, data: cute.Tensor, scale: cute.Tensor, col_scale: cute.Tensor,
    n_groups: Int32, steps: Int32, k_cols: Int64, x_numel: Int64, data_words: Int64, scale_bytes: Int64,
    grid_blocks: Int32, facts: cutlass.Constexpr, stream,
):
    sizes = (k_cols, x_numel, data_words, scale_bytes)
    _launch(x, table, data, scale, col_scale, n_groups, steps, sizes, grid_blocks, stream, facts)
