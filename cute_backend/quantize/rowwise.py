"""quantize_rowwise's kernel (device code): blocks along the last dim, one thread a block.

Adjacent threads take adjacent blocks of a row: 16-byte vector loads and stores, coalesced
scale bytes.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint8, Uint16, Uint32

from .codec import block, to_bits
from .config import ROW_THREADS


@cute.kernel
def rowwise_kernel(
    x: cute.Tensor, data: cute.Tensor, scale: cute.Tensor, row_scale: cute.Tensor,
    n_blocks: Int64, blocks_per_row: Int64,
    facts: cutlass.Constexpr, in_bits: cutlass.Constexpr,
):
    n = facts.block_size
    n_words = n // 4 // facts.elements_per_byte
    tid, _, _ = cute.arch.thread_idx()
    bid, _, _ = cute.arch.block_idx()
    blk = Int64(bid) * ROW_THREADS + Int64(tid)
    if blk < n_blocks:
        raw_type = Uint16 if cutlass.const_expr(in_bits == 16) else Uint32
        src = cute.make_tensor(
            cute.recast_ptr(x.iterator, dtype=raw_type) + cute.assume(blk * n, divby=n), cute.make_layout(n)
        )
        raw = cute.make_rmem_tensor(n, raw_type)
        cute.autovec_copy(src, raw)
        xb = cute.make_rmem_tensor(n, Uint32)
        for i in cutlass.range_constexpr(n):
            xb[i] = to_bits(raw[i], in_bits)
        words = cute.make_rmem_tensor(n_words, Uint32)
        s = Float32(1.0)
        if cutlass.const_expr(facts.name == "nvfp4"):
            s = row_scale[blk // blocks_per_row]
        byte = block(facts, xb, words, s)
        out = cute.make_rmem_tensor(n_words, Int32)
        for w in cutlass.range_constexpr(n_words):
            out[w] = Int32(words[w])
        dst = cute.make_tensor(data.iterator + cute.assume(blk * n_words, divby=n_words), cute.make_layout(n_words))
        cute.autovec_copy(out, dst)
        scale[blk] = Uint8(byte)


def _launch(x, data, scale, row_scale, n_blocks, blocks_per_row, stream, facts):
    grid = Int32((n_blocks + (ROW_THREADS - 1)) // ROW_THREADS)
    rowwise_kernel(x, data, scale, row_scale, n_blocks, blocks_per_row, facts, x.element_type.width).launch(
        grid=(grid, 1, 1), block=(ROW_THREADS, 1, 1), stream=stream
    )


@cute.jit
def rowwise_mxfp8_host(x: cute.Tensor, data: cute.Tensor, scale: cute.Tensor, n_blocks: Int64,
                       facts: cutlass.Constexpr, stream):
    _launch(x, data, scale, scale, n_blocks, Int64(1), stream, facts)


@cute.jit
def rowwise_nvfp4_host(
    x: cute.Tensor, data: cute.Tensor, scale: cute.Tensor, row_scale: cute.Tensor,
    n_blocks: Int64, blocks_per_row: Int64, facts: cutlass.Constexpr, stream,
):
    _launch(x, data, scale, row_scale, n_blocks, blocks_per_row, stream, facts)
