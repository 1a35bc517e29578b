"""Device code of the MXFP8 / NVFP4 quantize kernels (host side and numerics: quantize.py).

Everything exactness hangs on is spelled out: values travel as fp32 bit
patterns (Uint32); the fp32 arithmetic is inline PTX ``mul.rn.f32`` /
``div.rn.f32`` (correctly rounded, no ftz, never contracted into an fma);
E4M3 is ``cvt.rn.satfinite.e4m3x2.f32``; E8M0 exponents, E4M3 decode and E2M1
rounding are integer work on bit patterns.
"""

import struct

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint8, Uint16, Uint32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass.experimental import primitives as prims

from .quantize import (
    BLOCK,
    BLOCK_START,
    COL_THREADS,
    DATA_ALIGN,
    DATA_OFFSET,
    DATA_STRIDE,
    ELEMENTS_PER_BYTE,
    ROW_START,
    ROW_THREADS,
    ROWS,
    SCALE_OFFSET,
    SCALE_STRIDE,
    TABLE_COLS,
)


def _bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


ABS_MASK = 0x7FFFFFFF
INF_BITS = 0x7F800000
INV_448_BITS = _bits(1.0 / 448.0)  # fp32(1/448), as torch.tensor(1 / 448, dtype=float32)
SIX_BITS = _bits(6.0)
TWO_POW_M9_BITS = _bits(2.0**-9)
TWO_POW_M127_BITS = 0x00400000  # the fp32 subnormal 2^-127
QNAN_BITS = 0x7FC00000
E4M3_NAN = 0x7F
E8M0_NAN = 0xFF
# E2M1 index = number of midpoints |v| is past; ties go to the even code:
# (midpoint bits, tie goes up). 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
E2M1_MIDPOINTS = tuple(
    (_bits(m), up) for m, up in ((0.25, False), (0.75, True), (1.25, False), (1.75, True),
                                 (2.5, False), (3.5, True), (5.0, False))
)


# ---- scalar helpers (branch-free, traced inline) -------------------------------------------


def _f32(bits) -> Float32:
    return prims.mov_b32(Uint32(bits), target_type=Float32)


def _u32(value) -> Uint32:
    return prims.mov_b32(Float32(value), target_type=Uint32)


def _sel(cond, a, b, ty):
    return ty(cutlass.select_(cond, ty(a), ty(b)))


def _asm(res_type, ptx: str, constraints: str, args, loc, ip):
    return llvm.inline_asm(res_type, args, ptx, constraints, has_side_effects=False, is_align_stack=False,
                           loc=loc, ip=ip)


@dsl_user_op
def _mul_rn(a, b, *, loc=None, ip=None) -> Float32:
    """fp32 a * b, round to nearest even, subnormals kept."""
    args = [Float32(a).ir_value(loc=loc, ip=ip), Float32(b).ir_value(loc=loc, ip=ip)]
    return Float32(_asm(T.f32(), "mul.rn.f32 $0, $1, $2;", "=f,f,f", args, loc, ip))


@dsl_user_op
def _div_rn(a, b, *, loc=None, ip=None) -> Float32:
    """IEEE fp32 a / b, round to nearest even, subnormals kept."""
    args = [Float32(a).ir_value(loc=loc, ip=ip), Float32(b).ir_value(loc=loc, ip=ip)]
    return Float32(_asm(T.f32(), "div.rn.f32 $0, $1, $2;", "=f,f,f", args, loc, ip))


@dsl_user_op
def _e4m3x4(a, b, c, d, *, loc=None, ip=None) -> Uint32:
    """Four fp32 -> four E4M3 bytes (RNE, saturating to +-448, NaN kept), a in the lowest byte."""
    args = [Float32(v).ir_value(loc=loc, ip=ip) for v in (a, b, c, d)]
    ptx = (
        "{\n.reg .b16 lo, hi;\n"
        "cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"  # first source -> upper byte
        "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n"
        "mov.b32 $0, {lo, hi};\n}"
    )
    return Uint32(_asm(T.i32(), ptx, "=r,f,f,f,f", args, loc, ip))


def _amax_bits(xb: cute.Tensor, n: int) -> Uint32:
    """max over |x| bit patterns: finite < Inf < NaN as unsigned ints; no NaN is dropped."""
    amax = Uint32(0)
    for i in range(n):
        amax = cutlass.max(amax, xb[i] & Uint32(ABS_MASK))
    return amax


def _mxfp8_exponent(amax: Uint32) -> Int32:
    """e = ceil(log2 fp32(amax * fp32(1/448))) clamped to [-127, 127], from t's bits."""
    t = _u32(_mul_rn(_f32(amax), _f32(INV_448_BITS)))
    biased = Int32(t >> Uint32(23))
    normal = biased - 127 + _sel((t & Uint32(0x7FFFFF)) != Uint32(0), 1, 0, Int32)
    small = _sel(t > Uint32(TWO_POW_M127_BITS), -126, -127, Int32)  # t subnormal or zero
    return _sel(biased == 0, small, cutlass.min(normal, Int32(127)), Int32)


def _pow2_neg(e: Int32) -> Float32:
    """Exact fp32 2^-e for e in [-127, 127] (2^-127 is subnormal)."""
    normal = Uint32(127 - e) << Uint32(23)
    return _f32(_sel(e < 127, normal, TWO_POW_M127_BITS, Uint32))


def _e4m3_to_f32_bits(byte: Uint32) -> Uint32:
    """An E4M3 byte's value as fp32 bits (0x7F / 0xFF are NaN)."""
    sign = (byte & Uint32(0x80)) << Uint32(24)
    exp = (byte >> Uint32(3)) & Uint32(0xF)
    man = byte & Uint32(7)
    normal = sign | ((exp + Uint32(120)) << Uint32(23)) | (man << Uint32(20))
    subnormal = sign | _u32(_mul_rn(Float32(Int32(man)), _f32(TWO_POW_M9_BITS)))  # man * 2^-9, exact
    value = _sel(exp == Uint32(0), subnormal, normal, Uint32)
    return _sel((byte & Uint32(0x7F)) == Uint32(E4M3_NAN), QNAN_BITS, value, Uint32)


def _e2m1_nibble(v: Uint32) -> Uint32:
    """fp32 bits -> E2M1 nibble: round to nearest even, saturate at 6, sign kept."""
    a = v & Uint32(ABS_MASK)
    index = Uint32(0)
    for mid, up in E2M1_MIDPOINTS:
        past = (a >= Uint32(mid)) if up else (a > Uint32(mid))
        index = index + _sel(past, 1, 0, Uint32)
    return ((v >> Uint32(31)) << Uint32(3)) | index


# ---- block codecs: fp32 bits in, (data words, scale byte) out ---------------------------------


def _mxfp8_block(xb: cute.Tensor, words: cute.Tensor):
    """32 fp32 bit patterns -> 8 words of E4M3 bytes; returns the E8M0 scale byte."""
    n = BLOCK["mxfp8"]
    amax = _amax_bits(xb, n)
    bad = amax >= Uint32(INF_BITS)
    e = _mxfp8_exponent(amax)
    inv = _pow2_neg(e)
    for w in range(n // 4):
        q = [_mul_rn(_f32(xb[4 * w + i]), inv) for i in range(4)]
        words[w] = _sel(bad, 0x7F7F7F7F, _e4m3x4(*q), Uint32)
    return _sel(bad, E8M0_NAN, Uint32(e + 127), Uint32)


def _nvfp4_block(xb: cute.Tensor, words: cute.Tensor, s: Float32):
    """16 fp32 bit patterns and the per-tensor S -> 2 words of E2M1 nibbles; returns the E4M3 scale byte."""
    n = BLOCK["nvfp4"]
    amax = _amax_bits(xb, n)
    bad = amax >= Uint32(INF_BITS)
    scaled_amax = _mul_rn(_div_rn(_f32(amax), _f32(SIX_BITS)), s)
    zero = Float32(0.0)
    d = _sel(bad, E4M3_NAN, _e4m3x4(scaled_amax, zero, zero, zero) & Uint32(0xFF), Uint32)
    r = _div_rn(s, _f32(_e4m3_to_f32_bits(d)))
    skip = bad | ((d & Uint32(0x7F)) == Uint32(0))  # d == 0 or NaN: zero codes
    for w in range(n // 8):
        word = Uint32(0)
        for i in range(8):
            x = xb[8 * w + i]
            # x == 0 is encoded as itself (r may be inf: 0 * inf is not taken as NaN)
            v = _sel((x & Uint32(ABS_MASK)) == Uint32(0), x, _u32(_mul_rn(_f32(x), r)), Uint32)
            word = word | (_e2m1_nibble(v) << Uint32(4 * i))
        words[w] = _sel(skip, 0, word, Uint32)
    return d


def _block(fmt: str, xb, words, s):
    if fmt == "mxfp8":
        return _mxfp8_block(xb, words)
    return _nvfp4_block(xb, words, s)


def _to_bits(value, in_bits: int) -> Uint32:
    """A loaded raw element (Uint16 bf16 bits or Uint32 fp32 bits) -> fp32 bits (exact)."""
    if in_bits == 16:
        return Uint32(value) << Uint32(16)
    return Uint32(value)


def _raw_view(x: cute.Tensor, in_bits: int) -> cute.Tensor:
    raw = Uint16 if in_bits == 16 else Uint32
    return cute.make_tensor(cute.recast_ptr(x.iterator, dtype=raw), x.layout)


# ---- rowwise ---------------------------------------------------------------------------------


@cute.kernel
def rowwise_kernel(
    x: cute.Tensor, data: cute.Tensor, scale: cute.Tensor, row_scale: cute.Tensor,
    n_blocks: Int64, blocks_per_row: Int64,
    fmt: cutlass.Constexpr, in_bits: cutlass.Constexpr,
):
    n = BLOCK[fmt]
    n_words = n // 4 // ELEMENTS_PER_BYTE[fmt]
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
            xb[i] = _to_bits(raw[i], in_bits)
        words = cute.make_rmem_tensor(n_words, Uint32)
        s = Float32(1.0)
        if cutlass.const_expr(fmt == "nvfp4"):
            s = row_scale[blk // blocks_per_row]
        byte = _block(fmt, xb, words, s)
        out = cute.make_rmem_tensor(n_words, Int32)
        for w in cutlass.range_constexpr(n_words):
            out[w] = Int32(words[w])
        dst = cute.make_tensor(data.iterator + cute.assume(blk * n_words, divby=n_words), cute.make_layout(n_words))
        cute.autovec_copy(out, dst)
        scale[blk] = Uint8(byte)


def _rowwise_launch(x, data, scale, row_scale, n_blocks, blocks_per_row, stream, fmt, in_bits):
    grid = Int32((n_blocks + (ROW_THREADS - 1)) // ROW_THREADS)
    rowwise_kernel(x, data, scale, row_scale, n_blocks, blocks_per_row, fmt, in_bits).launch(
        grid=(grid, 1, 1), block=(ROW_THREADS, 1, 1), stream=stream
    )


@cute.jit
def rowwise_mxfp8_host(x: cute.Tensor, data: cute.Tensor, scale: cute.Tensor, n_blocks: Int64, stream):
    _rowwise_launch(x, data, scale, scale, n_blocks, Int64(1), stream, "mxfp8", x.element_type.width)


@cute.jit
def rowwise_nvfp4_host(
    x: cute.Tensor, data: cute.Tensor, scale: cute.Tensor, row_scale: cute.Tensor,
    n_blocks: Int64, blocks_per_row: Int64, stream,
):
    _rowwise_launch(x, data, scale, row_scale, n_blocks, blocks_per_row, stream, "nvfp4", x.element_type.width)


# ---- columnwise ------------------------------------------------------------------------------


@cute.kernel
def columnwise_kernel(
    x: cute.Tensor, table: cute.Tensor, data: cute.Tensor, scale: cute.Tensor, col_scale: cute.Tensor,
    n_groups: Int32, steps: Int32, k_cols: Int64, x_numel: Int64, data_words: Int64, scale_bytes: Int64,
    fmt: cutlass.Constexpr, in_bits: cutlass.Constexpr,
):
    n = BLOCK[fmt]
    n_words = n // 4 // ELEMENTS_PER_BYTE[fmt]
    block_bytes = n // ELEMENTS_PER_BYTE[fmt]
    tid, _, _ = cute.arch.thread_idx()
    b, col_tile, _ = cute.arch.block_idx()
    padded_block = Int64(b)
    col = Int64(col_tile) * COL_THREADS + Int64(tid)

    # the group holding this padded block: the last g with BLOCK_START[g] <= padded_block
    lo = Int32(0)
    hi = n_groups
    for _ in cutlass.range(steps, unroll=1):
        mid = (lo + hi) // 2
        if mid > lo:
            if table[Int64(mid) * TABLE_COLS + BLOCK_START] <= padded_block:
                lo = mid
            else:
                hi = mid
    row = Int64(lo) * TABLE_COLS
    rows = table[row + ROWS]
    j = padded_block - table[row + BLOCK_START]
    if j >= 0 and j * n < rows and col < k_cols:
        first = (table[row + ROW_START] + j * n) * k_cols + col
        valid = rows - j * n
        xr = _raw_view(x, in_bits)
        xb = cute.make_rmem_tensor(n, Uint32)
        for i in cutlass.range_constexpr(n):
            at = first + i * k_cols
            value = Uint32(0)
            if Int64(i) < valid and at < x_numel:  # rows past the group: the zero padding
                value = _to_bits(xr[at], in_bits)
            xb[i] = value
        words = cute.make_rmem_tensor(n_words, Uint32)
        s = Float32(1.0)
        if cutlass.const_expr(fmt == "nvfp4"):
            s = col_scale[lo]
        byte = _block(fmt, xb, words, s)

        data_at = table[row + DATA_OFFSET] + col * table[row + DATA_STRIDE] + j * block_bytes
        if data_at >= 0 and data_at + block_bytes <= data_words * 4:
            out = cute.make_rmem_tensor(n_words, Int32)
            for w in cutlass.range_constexpr(n_words):
                out[w] = Int32(words[w])
            dst = cute.make_tensor(
                data.iterator + cute.assume(data_at // 4, divby=DATA_ALIGN[fmt] // 4), cute.make_layout(n_words)
            )
            cute.autovec_copy(out, dst)
        scale_at = table[row + SCALE_OFFSET] + col * table[row + SCALE_STRIDE] + j
        if scale_at >= 0 and scale_at < scale_bytes:
            scale[scale_at] = Uint8(byte)


def _columnwise_launch(x, table, data, scale, col_scale, n_groups, steps, sizes, grid_blocks, stream, fmt):
    k_cols = sizes[0]
    col_tiles = Int32((k_cols + (COL_THREADS - 1)) // COL_THREADS)
    columnwise_kernel(
        x, table, data, scale, col_scale, n_groups, steps, *sizes, fmt, x.element_type.width
    ).launch(grid=(grid_blocks, col_tiles, 1), block=(COL_THREADS, 1, 1), stream=stream)


@cute.jit
def columnwise_mxfp8_host(
    x: cute.Tensor, table: cute.Tensor, data: cute.Tensor, scale: cute.Tensor,
    n_groups: Int32, steps: Int32, k_cols: Int64, x_numel: Int64, data_words: Int64, scale_bytes: Int64,
    grid_blocks: Int32, stream,
):
    sizes = (k_cols, x_numel, data_words, scale_bytes)
    _columnwise_launch(x, table, data, scale, scale, n_groups, steps, sizes, grid_blocks, stream, "mxfp8")


@cute.jit
def columnwise_nvfp4_host(
    x: cute.Tensor, table: cute.Tensor, data: cute.Tensor, scale: cute.Tensor, col_scale: cute.Tensor,
    n_groups: Int32, steps: Int32, k_cols: Int64, x_numel: Int64, data_words: Int64, scale_bytes: Int64,
    grid_blocks: Int32, stream,
):
    sizes = (k_cols, x_numel, data_words, scale_bytes)
    _columnwise_launch(x, table, data, scale, col_scale, n_groups, steps, sizes, grid_blocks, stream, "nvfp4")
