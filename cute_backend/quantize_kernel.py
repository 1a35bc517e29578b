"""Device code of the MXFP8 / NVFP4 quantize kernels (host side and numerics: quantize.py).

Everything exactness hangs on is spelled out: values travel as fp32 bit
patterns (Uint32); the fp32 arithmetic is inline PTX ``mul.rn.f32`` /
``div.rn.f32`` (correctly rounded, no ftz, never contracted into an fma);
E4M3 is ``cvt.rn.satfinite.e4m3x2.f32``; E8M0 exponents are integer work on
bit patterns; E4M3 decodes through f16 (both conversions exact); E2M1 rounding
is correctly rounded fp32 adds onto 2^23 (``_e2m1_block_ptx``).
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
    AMAX_COLS,
    AMAX_ROWS,
    FUSED_COLS,
    FUSED_ROWS,
    FUSED_STAGES,
    FUSED_THREADS,
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
TWO_POW_M127_BITS = 0x00400000  # the fp32 subnormal 2^-127
E4M3_NAN = 0x7F
E8M0_NAN = 0xFF


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


@dsl_user_op
def _e4m3_to_f32(byte, *, loc=None, ip=None) -> Float32:
    """An E4M3 byte's value as fp32 (0x7F / 0xFF are NaN): E4M3 -> f16 -> f32, both exact."""
    ptx = (
        "{\n.reg .b16 lo, h0, h1;\n.reg .b32 h;\n"
        "cvt.u16.u32 lo, $1;\n"
        "cvt.rn.f16x2.e4m3x2 h, lo;\n"
        "mov.b32 {h0, h1}, h;\n"
        "cvt.f32.f16 $0, h0;\n}"
    )
    return Float32(_asm(T.f32(), ptx, "=f,r", [Uint32(byte).ir_value(loc=loc, ip=ip)], loc, ip))


def _e2m1_block_ptx() -> str:
    """PTX: 16 fp32 x ($2..$17) and r ($18) -> two words of the E2M1 nibbles of fp32(x * r) ($0, $1).

    Magnitude: a = min(fp32(|x| * r), 6); the code index is the smallest of
    rne(2a), rne(a) + 2 and rne(a / 2) + 4 (each is the right one on its range,
    [0, 2), [2, 4) and [4, 6], and no smaller than it elsewhere), each read off
    the bits of an fp32 add onto 2^23 (correctly rounded, so ties go to the even
    code; checked against the midpoint rule for every fp32; the minimum is taken
    on the bit patterns, all positive floats). Summing those bit patterns times
    16^i lays a word's eight indices into their nibbles; 2^23's own bits sum to
    0xFB000000 over the eight, taken off by starting from 0x05000000. The sign
    (bit 3 of a nibble) is x's sign bit.
    r = +inf (S / d overflowed) makes |0| * r NaN, which min turns into 6;
    then, and only then, zero elements get their index cleared: x = 0 encodes
    as itself (as the reference does).
    """
    lines = ["{", ".reg .f32 a, c1, c2, c3;", ".reg .b32 t, u, v, acc0, acc1;", ".reg .pred p, q;"]
    for e in range(16):
        x, acc, i = f"${e + 2}", f"acc{e // 8}", e % 8
        lines += [
            f"abs.f32 a, {x};",
            "mul.rn.f32 a, a, $18;",
            "min.f32 a, a, 0f40C00000;",
            "fma.rn.f32 c1, a, 0f40000000, 0f4B000000;",
            "add.rn.f32 c2, a, 0f4B000002;",
            "fma.rn.f32 c3, a, 0f3F000000, 0f4B000004;",
            "mov.b32 t, c1;",
            "mov.b32 u, c2;",
            "mov.b32 v, c3;",
            "min.u32 t, t, u;",
            "min.u32 t, t, v;",
            f"add.u32 {acc}, t, 0x05000000;" if i == 0 else f"mad.lo.u32 {acc}, t, {16 ** i}, {acc};",
            f"mov.b32 t, {x};",
            "shr.u32 t, t, 31;",
            f"mad.lo.u32 {acc}, t, {2 ** (4 * i + 3)}, {acc};",
        ]
    lines += ["setp.eq.f32 p, $18, 0f7F800000;", "@!p bra E2M1_DONE_${:uid};"]
    for e in range(16):
        acc, i = f"acc{e // 8}", e % 8
        lines += [f"setp.eq.f32 q, ${e + 2}, 0f00000000;", f"@q and.b32 {acc}, {acc}, {~(7 << (4 * i)) & 0xFFFFFFFF};"]
    lines += ["E2M1_DONE_${:uid}:", "mov.b32 $0, acc0;", "mov.b32 $1, acc1;", "}"]
    return "\n".join(lines)


_E2M1_BLOCK_PTX = _e2m1_block_ptx()


@dsl_user_op
def _e2m1_block(xs, r, *, loc=None, ip=None):
    """16 fp32 bit patterns and r = fp32(S / d) -> the two words of their E2M1 nibbles (first element lowest).

    Each nibble is e2m1_rn_satfinite(fp32(x * r)) with x's sign; x = 0 encodes
    as itself (signed zero) even where r is +inf.
    """
    args = [_f32(v).ir_value(loc=loc, ip=ip) for v in xs] + [Float32(r).ir_value(loc=loc, ip=ip)]
    struct = llvm.StructType.get_literal([T.i32()] * 2)
    res = llvm.inline_asm(struct, args, _E2M1_BLOCK_PTX, "=r,=r," + ",".join(["f"] * 17), has_side_effects=False,
                          is_align_stack=False, loc=loc, ip=ip)
    return [Uint32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(2)]


# ---- block codecs: fp32 bits in, (data words, scale byte) out ---------------------------------


def _mxfp8_block(xb: cute.Tensor, words: cute.Tensor, amax=None):
    """32 fp32 bit patterns -> 8 words of E4M3 bytes; returns the E8M0 scale byte.

    ``amax``: the block's maximum |x| bit pattern, where the caller has it already.
    """
    n = BLOCK["mxfp8"]
    if amax is None:
        amax = _amax_bits(xb, n)
    bad = amax >= Uint32(INF_BITS)
    e = _mxfp8_exponent(amax)
    inv = _pow2_neg(e)
    for w in range(n // 4):
        q = [_mul_rn(_f32(xb[4 * w + i]), inv) for i in range(4)]
        words[w] = _sel(bad, 0x7F7F7F7F, _e4m3x4(*q), Uint32)
    return _sel(bad, E8M0_NAN, Uint32(e + 127), Uint32)


def _nvfp4_block(xb: cute.Tensor, words: cute.Tensor, s: Float32, amax=None):
    """16 fp32 bit patterns and the per-tensor S -> 2 words of E2M1 nibbles; returns the E4M3 scale byte."""
    n = BLOCK["nvfp4"]
    if amax is None:
        amax = _amax_bits(xb, n)
    bad = amax >= Uint32(INF_BITS)
    scaled_amax = _mul_rn(_div_rn(_f32(amax), _f32(SIX_BITS)), s)
    zero = Float32(0.0)
    d = _sel(bad, E4M3_NAN, _e4m3x4(scaled_amax, zero, zero, zero) & Uint32(0xFF), Uint32)
    r = _div_rn(s, _e4m3_to_f32(d))
    skip = bad | ((d & Uint32(0x7F)) == Uint32(0))  # d == 0 or NaN: zero codes
    codes = _e2m1_block([xb[i] for i in range(n)], r)
    for w in range(n // 8):
        words[w] = _sel(skip, 0, codes[w], Uint32)
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


# ---- fused rowwise + columnwise, and the per-group finite amax ---------------------------------
#
# Memory operations are inline PTX with side effects (kept in program order
# around the barriers); addresses are plain integers: Int64 global, Int32 shared.


def _void_asm(ptx: str, constraints: str, args, loc, ip):
    llvm.inline_asm(None, args, ptx, constraints, has_side_effects=True, is_align_stack=False, loc=loc, ip=ip)


def _words_asm(n: int, ptx: str, constraints: str, args, loc, ip):
    if n == 1:
        value = llvm.inline_asm(T.i32(), args, ptx, constraints, has_side_effects=True, is_align_stack=False,
                                loc=loc, ip=ip)
        return [Uint32(value)]
    struct = llvm.StructType.get_literal([T.i32()] * n)
    res = llvm.inline_asm(struct, args, ptx, constraints, has_side_effects=True, is_align_stack=False, loc=loc, ip=ip)
    return [Uint32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(n)]


@dsl_user_op
def _cp_async16(smem_addr, gmem_addr, src_bytes, *, loc=None, ip=None):
    """16 bytes global -> shared, asynchronously; src_bytes 0 writes zeros and reads nothing."""
    args = [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int64(gmem_addr).ir_value(loc=loc, ip=ip),
            Int32(src_bytes).ir_value(loc=loc, ip=ip)]
    _void_asm("cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r", args, loc, ip)


@dsl_user_op
def _ld_shared(smem_addr, n: int, *, loc=None, ip=None):
    """n (1, 2 or 4) consecutive 32-bit words from shared memory (n * 4-byte aligned)."""
    outs = ", ".join(f"${i}" for i in range(n))
    vec = {1: "", 2: ".v2", 4: ".v4"}[n]
    ptx = f"ld.shared{vec}.b32 {{{outs}}}, [${n}];" if n > 1 else "ld.shared.b32 $0, [$1];"
    return _words_asm(n, ptx, ",".join(["=r"] * n) + ",r", [Int32(smem_addr).ir_value(loc=loc, ip=ip)], loc, ip)


@dsl_user_op
def _ld_global_pred(gmem_addr, pred, *, loc=None, ip=None):
    """4 words (16 bytes, read-only path) from global memory where pred != 0, zeros elsewhere."""
    ptx = (
        "{\n.reg .pred p;\nsetp.ne.b32 p, $5, 0;\n"
        "mov.b32 $0, 0;\nmov.b32 $1, 0;\nmov.b32 $2, 0;\nmov.b32 $3, 0;\n"
        "@p ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];\n}"
    )
    args = [Int64(gmem_addr).ir_value(loc=loc, ip=ip), Int32(pred).ir_value(loc=loc, ip=ip)]
    return _words_asm(4, ptx, "=r,=r,=r,=r,l,r", args, loc, ip)


@dsl_user_op
def _st_global(gmem_addr, words, *, loc=None, ip=None):
    """1, 2 or 4 words to global memory (vector store: n * 4-byte aligned)."""
    n = len(words)
    vec = {1: "", 2: ".v2", 4: ".v4"}[n]
    srcs = ", ".join(f"${i + 1}" for i in range(n))
    ptx = f"st.global{vec}.b32 [$0], {{{srcs}}};" if n > 1 else "st.global.b32 [$0], $1;"
    args = [Int64(gmem_addr).ir_value(loc=loc, ip=ip)] + [Uint32(w).ir_value(loc=loc, ip=ip) for w in words]
    _void_asm(ptx, "l" + ",r" * n, args, loc, ip)


@dsl_user_op
def _st_global_u16(gmem_addr, value, *, loc=None, ip=None):
    args = [Int64(gmem_addr).ir_value(loc=loc, ip=ip), Uint32(value).ir_value(loc=loc, ip=ip)]
    _void_asm("{\n.reg .b16 v;\ncvt.u16.u32 v, $1;\nst.global.b16 [$0], v;\n}", "l,r", args, loc, ip)


@dsl_user_op
def _st_global_u8(gmem_addr, value, *, loc=None, ip=None):
    args = [Int64(gmem_addr).ir_value(loc=loc, ip=ip), Uint32(value).ir_value(loc=loc, ip=ip)]
    _void_asm("{\n.reg .b16 v;\ncvt.u16.u32 v, $1;\nst.global.b8 [$0], v;\n}", "l,r", args, loc, ip)


@dsl_user_op
def _st_shared_v4(smem_addr, words, *, loc=None, ip=None):
    args = [Int32(smem_addr).ir_value(loc=loc, ip=ip)] + [Uint32(w).ir_value(loc=loc, ip=ip) for w in words]
    _void_asm("st.shared.v4.b32 [$0], {$1, $2, $3, $4};", "r,r,r,r,r", args, loc, ip)


@dsl_user_op
def _st_shared_v2(smem_addr, words, *, loc=None, ip=None):
    args = [Int32(smem_addr).ir_value(loc=loc, ip=ip)] + [Uint32(w).ir_value(loc=loc, ip=ip) for w in words]
    _void_asm("st.shared.v2.b32 [$0], {$1, $2};", "r,r,r", args, loc, ip)


@dsl_user_op
def _st_shared_u8(smem_addr, value, *, loc=None, ip=None):
    args = [Int32(smem_addr).ir_value(loc=loc, ip=ip), Uint32(value).ir_value(loc=loc, ip=ip)]
    _void_asm("{\n.reg .b16 v;\ncvt.u16.u32 v, $1;\nst.shared.b8 [$0], v;\n}", "r,r", args, loc, ip)


@dsl_user_op
def _ld_shared_u8(smem_addr, *, loc=None, ip=None) -> Uint32:
    ptx = "{\n.reg .b16 v;\nld.shared.b8 v, [$1];\ncvt.u32.u16 $0, v;\n}"
    return _words_asm(1, ptx, "=r,r", [Int32(smem_addr).ir_value(loc=loc, ip=ip)], loc, ip)[0]


@dsl_user_op
def _max_u16x2(a, b, *, loc=None, ip=None) -> Uint32:
    args = [Uint32(a).ir_value(loc=loc, ip=ip), Uint32(b).ir_value(loc=loc, ip=ip)]
    return Uint32(_asm(T.i32(), "max.u16x2 $0, $1, $2;", "=r,r,r", args, loc, ip))


@dsl_user_op
def _warp_max_u32(value, *, loc=None, ip=None) -> Uint32:
    args = [Uint32(value).ir_value(loc=loc, ip=ip)]
    return _words_asm(1, "redux.sync.max.u32 $0, $1, 0xffffffff;", "=r,r", args, loc, ip)[0]


@dsl_user_op
def _red_max_u32(gmem_addr, value, *, loc=None, ip=None):
    args = [Int64(gmem_addr).ir_value(loc=loc, ip=ip), Uint32(value).ir_value(loc=loc, ip=ip)]
    _void_asm("red.relaxed.gpu.global.max.u32 [$0], $1;", "l,r", args, loc, ip)


def _packed_amax(words, first: int, count: int) -> Uint32:
    """max.u16x2 over |bf16 pairs| of words[first:first + count]: both halves' block amaxes at once."""
    m = Uint32(0)
    for i in range(first, first + count):
        m = _max_u16x2(m, words[i] & Uint32(0x7FFF7FFF))
    return m


@cute.jit
def _find_block(table: cute.Tensor, b: Int64, n_groups: Int32, steps: Int32, total_blocks: Int64,
                n: cutlass.Constexpr):
    """Padded block b -> (group, table row offset, block index j in the group, rows of it that are real).

    The group is the last g with BLOCK_START[g] <= b; ``valid`` is 0 for a
    block past the table's last block or past its group's rows.
    """
    lo = Int32(0)
    hi = n_groups
    for _ in cutlass.range(steps, unroll=1):
        mid = (lo + hi) // 2
        if mid > lo:
            if table[Int64(mid) * TABLE_COLS + BLOCK_START] <= b:
                lo = mid
            else:
                hi = mid
    row = Int64(lo) * TABLE_COLS
    j = b - table[row + BLOCK_START]
    valid = cutlass.min(table[row + ROWS] - j * n, Int64(n))
    ok = (b < total_blocks) & (j >= Int64(0)) & (valid > Int64(0))
    return lo, row, j, _sel(ok, valid, 0, Int64)


def _tile_counts(table: cute.Tensor, n_groups: Int32, k_cols: Int64, n: int, tile_rows: int, tile_cols: int):
    """Row tiles (tile_rows / n padded blocks each), column tiles, and the padded blocks in all."""
    tb = tile_rows // n
    last = Int64(n_groups - 1) * TABLE_COLS
    total_blocks = table[last + BLOCK_START] + (table[last + ROWS] + (n - 1)) // n
    n_rt = (total_blocks + (tb - 1)) // tb
    n_ct = (k_cols + (tile_cols - 1)) // tile_cols
    return n_rt, n_ct, total_blocks


def _tile_range(table: cute.Tensor, n_groups: Int32, k_cols: Int64, n: int):
    """group_amax's tiles (AMAX_ROWS x AMAX_COLS), numbered column tile fastest; this CTA's
    contiguous share of them (a CTA streams along its rows). Returns (first row tile, first
    column tile, count, column tiles, padded blocks)."""
    n_rt, n_ct, total_blocks = _tile_counts(table, n_groups, k_cols, n, AMAX_ROWS, AMAX_COLS)
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
    return _sel(wrap, rt + 1, rt, Int32), _sel(wrap, 0, ct + 1, Int32)


def _tile_blocks(table, rt: Int32, ct: Int32, n_groups, steps, total_blocks, n: int, tile_rows: int, tile_cols: int):
    """(column 0 of tile (rt, ct), [(group, table row, j, valid rows, first x row)] per padded block)."""
    tb = tile_rows // n
    blocks = []
    for bi in range(tb):
        g, row, j, valid = _find_block(table, Int64(rt) * tb + bi, n_groups, steps, total_blocks, n)
        blocks.append((g, row, j, valid, table[row + ROW_START] + j * n))
    return Int64(ct) * tile_cols, blocks


def _unit_schedule(table: cute.Tensor, n_groups: Int32, k_cols: Int64, n: int, ct_group: Int32):
    """The fused kernel's order: units of ct_group neighbouring column tiles of one row tile,
    numbered row tile fastest, dealt to the CTAs grid-stride. At any time the CTAs work on
    neighbouring row tiles of the same columns, so the pieces of a transposed output row are
    written together; a CTA reads ct_group * FUSED_COLS contiguous elements of each of its rows.
    Returns (row tile, column unit, tiles of this CTA counting a unit's column tiles past K,
    row tiles, column tiles, padded blocks, unit stride as (column units, row tiles))."""
    n_rt, n_ct, total_blocks = _tile_counts(table, n_groups, k_cols, n, FUSED_ROWS, FUSED_COLS)
    n_cu = (Int32(n_ct) + (ct_group - 1)) // ct_group
    n_units = Int32(n_rt) * n_cu
    bid, _, _ = cute.arch.block_idx()
    nb, _, _ = cute.arch.grid_dim()
    b = Int32(bid)
    g = Int32(nb)
    rt32 = cutlass.max(Int32(n_rt), Int32(1))  # (no row tiles: no units)
    units = _sel(b < n_units, (n_units - b + (g - 1)) // g, 0, Int32)
    return b % rt32, b // rt32, units * ct_group, rt32, Int32(n_ct), total_blocks, g // rt32, g % rt32


def _next_unit_tile(rt: Int32, cu: Int32, h: Int32, n_rt: Int32, dq: Int32, dr: Int32, ct_group: Int32):
    """The next tile (row tile, column unit, tile in the unit) of this CTA."""
    last = h + 1 == ct_group
    rt2 = rt + dr
    wrap = rt2 >= n_rt
    new_rt = _sel(wrap, rt2 - n_rt, rt2, Int32)
    new_cu = cu + dq + _sel(wrap, 1, 0, Int32)
    return (_sel(last, new_rt, rt, Int32), _sel(last, new_cu, cu, Int32), _sel(last, 0, h + 1, Int32))


# A tile's group facts live in shared memory, one INFO_BYTES record a padded block, written by
# thread bi for block bi: first x row, j, DATA_OFFSET, DATA_STRIDE, SCALE_OFFSET, SCALE_STRIDE
# (Int64 each), then valid rows (Int32), group (Int32), the group's S (fp32 bits).
INFO_BYTES = 64
_I_FIRST, _I_J, _I_DO, _I_DS, _I_SO, _I_SS, _I_VALID = 0, 8, 16, 24, 32, 40, 48


def _split64(v):
    v = Int64(v)
    return [Uint32(v & Int64(0xFFFFFFFF)), Uint32(v >> Int64(32))]


def _join64(lo, hi) -> Int64:
    return (Int64(hi) << Int64(32)) | Int64(lo)


def _write_info(table, s_col, slot_addr: Int32, tid: Int32, rt: Int32, n_groups, steps, total_blocks, n: int,
                nvfp4: bool):
    """Thread bi < FUSED_ROWS / n: look block bi of row tile rt up and store its record."""
    g, row, j, valid = _find_block(table, Int64(rt) * (FUSED_ROWS // n) + Int64(tid), n_groups, steps,
                                   total_blocks, n)
    first = table[row + ROW_START] + j * n
    s_bits = Uint32(0)
    if nvfp4:
        s_bits = _u32(s_col[g])
    at = slot_addr + tid * INFO_BYTES
    _st_shared_v4(at, _split64(first) + _split64(j))
    _st_shared_v4(at + 16, _split64(table[row + DATA_OFFSET]) + _split64(table[row + DATA_STRIDE]))
    _st_shared_v4(at + 32, _split64(table[row + SCALE_OFFSET]) + _split64(table[row + SCALE_STRIDE]))
    _st_shared_v4(at + 48, [Uint32(valid), Uint32(g), s_bits, Uint32(0)])


def _read_first_valid(slot_addr: Int32, bi):
    """(first x row, valid rows, group S bits) of block bi's record."""
    w = _ld_shared(slot_addr + bi * INFO_BYTES, 2)
    v = _ld_shared(slot_addr + bi * INFO_BYTES + _I_VALID, 4)
    return _join64(w[0], w[1]), Int64(Int32(v[0])), v[2]


def _read_placement(slot_addr: Int32, bi, data: bool):
    """(j, offset, stride, valid rows) of block bi's record: data's or scale's."""
    w = _ld_shared(slot_addr + bi * INFO_BYTES + _I_J, 2)
    p = _ld_shared(slot_addr + bi * INFO_BYTES + (_I_DO if data else _I_SO), 4)
    v = _ld_shared(slot_addr + bi * INFO_BYTES + _I_VALID, 1)
    return _join64(w[0], w[1]), _join64(p[0], p[1]), _join64(p[2], p[3]), Int64(Int32(v[0]))


def _issue_tile(x_addr: Int64, stage_addr: Int32, slot_addr: Int32, tid: Int32, col0: Int64, m_rows: Int64,
                k_cols: Int64, n: int, eb: int):
    """cp.async the tile's rows (zeros for rows past their group, past x, or columns past K).

    The tile lands XOR-swizzled: 16-byte chunk L of row r at slot L ^ (r & 7), so a warp reading
    one chunk of 8 rows, a whole row, or a run of 4-/8-byte columns meets every bank once.
    """
    row_bytes = FUSED_COLS * eb
    cpr = row_bytes // 16  # 16-byte chunks a row
    rows_per_load = FUSED_THREADS // cpr
    chunk = tid % cpr
    u = tid // cpr
    chunk_col = col0 + Int64(chunk * (16 // eb))
    col_ok = chunk_col < k_cols
    dst = stage_addr + u * row_bytes + (chunk ^ (u & 7)) * 16  # rows_per_load is a multiple of 8
    facts = {}
    for i in range(FUSED_ROWS // rows_per_load):
        r = i * rows_per_load  # + u
        bi = r // n  # u < rows_per_load never crosses a block
        if bi not in facts:
            facts[bi] = _read_first_valid(slot_addr, bi)
        first, valid, _ = facts[bi]
        local = Int64(r - bi * n) + Int64(u)
        src_row = first + local
        ok = col_ok & (local < valid) & (src_row < m_rows)
        src = _sel(ok, x_addr + (src_row * k_cols + chunk_col) * eb, x_addr, Int64)
        _cp_async16(dst + r * row_bytes, src, _sel(ok, 16, 0, Int32))


@cute.kernel
def fused_kernel(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor, s_row: cute.Tensor, s_col: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, row_s_mode: Int32,
    col_data_bytes: Int64, col_scale_bytes: Int64, ct_group: Int32,
    fmt: cutlass.Constexpr, in_bits: cutlass.Constexpr, stages: cutlass.Constexpr,
):
    # Names assigned inside a run-time `if` or loop are unique to it (the DSL
    # carries a name across a region when it was assigned before).
    n = BLOCK[fmt]
    epb = ELEMENTS_PER_BYTE[fmt]
    nvfp4 = fmt == "nvfp4"
    tb = FUSED_ROWS // n  # padded blocks a tile
    eb = in_bits // 8
    bf16 = in_bits == 16
    row_bytes = FUSED_COLS * eb
    tile_bytes = FUSED_ROWS * row_bytes
    seg_chunks = 32 * eb // 16  # 16-byte input chunks of a 32-element row segment
    block_bytes = n // epb  # data bytes of one block
    col_out = FUSED_ROWS // epb  # staged data bytes of one column (all the tile's blocks)
    row_out = FUSED_COLS // epb  # staged data bytes of one row
    col_chunks = col_out // 16
    row_chunks = row_out // 16
    slots = stages + 2  # info records: tiles it .. it + stages live in iteration it

    tid = Int32(cute.arch.thread_idx()[0])
    smem = cutlass.utils.SmemAllocator()
    staged = smem.allocate_tensor(Uint8, cute.make_layout(stages * tile_bytes), byte_alignment=128)
    col_stage = smem.allocate_tensor(Uint8, cute.make_layout(FUSED_COLS * col_out), byte_alignment=128)
    row_stage = smem.allocate_tensor(Uint8, cute.make_layout(FUSED_ROWS * row_out), byte_alignment=128)
    col_scale_stage = smem.allocate_tensor(Uint8, cute.make_layout(FUSED_COLS * tb), byte_alignment=16)
    info = smem.allocate_tensor(Uint8, cute.make_layout(slots * tb * INFO_BYTES), byte_alignment=16)
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

    # compute-phase roles: the row part takes row `tid` (FUSED_COLS / 32 segments of 32);
    # the column part takes columns 2 cpair, 2 cpair + 1 of rows 32 quarter .. 32 quarter + 31
    cpair = tid % 32
    quarter = tid // 32
    col_byte = 2 * eb * cpair
    rrow_bi = tid // n
    rlocal0 = Int64(tid - rrow_bi * n)

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
            _write_info(table, s_col, ibase + pf * (tb * INFO_BYTES), tid, rt_nf, n_groups, steps, total_blocks, n,
                        nvfp4)
        rt_nf, cu_nf, h_nf = _next_unit_tile(rt_nf, cu_nf, h_nf, n_rt, dq, dr, ct_group)
    cute.arch.sync_threads()
    for p in cutlass.range_constexpr(stages - 1):
        ctp = cu_in * ct_group + h_in
        if Int32(p) < count and ctp < n_ct:
            _issue_tile(x_addr, sbase + p * tile_bytes, ibase + p * (tb * INFO_BYTES), tid, Int64(ctp) * FUSED_COLS,
                        m_rows, k_cols, n, eb)
        cute.arch.cp_async_commit_group()
        rt_in, cu_in, h_in = _next_unit_tile(rt_in, cu_in, h_in, n_rt, dq, dr, ct_group)

    for it in cutlass.range(count, unroll=1):
        nxt = it + (stages - 1)
        ctn = cu_in * ct_group + h_in
        if nxt < count and ctn < n_ct:
            _issue_tile(x_addr, sbase + (nxt % stages) * tile_bytes, ibase + (nxt % slots) * (tb * INFO_BYTES), tid,
                        Int64(ctn) * FUSED_COLS, m_rows, k_cols, n, eb)
        cute.arch.cp_async_commit_group()
        rt_in, cu_in, h_in = _next_unit_tile(rt_in, cu_in, h_in, n_rt, dq, dr, ct_group)
        if tid < tb:
            _write_info(table, s_col, ibase + ((it + stages) % slots) * (tb * INFO_BYTES), tid, rt_nf, n_groups,
                        steps, total_blocks, n, nvfp4)
        rt_nf, cu_nf, h_nf = _next_unit_tile(rt_nf, cu_nf, h_nf, n_rt, dq, dr, ct_group)
        cute.arch.cp_async_wait_group(stages - 1)
        cute.arch.sync_threads()

        stage_addr = sbase + (it % stages) * tile_bytes
        slot = ibase + (it % slots) * (tb * INFO_BYTES)
        col0 = Int64(cu * ct_group + h) * FUSED_COLS
        rt, cu, h = _next_unit_tile(rt, cu, h, n_rt, dq, dr, ct_group)

        # ---- rowwise: row tid of the tile, quantized into row_stage (data) and stored (scales)
        rfirst, rvalid, rs_bits = _read_first_valid(slot, rrow_bi)
        xrow = rfirst + rlocal0
        if rlocal0 < rvalid and col0 < k_cols:
            rs = Float32(1.0)
            if cutlass.const_expr(nvfp4):
                rs = _f32(rs_bits)
                if row_s_mode != 0:
                    rs = s_row[xrow]
            rscales = Uint32(0)
            for seg in cutlass.range_constexpr(FUSED_COLS // 32):
                rsrc = stage_addr + tid * row_bytes
                rxb = cute.make_rmem_tensor(32, Uint32)
                rpacked = cute.make_rmem_tensor(16, Uint32)
                for rc in cutlass.range_constexpr(seg_chunks):
                    w4 = _ld_shared(rsrc + ((seg * seg_chunks + rc) ^ (tid & 7)) * 16, 4)
                    for rq in cutlass.range_constexpr(4):
                        if cutlass.const_expr(bf16):
                            rpacked[4 * rc + rq] = w4[rq]
                            rxb[8 * rc + 2 * rq] = w4[rq] << Uint32(16)
                            rxb[8 * rc + 2 * rq + 1] = w4[rq] & Uint32(0xFFFF0000)
                        else:
                            rxb[4 * rc + rq] = w4[rq]
                rout = rbase + tid * row_out
                if cutlass.const_expr(not nvfp4):
                    ramax = None
                    if cutlass.const_expr(bf16):
                        rm = _packed_amax(rpacked, 0, 16)
                        ramax = cutlass.max(rm & Uint32(0xFFFF), rm >> Uint32(16)) << Uint32(16)
                    rwords = cute.make_rmem_tensor(8, Uint32)
                    rbyte = _mxfp8_block(rxb, rwords, ramax)
                    # 32 bytes = chunks 2 seg, 2 seg + 1 of the row's 4; slot k ^ ((row >> 1) & 3)
                    for rk in cutlass.range_constexpr(2):
                        _st_shared_v4(rout + ((2 * seg + rk) ^ ((tid >> 1) & 3)) * 16,
                                      [rwords[4 * rk], rwords[4 * rk + 1], rwords[4 * rk + 2], rwords[4 * rk + 3]])
                    rscales = rscales | (rbyte << Uint32(8 * seg))
                else:
                    rwords = cute.make_rmem_tensor(4, Uint32)
                    for rh in cutlass.range_constexpr(2):
                        rxh = cute.make_rmem_tensor(16, Uint32)
                        for ri in cutlass.range_constexpr(16):
                            rxh[ri] = rxb[16 * rh + ri]
                        rhmax = None
                        if cutlass.const_expr(bf16):
                            rhm = _packed_amax(rpacked, 8 * rh, 8)
                            rhmax = cutlass.max(rhm & Uint32(0xFFFF), rhm >> Uint32(16)) << Uint32(16)
                        rwh = cute.make_rmem_tensor(2, Uint32)
                        rhbyte = _nvfp4_block(rxh, rwh, rs, rhmax)
                        rwords[2 * rh] = rwh[0]
                        rwords[2 * rh + 1] = rwh[1]
                        rscales = rscales | (rhbyte << Uint32(8 * (2 * seg + rh)))
                    # 16 bytes = chunk seg of the row's 2; slot seg ^ ((row >> 2) & 1)
                    _st_shared_v4(rout + (seg ^ ((tid >> 2) & 1)) * 16, [rwords[0], rwords[1], rwords[2], rwords[3]])
            # scales: 2 (MXFP8) / 4 (NVFP4) bytes of this row, straight to memory
            rsat = row_scale_addr + xrow * (k_cols // n) + col0 // n
            rfull = col0 + FUSED_COLS <= k_cols
            if cutlass.const_expr(not nvfp4):
                if rfull and k64:
                    _st_global_u16(rsat, rscales)
                else:
                    _st_global_u8(rsat, rscales)
                    if col0 + 32 < k_cols:
                        _st_global_u8(rsat + 1, rscales >> Uint32(8))
            else:
                if rfull and k64:
                    _st_global(rsat, [rscales])
                else:
                    for rb in cutlass.range_constexpr(4):
                        if col0 + 16 * rb < k_cols:
                            _st_global_u8(rsat + rb, rscales >> Uint32(8 * rb))

        # ---- columnwise: columns 2 cpair, 2 cpair + 1 of rows 32 quarter .. 32 quarter + 31
        lo = cute.make_rmem_tensor(32, Uint32)  # bf16: both columns packed; fp32: column 2 cpair
        hi = cute.make_rmem_tensor(32, Uint32)  # fp32: column 2 cpair + 1
        for rr in cutlass.range_constexpr(32):
            crow = 32 * quarter + rr
            caddr = stage_addr + crow * row_bytes + (((col_byte // 16) ^ (rr & 7)) * 16) + col_byte % 16
            if cutlass.const_expr(bf16):
                lo[rr] = _ld_shared(caddr, 1)[0]
            else:
                pair = _ld_shared(caddr, 2)
                lo[rr] = pair[0]
                hi[rr] = pair[1]
        for cb in cutlass.range_constexpr(32 // n):
            cbi = quarter * (32 // n) + cb  # the tile's block this thread quantizes
            cfirst, cvalid, cs_bits = _read_first_valid(slot, cbi)
            if cvalid > Int64(0) and col0 < k_cols:
                cm = Uint32(0)
                if cutlass.const_expr(bf16):
                    cm = _packed_amax(lo, cb * n, n)
                cs = _f32(cs_bits)
                for ch in cutlass.range_constexpr(2):
                    cc = 2 * cpair + ch  # column within the tile
                    cxb = cute.make_rmem_tensor(n, Uint32)
                    for ci in cutlass.range_constexpr(n):
                        if cutlass.const_expr(bf16):
                            if cutlass.const_expr(ch == 0):
                                cxb[ci] = lo[cb * n + ci] << Uint32(16)
                            else:
                                cxb[ci] = lo[cb * n + ci] & Uint32(0xFFFF0000)
                        else:
                            cxb[ci] = lo[cb * n + ci] if ch == 0 else hi[cb * n + ci]
                    camax = None
                    if cutlass.const_expr(bf16):
                        camax = (cm << Uint32(16)) if ch == 0 else (cm & Uint32(0xFFFF0000))
                    cwords = cute.make_rmem_tensor(block_bytes // 4, Uint32)
                    if cutlass.const_expr(not nvfp4):
                        cbyte = _mxfp8_block(cxb, cwords, camax)
                        # 32 bytes = chunks 2 quarter, 2 quarter + 1 of the column's 8; slot k ^ (cpair & 7)
                        for ck in cutlass.range_constexpr(2):
                            _st_shared_v4(cbase + cc * col_out + ((2 * quarter + ck) ^ (cpair & 7)) * 16,
                                          [cwords[4 * ck], cwords[4 * ck + 1], cwords[4 * ck + 2], cwords[4 * ck + 3]])
                    else:
                        cbyte = _nvfp4_block(cxb, cwords, cs, camax)
                        # 8 bytes = half cb of chunk quarter of the column's 4; slot quarter ^ (cpair & 3)
                        _st_shared_v2(cbase + cc * col_out + (quarter ^ (cpair & 3)) * 16 + 8 * cb,
                                      [cwords[0], cwords[1]])
                    _st_shared_u8(csbase + cc * tb + cbi, cbyte)
        cute.arch.sync_threads()

        # ---- write the staged tile out: every warp store covers whole runs of an output row
        # row data: FUSED_ROWS rows x row_out bytes, 16-byte chunks, a row's chunks on neighbouring threads
        for wi in cutlass.range_constexpr(FUSED_ROWS * row_chunks // FUSED_THREADS):
            wk = tid + FUSED_THREADS * wi
            wr = wk // row_chunks
            wq = wk % row_chunks
            wfirst, wvalid, _ws = _read_first_valid(slot, wr // n)
            wlocal = Int64(wr - (wr // n) * n)
            wseg_col = col0 + Int64((16 if not nvfp4 else 32) * wq)  # first column of the chunk
            if wlocal < wvalid and wseg_col < k_cols:
                wsw = ((wr >> 1) & 3) if not nvfp4 else ((wr >> 2) & 1)
                ww = _ld_shared(rbase + wr * row_out + (wq ^ wsw) * 16, 4)
                wxrow = wfirst + wlocal
                if cutlass.const_expr(not nvfp4):
                    _st_global(row_data_addr + wxrow * k_cols + wseg_col, ww)
                else:
                    wat = row_data_addr + wxrow * (k_cols // 2) + wseg_col // 2
                    if k32 and wseg_col + 16 < k_cols:
                        _st_global(wat, ww)
                    else:
                        _st_global(wat, [ww[0], ww[1]])
                        if wseg_col + 16 < k_cols:
                            _st_global(wat + 8, [ww[2], ww[3]])
        # column data: FUSED_COLS columns x col_out bytes
        for vi in cutlass.range_constexpr(FUSED_COLS * col_chunks // FUSED_THREADS):
            vk = tid + FUSED_THREADS * vi
            vc = vk // col_chunks
            vq = vk % col_chunks
            vcol = col0 + Int64(vc)
            vsw = ((vc >> 1) & 7) if not nvfp4 else ((vc >> 1) & 3)
            vw = _ld_shared(cbase + vc * col_out + (vq ^ vsw) * 16, 4)
            for vh in cutlass.range_constexpr(2 if nvfp4 else 1):
                vbi = (vq // 2) if not nvfp4 else (2 * vq + vh)
                vj, voff, vstride, vvalid = _read_placement(slot, vbi, True)
                if vvalid > Int64(0) and vcol < k_cols:
                    vat = voff + vcol * vstride + vj * block_bytes
                    if vat >= Int64(0) and vat + block_bytes <= col_data_bytes:
                        if cutlass.const_expr(not nvfp4):
                            _st_global(col_data_addr + vat + 16 * (vq % 2), vw)
                        else:
                            _st_global(col_data_addr + vat, [vw[2 * vh], vw[2 * vh + 1]])
        # column scales: FUSED_COLS columns x tb bytes
        for si in cutlass.range_constexpr(FUSED_COLS * tb // FUSED_THREADS):
            sk = tid + FUSED_THREADS * si
            sc = sk // tb
            sbi = sk % tb
            scol = col0 + Int64(sc)
            sj, soff, sstride, svalid = _read_placement(slot, sbi, False)
            if svalid > Int64(0) and scol < k_cols:
                sat = soff + scol * sstride + sj
                if sat >= Int64(0) and sat < col_scale_bytes:
                    _st_global_u8(col_scale_addr + sat, _ld_shared_u8(csbase + sk))


def _fused_launch(x, table, row_data, row_scale, col_data, col_scale, s_row, s_col, scalars, grid_ctas, stream,
                  fmt):
    bits = x.element_type.width
    stages = FUSED_STAGES[(fmt, bits)]
    n = BLOCK[fmt]
    epb = ELEMENTS_PER_BYTE[fmt]
    smem = (stages * FUSED_ROWS * FUSED_COLS * (bits // 8) + 2 * FUSED_ROWS * FUSED_COLS // epb
            + FUSED_COLS * (FUSED_ROWS // n) + (stages + 2) * (FUSED_ROWS // n) * INFO_BYTES + 512)
    fused_kernel(
        x, table, row_data, row_scale, col_data, col_scale, s_row, s_col, *scalars, fmt, bits, stages
    ).launch(grid=(grid_ctas, 1, 1), block=(FUSED_THREADS, 1, 1), smem=smem, stream=stream)


@cute.jit
def fused_mxfp8_host(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, col_data_bytes: Int64, col_scale_bytes: Int64,
    ct_group: Int32, grid_ctas: Int32, stream,
):
    scalars = (n_groups, steps, m_rows, k_cols, Int32(0), col_data_bytes, col_scale_bytes, ct_group)
    _fused_launch(x, table, row_data, row_scale, col_data, col_scale, table, table, scalars, grid_ctas, stream,
                  "mxfp8")


@cute.jit
def fused_nvfp4_host(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor, s_row: cute.Tensor, s_col: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, row_s_mode: Int32,
    col_data_bytes: Int64, col_scale_bytes: Int64, ct_group: Int32, grid_ctas: Int32, stream,
):
    scalars = (n_groups, steps, m_rows, k_cols, row_s_mode, col_data_bytes, col_scale_bytes, ct_group)
    _fused_launch(x, table, row_data, row_scale, col_data, col_scale, s_row, s_col, scalars, grid_ctas, stream,
                  "nvfp4")


# ---- per-group finite amax (NVFP4's S) ---------------------------------------------------------


def _finite_abs(bits: Uint32) -> Uint32:
    a = bits & Uint32(ABS_MASK)
    return _sel(a < Uint32(INF_BITS), a, 0, Uint32)


@cute.jit
def _amax_flush(acc: Uint32, group: Int32, out_addr: Int64, reduce_addr: Int32, tid: Int32):
    """CTA max of acc -> one atomic max into out[group] (every thread calls; group is CTA-uniform)."""
    m = _warp_max_u32(acc)
    if tid % 32 == 0:
        _st_shared(reduce_addr + (tid // 32) * 4, m)
    cute.arch.sync_threads()
    if tid == 0 and group >= 0:
        w = _ld_shared(reduce_addr, 4)
        total = cutlass.max(cutlass.max(w[0], w[1]), cutlass.max(w[2], w[3]))
        if total > Uint32(0):
            _red_max_u32(out_addr + Int64(group) * 4, total)
    cute.arch.sync_threads()


@dsl_user_op
def _st_shared(smem_addr, value, *, loc=None, ip=None):
    args = [Int32(smem_addr).ir_value(loc=loc, ip=ip), Uint32(value).ir_value(loc=loc, ip=ip)]
    _void_asm("st.shared.b32 [$0], $1;", "r,r", args, loc, ip)


@cute.kernel
def amax_kernel(x: cute.Tensor, table: cute.Tensor, out: cute.Tensor, n_groups: Int32, steps: Int32,
                m_rows: Int64, k_cols: Int64, in_bits: cutlass.Constexpr):
    n = BLOCK["nvfp4"]
    eb = in_bits // 8
    cpr = AMAX_COLS * eb // 16
    rows_per_load = FUSED_THREADS // cpr
    n_loads = AMAX_ROWS // rows_per_load
    tid = Int32(cute.arch.thread_idx()[0])
    smem = cutlass.utils.SmemAllocator()
    reduce = smem.allocate_tensor(Uint32, cute.make_layout(FUSED_THREADS // 32), byte_alignment=16)
    reduce_addr = reduce.iterator.toint()
    x_addr = x.iterator.toint()
    out_addr = out.iterator.toint()
    rt, ct, count, n_ct, total_blocks = _tile_range(table, n_groups, k_cols, n)
    chunk = tid % cpr
    u = tid // cpr
    current = Int32(-1)
    acc = Uint32(0)
    for it in cutlass.range(count, unroll=1):
        col0, blocks = _tile_blocks(table, rt, ct, n_groups, steps, total_blocks, n, AMAX_ROWS, AMAX_COLS)
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
            src = _sel(ok, x_addr + (src_row * k_cols + chunk_col) * eb, x_addr, Int64)
            loaded.append(_ld_global_pred(src, _sel(ok, 1, 0, Int32)))
        for gbi in cutlass.range_constexpr(AMAX_ROWS // n):
            if blocks[gbi][0] != current:
                _amax_flush(acc, current, out_addr, reduce_addr, tid)
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
    _amax_flush(acc, current, out_addr, reduce_addr, tid)


@cute.jit
def amax_host(x: cute.Tensor, table: cute.Tensor, out: cute.Tensor, n_groups: Int32, steps: Int32,
              m_rows: Int64, k_cols: Int64, grid_ctas: Int32, stream):
    amax_kernel(x, table, out, n_groups, steps, m_rows, k_cols, x.element_type.width).launch(
        grid=(grid_ctas, 1, 1), block=(FUSED_THREADS, 1, 1), smem=64, stream=stream
    )
