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

from grouped.elements import E2M1_MAX, E4M3_MAX

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
FP32_MAX_BITS = 0x7F7FFFFF
ONE_BITS = _bits(1.0)
NVFP4_AMAX_TO_S = E4M3_MAX * E2M1_MAX  # S = fp32(this / amax) (grouped.formats)
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



def _e2m1_code_ptx(acc: str, i: int) -> list[str]:
    """PTX: round the scaled magnitude in ``a`` (fp32, >= 0) to an E2M1 index (ties to even,
    saturating at 6) and add it as nibble ``i`` of the word ``acc``: three correctly rounded
    adds onto 2^23 put the candidates in the low bits, their integer min is the index."""
    return [
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
    ]

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
            *_e2m1_code_ptx(acc, i),
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
    r = _div_rn(s, _e4m3x2_to_f32(d)[0])
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

    lo, row = _group_of_block(table, padded_block, n_groups, steps)
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


_ADDRESS = {"global": ("l", Int64), "shared": ("r", Int32)}  # constraint and type of an address


def _guarded(pred, first: int, loc, ip):
    """(operands, constraints, PTX lines, guard) of an optional predicate, operand ``first``."""
    if pred is None:
        return [], [], [], ""
    return [Int32(pred).ir_value(loc=loc, ip=ip)], ["r"], [".reg .pred p;", f"setp.ne.b32 p, ${first}, 0;"], "@p "


@dsl_user_op
def _st(space: str, addr, values, bits: int = 32, pred=None, *, loc=None, ip=None):
    """Store to ``space`` ("global" or "shared") at addr: ``values`` one word, or a list of 1, 2 or 4
    words (a vector store, n * 4-byte aligned); ``bits`` 8 or 16 store the low byte / half of one
    word. With ``pred``, only where it is nonzero."""
    words = list(values) if isinstance(values, (list, tuple)) else [values]
    n = len(words)
    assert bits == 32 or n == 1
    constraint, addr_type = _ADDRESS[space]
    p_args, p_cons, lines, guard = _guarded(pred, 1, loc, ip)
    srcs = [f"${1 + len(p_args) + i}" for i in range(n)]
    if bits == 32:
        vec = {1: "", 2: ".v2", 4: ".v4"}[n]
        lines.append(f"{guard}st.{space}{vec}.b32 [$0], {srcs[0] if n == 1 else '{' + ', '.join(srcs) + '}'};")
    else:
        lines += [".reg .b16 v;", f"cvt.u16.u32 v, {srcs[0]};", f"{guard}st.{space}.b{bits} [$0], v;"]
    args = [addr_type(addr).ir_value(loc=loc, ip=ip)] + p_args + [Uint32(w).ir_value(loc=loc, ip=ip) for w in words]
    _void_asm("{\n" + "\n".join(lines) + "\n}", ",".join([constraint] + p_cons + ["r"] * n), args, loc, ip)


@dsl_user_op
def _ld(space: str, addr, n: int = 1, bits: int = 32, pred=None, ld: str | None = None, *, loc=None, ip=None):
    """n (1, 2 or 4) consecutive words from ``space`` at addr (n * 4-byte aligned), or with ``bits`` 8
    one byte zero-extended. With ``pred``, loaded only where it is nonzero, zeros elsewhere. ``ld``:
    the load instruction with its cache operators (default ld.global.nc, the read-only path, or
    ld.shared)."""
    assert bits == 32 or n == 1
    ld = ld or ("ld.global.nc" if space == "global" else "ld.shared")
    constraint, addr_type = _ADDRESS[space]
    p_args, p_cons, lines, guard = _guarded(pred, n + 1, loc, ip)
    outs = [f"${i}" for i in range(n)]
    if pred is not None:
        lines += [f"mov.b32 {o}, 0;" for o in outs]
    if bits == 32:
        vec = {1: "", 2: ".v2", 4: ".v4"}[n]
        lines.append(f"{guard}{ld}{vec}.b32 {outs[0] if n == 1 else '{' + ', '.join(outs) + '}'}, [${n}];")
    else:
        lines += [".reg .b16 v;", "mov.b16 v, 0;", f"{guard}{ld}.b8 v, [${n}];", "cvt.u32.u16 $0, v;"]
    args = [addr_type(addr).ir_value(loc=loc, ip=ip)] + p_args
    return _words_asm(n, "{\n" + "\n".join(lines) + "\n}", ",".join(["=r"] * n + [constraint] + p_cons), args,
                      loc, ip)


@dsl_user_op
def _cp_async16(smem_addr, gmem_addr, src_bytes, cache: str = "cg", *, loc=None, ip=None):
    """16 bytes global -> shared, asynchronously; src_bytes 0 writes zeros and reads nothing. ``cache``
    "cg" bypasses L1 (each 32-byte sector its own L2 request), "ca" goes through L1 (one L2 request
    a 128-byte line)."""
    args = [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int64(gmem_addr).ir_value(loc=loc, ip=ip),
            Int32(src_bytes).ir_value(loc=loc, ip=ip)]
    _void_asm(f"cp.async.{cache}.shared.global [$0], [$1], 16, $2;", "r,l,r", args, loc, ip)


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


@dsl_user_op
def _fence_gpu(*, loc=None, ip=None):
    _void_asm("fence.acq_rel.gpu;", "", [], loc, ip)


@dsl_user_op
def _atom_add_u32(gmem_addr, value, *, loc=None, ip=None) -> Uint32:
    """Atomic add at gpu scope, acquire-release; returns the old value."""
    args = [Int64(gmem_addr).ir_value(loc=loc, ip=ip), Uint32(value).ir_value(loc=loc, ip=ip)]
    return _words_asm(1, "atom.acq_rel.gpu.global.add.u32 $0, [$1], $2;", "=r,l,r", args, loc, ip)[0]


def _packed_amax(words, first: int, count: int) -> Uint32:
    """max.u16x2 over |bf16 pairs| of words[first:first + count]: both halves' block amaxes at once."""
    m = Uint32(0)
    for i in range(first, first + count):
        m = _max_u16x2(m, words[i] & Uint32(0x7FFF7FFF))
    return m


@cute.jit
def _group_of_block(table: cute.Tensor, b: Int64, n_groups: Int32, steps: Int32):
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
def _find_block(table: cute.Tensor, b: Int64, n_groups: Int32, steps: Int32, total_blocks: Int64,
                n: cutlass.Constexpr):
    """Padded block b -> (group, table row offset, block index j in the group, rows of it that are real).

    ``valid`` is 0 for a block past the table's last block or past its group's rows.
    """
    lo, row = _group_of_block(table, b, n_groups, steps)
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
    _st("shared", at, _split64(first) + _split64(j))
    _st("shared", at + 16, _split64(table[row + DATA_OFFSET]) + _split64(table[row + DATA_STRIDE]))
    _st("shared", at + 32, _split64(table[row + SCALE_OFFSET]) + _split64(table[row + SCALE_STRIDE]))
    _st("shared", at + 48, [Uint32(valid), Uint32(g), s_bits, Uint32(0)])


def _read_first_valid(slot_addr: Int32, bi):
    """(first x row, valid rows, group S bits) of block bi's record."""
    w = _ld("shared", slot_addr + bi * INFO_BYTES, 2)
    v = _ld("shared", slot_addr + bi * INFO_BYTES + _I_VALID, 4)
    return _join64(w[0], w[1]), Int64(Int32(v[0])), v[2]


def _read_placement(slot_addr: Int32, bi, data: bool):
    """(j, offset, stride, valid rows) of block bi's record: data's or scale's."""
    w = _ld("shared", slot_addr + bi * INFO_BYTES + _I_J, 2)
    p = _ld("shared", slot_addr + bi * INFO_BYTES + (_I_DO if data else _I_SO), 4)
    v = _ld("shared", slot_addr + bi * INFO_BYTES + _I_VALID, 1)
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
                    w4 = _ld("shared", rsrc + ((seg * seg_chunks + rc) ^ (tid & 7)) * 16, 4)
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
                        _st("shared", rout + ((2 * seg + rk) ^ ((tid >> 1) & 3)) * 16,
                            [rwords[4 * rk + i] for i in range(4)])
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
                    _st("shared", rout + (seg ^ ((tid >> 2) & 1)) * 16, [rwords[0], rwords[1], rwords[2], rwords[3]])
            # scales: 2 (MXFP8) / 4 (NVFP4) bytes of this row, straight to memory
            rsat = row_scale_addr + xrow * (k_cols // n) + col0 // n
            rfull = col0 + FUSED_COLS <= k_cols
            if cutlass.const_expr(not nvfp4):
                if rfull and k64:
                    _st("global", rsat, rscales, 16)
                else:
                    _st("global", rsat, rscales, 8)
                    if col0 + 32 < k_cols:
                        _st("global", rsat + 1, rscales >> Uint32(8), 8)
            else:
                if rfull and k64:
                    _st("global", rsat, [rscales])
                else:
                    for rb in cutlass.range_constexpr(4):
                        if col0 + 16 * rb < k_cols:
                            _st("global", rsat + rb, rscales >> Uint32(8 * rb), 8)

        # ---- columnwise: columns 2 cpair, 2 cpair + 1 of rows 32 quarter .. 32 quarter + 31
        lo = cute.make_rmem_tensor(32, Uint32)  # bf16: both columns packed; fp32: column 2 cpair
        hi = cute.make_rmem_tensor(32, Uint32)  # fp32: column 2 cpair + 1
        for rr in cutlass.range_constexpr(32):
            crow = 32 * quarter + rr
            caddr = stage_addr + crow * row_bytes + (((col_byte // 16) ^ (rr & 7)) * 16) + col_byte % 16
            if cutlass.const_expr(bf16):
                lo[rr] = _ld("shared", caddr, 1)[0]
            else:
                pair = _ld("shared", caddr, 2)
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
                            _st("shared", cbase + cc * col_out + ((2 * quarter + ck) ^ (cpair & 7)) * 16,
                                [cwords[4 * ck + i] for i in range(4)])
                    else:
                        cbyte = _nvfp4_block(cxb, cwords, cs, camax)
                        # 8 bytes = half cb of chunk quarter of the column's 4; slot quarter ^ (cpair & 3)
                        _st("shared", cbase + cc * col_out + (quarter ^ (cpair & 3)) * 16 + 8 * cb, [cwords[0], cwords[1]])
                    _st("shared", csbase + cc * tb + cbi, cbyte, 8)
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
                ww = _ld("shared", rbase + wr * row_out + (wq ^ wsw) * 16, 4)
                wxrow = wfirst + wlocal
                if cutlass.const_expr(not nvfp4):
                    _st("global", row_data_addr + wxrow * k_cols + wseg_col, ww)
                else:
                    wat = row_data_addr + wxrow * (k_cols // 2) + wseg_col // 2
                    if k32 and wseg_col + 16 < k_cols:
                        _st("global", wat, ww)
                    else:
                        _st("global", wat, [ww[0], ww[1]])
                        if wseg_col + 16 < k_cols:
                            _st("global", wat + 8, [ww[2], ww[3]])
        # column data: FUSED_COLS columns x col_out bytes
        for vi in cutlass.range_constexpr(FUSED_COLS * col_chunks // FUSED_THREADS):
            vk = tid + FUSED_THREADS * vi
            vc = vk // col_chunks
            vq = vk % col_chunks
            vcol = col0 + Int64(vc)
            vsw = ((vc >> 1) & 7) if not nvfp4 else ((vc >> 1) & 3)
            vw = _ld("shared", cbase + vc * col_out + (vq ^ vsw) * 16, 4)
            for vh in cutlass.range_constexpr(2 if nvfp4 else 1):
                vbi = (vq // 2) if not nvfp4 else (2 * vq + vh)
                vj, voff, vstride, vvalid = _read_placement(slot, vbi, True)
                if vvalid > Int64(0) and vcol < k_cols:
                    vat = voff + vcol * vstride + vj * block_bytes
                    if vat >= Int64(0) and vat + block_bytes <= col_data_bytes:
                        if cutlass.const_expr(not nvfp4):
                            _st("global", col_data_addr + vat + 16 * (vq % 2), vw)
                        else:
                            _st("global", col_data_addr + vat, [vw[2 * vh], vw[2 * vh + 1]])
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
                    _st("global", col_scale_addr + sat, _ld("shared", csbase + sk, bits=8)[0], 8)


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


# ---- per-group finite amax, and NVFP4's S from it --------------------------------------------------


def _finite_abs(bits: Uint32) -> Uint32:
    a = bits & Uint32(ABS_MASK)
    return _sel(a < Uint32(INF_BITS), a, 0, Uint32)


@cute.jit
def _amax_flush(acc: Uint32, group: Int32, out_addr: Int64, reduce_addr: Int32, tid: Int32):
    """CTA max of acc -> one atomic max into out[group] (every thread calls; group is CTA-uniform)."""
    m = _warp_max_u32(acc)
    if tid % 32 == 0:
        _st("shared", reduce_addr + (tid // 32) * 4, m)
    cute.arch.sync_threads()
    if tid == 0 and group >= 0:
        w = _ld("shared", reduce_addr, 4)
        total = cutlass.max(cutlass.max(w[0], w[1]), cutlass.max(w[2], w[3]))
        if total > Uint32(0):
            _red_max_u32(out_addr + Int64(group) * 4, total)
    cute.arch.sync_threads()


def _nvfp4_global_scale_bits(amax_bits: Uint32) -> Uint32:
    """NVFP4's S from a finite amax >= 0 (grouped.formats): fp32(2688 / amax) capped at the largest
    finite fp32 (a min of bit patterns: both positive), 1 where amax = 0."""
    s = _u32(_div_rn(Float32(NVFP4_AMAX_TO_S), _f32(amax_bits)))
    return _sel(amax_bits == Uint32(0), ONE_BITS, cutlass.min(s, Uint32(FP32_MAX_BITS)), Uint32)


@cute.jit
def _last_cta_scales(out_addr: Int64, scale_addr: Int64, n_groups: Int32, reduce_addr: Int32, tid: Int32):
    """Count this CTA done in out[n_groups]; the last one to finish turns every group's amax into
    S. Thread 0 did this CTA's atomic maxes, so its acquire-release count orders them before the
    last CTA's reads (the usual "last block" reduction)."""
    if tid == 0:
        _fence_gpu()
        done = _atom_add_u32(out_addr + Int64(n_groups) * 4, 1)
        _st("shared", reduce_addr, _sel(done == Uint32(cute.arch.grid_dim()[0] - 1), 1, 0, Uint32))
    cute.arch.sync_threads()
    if _ld("shared", reduce_addr)[0] != Uint32(0):
        _fence_gpu()
        for g in cutlass.range(tid, n_groups, FUSED_THREADS, unroll=1):
            amax = _ld("global", out_addr + Int64(g) * 4, ld="ld.relaxed.gpu.global")[0]
            _st("global", scale_addr + Int64(g) * 4, _nvfp4_global_scale_bits(amax))


@cute.kernel
def amax_kernel(x: cute.Tensor, table: cute.Tensor, out: cute.Tensor, scale: cute.Tensor, n_groups: Int32,
                steps: Int32, m_rows: Int64, k_cols: Int64, in_bits: cutlass.Constexpr):
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
            loaded.append(_ld("global", src, 4, pred=_sel(ok, 1, 0, Int32)))
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
    _last_cta_scales(out_addr, scale.iterator.toint(), n_groups, reduce_addr, tid)


@cute.jit
def amax_host(x: cute.Tensor, table: cute.Tensor, out: cute.Tensor, scale: cute.Tensor, n_groups: Int32,
              steps: Int32, m_rows: Int64, k_cols: Int64, grid_ctas: Int32, stream):
    amax_kernel(x, table, out, scale, n_groups, steps, m_rows, k_cols, x.element_type.width).launch(
        grid=(grid_ctas, 1, 1), block=(FUSED_THREADS, 1, 1), smem=64, stream=stream
    )


# ---- fused rowwise + columnwise for bf16 input --------------------------------------------------
#
# quantize.py's notes on quantize_both say what is computed; this is how, for bf16 x.
# MXFP8 (fused2_kernel): registers, no shared memory, no barriers: each warp quantizes a tile of
# 128 rows (the FUSED_ROWS / 32 padded blocks of the group table) by warp_cols columns on its own.
# A lane loads its rows x columns piece with plain 16-byte loads, all in flight at once, and keeps
# it in registers as packed bf16 pairs:
#   rows_per_lane 32: 32 rows x 8 columns (one padded block; a row block spans 4 lanes, its amax
#          reduced by two shuffles, two rows a shuffle);
#   rows_per_lane 16: 16 rows x 8 columns (half a padded block; a column block spans two lanes,
#          one shuffle for its amax).
# Rowwise blocks go from registers to memory (8-byte stores a row), then columnwise ones (16 / 32
# bytes a column); a column's four block scales of the tile are gathered by shuffles into one
# 4-byte store, and (stage_rows, rows_per_lane 16, 2 or 4 warps) a row's block scales of the CTA's
# warps go through a small shared staging area (one barrier a tile) into one 2- / 4-byte store:
# byte-sized scale stores cost as much L2 bandwidth as whole sectors. The whole tile is unrolled
# (~1.9k instructions; all of it fits the instruction cache). Loads: the instruction ``ld``
# (FUSED2 in quantize.py: plain ld.global, L1-allocating, measured fastest on an H200). The
# unrolled code shares no unpacked value between the two directions (the columnwise pass unpacks by
# byte permutes), else ptxas keeps all 256 unpacked floats live.
# NVFP4 (fused3_kernel, below): shared memory per warp, rolled loops.
# Block amaxes are bf16 max.NaN.xorsign.abs (exact: a max of magnitudes, NaN kept; the sign it
# leaves is masked off). The codecs are those of the one-direction kernels rewritten for bf16
# pairs, byte for byte the same:
#   MXFP8: e + 127 from t = fp32(amax * fp32(1/448)) as (t + 0x7FFFFF) >> 23 (0 where t <= 2^-127),
#          2^-e as the bits (254 - (e + 127)) << 23 (amax finite: e <= 120);
#   NVFP4: fp32(amax / 6) as q = amax * r6, q + fma(-q, 6, amax) * r6 with r6 = fp32(1/6) (checked
#          against the correctly rounded quotient for every bf16 amax, subnormals included); the
#          E2M1 codes as _e2m1_block_ptx, the sign nibble bits gathered by byte permutes, and the
#          r = inf case (zero values keep code 0) fixed up afterwards, off the main path.
# Warps of a CTA take neighbouring column tiles of the same rows (full 128-byte lines of rowwise
# output); CTAs stride over the tiles in bands of group_rows row tiles (_tile_rc).


@dsl_user_op
def _hmax_abs(a, b, *, loc=None, ip=None) -> Uint32:
    """Both halves: max(|a|, |b|) of bf16 pairs (NaN if either is NaN); sign bits undefined."""
    args = [Uint32(a).ir_value(loc=loc, ip=ip), Uint32(b).ir_value(loc=loc, ip=ip)]
    return Uint32(_asm(T.i32(), "max.NaN.xorsign.abs.bf16x2 $0, $1, $2;", "=r,r,r", args, loc, ip))


@dsl_user_op
def _prmt(a, b, sel: int, *, loc=None, ip=None) -> Uint32:
    args = [Uint32(a).ir_value(loc=loc, ip=ip), Uint32(b).ir_value(loc=loc, ip=ip)]
    return Uint32(_asm(T.i32(), f"prmt.b32 $0, $1, $2, {sel};", "=r,r,r", args, loc, ip))


@dsl_user_op
def _shfl_bfly(value, mask: int, *, loc=None, ip=None) -> Uint32:
    args = [Uint32(value).ir_value(loc=loc, ip=ip)]
    return _words_asm(1, f"shfl.sync.bfly.b32 $0, $1, {mask}, 31, 0xffffffff;", "=r,r", args, loc, ip)[0]


@dsl_user_op
def _vote_all(pred, *, loc=None, ip=None) -> Int32:
    """1 where pred != 0 in every lane of the warp, else 0 (all lanes must take part)."""
    ptx = "{\n.reg .pred p;\nsetp.ne.b32 p, $1, 0;\nvote.sync.all.pred p, p, 0xffffffff;\nselp.b32 $0, 1, 0, p;\n}"
    return Int32(_words_asm(1, ptx, "=r,r", [Int32(pred).ir_value(loc=loc, ip=ip)], loc, ip)[0])


@dsl_user_op
def _shfl_idx(value, src_lane, *, loc=None, ip=None) -> Uint32:
    args = [Uint32(value).ir_value(loc=loc, ip=ip), Int32(src_lane).ir_value(loc=loc, ip=ip)]
    return _words_asm(1, "shfl.sync.idx.b32 $0, $1, $2, 31, 0xffffffff;", "=r,r,r", args, loc, ip)[0]


@dsl_user_op
def _div6(a, *, loc=None, ip=None) -> Float32:
    """fp32(a / 6) for a bf16 value a >= 0: one correction step on a * fp32(1/6) (exact, see above)."""
    ptx = (
        "{\n.reg .f32 q, e;\n"
        "mul.rn.f32 q, $1, 0f3E2AAAAB;\n"
        "fma.rn.f32 e, q, 0fC0C00000, $1;\n"
        "fma.rn.f32 $0, e, 0f3E2AAAAB, q;\n}"
    )
    return Float32(_asm(T.f32(), ptx, "=f,f", [Float32(a).ir_value(loc=loc, ip=ip)], loc, ip))


@dsl_user_op
def _e4m3x2_lo16(a, b, *, loc=None, ip=None) -> Uint32:
    """Two fp32 -> E4M3 bytes (a in byte 0, b in byte 1), upper half zero."""
    args = [Float32(v).ir_value(loc=loc, ip=ip) for v in (a, b)]
    ptx = "{\n.reg .b16 lo;\ncvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\ncvt.u32.u16 $0, lo;\n}"
    return Uint32(_asm(T.i32(), ptx, "=r,f,f", args, loc, ip))


@dsl_user_op
def _e4m3x2_to_f32(pair, *, loc=None, ip=None):
    """The two E4M3 bytes in the low half of pair -> their fp32 values (0x7F / 0xFF are NaN): E4M3 ->
    f16 -> f32, both exact."""
    ptx = (
        "{\n.reg .b16 lo, h0, h1;\n.reg .b32 h;\n"
        "cvt.u16.u32 lo, $2;\n"
        "cvt.rn.f16x2.e4m3x2 h, lo;\n"
        "mov.b32 {h0, h1}, h;\n"
        "cvt.f32.f16 $0, h0;\n"
        "cvt.f32.f16 $1, h1;\n}"
    )
    struct = llvm.StructType.get_literal([T.f32()] * 2)
    res = llvm.inline_asm(struct, [Uint32(pair).ir_value(loc=loc, ip=ip)], ptx, "=f,=f,r", has_side_effects=False,
                          is_align_stack=False, loc=loc, ip=ip)
    return [Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(2)]


def _amax_halves(m):
    """A packed pair of bf16 magnitudes (signs undefined) -> the two fp32 bit patterns, sign cleared."""
    return [(Uint32(m) << Uint32(16)) & Uint32(ABS_MASK), Uint32(m) & Uint32(0x7FFF0000)]


def _hmax_tree(words):
    level = list(words)
    while len(level) > 1:
        nxt = [_hmax_abs(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _mxfp8_scale_bits(a: Uint32):
    """fp32 amax bits (sign clear) -> (E8M0 byte, fp32 2^-e, non-finite block)."""
    bad = a >= Uint32(INF_BITS)
    t = _u32(_mul_rn(_f32(a), _f32(INV_448_BITS)))
    e = _sel(t > Uint32(TWO_POW_M127_BITS), (t + Uint32(0x7FFFFF)) >> Uint32(23), 0, Uint32)
    inv = _f32((Uint32(254) - e) << Uint32(23))
    return _sel(bad, E8M0_NAN, e, Uint32), inv, bad


def _mxfp8_word_ptx(layout: str, half: int) -> str:
    """PTX: 4 bf16 values and inv -> a word of E4M3 bytes of fp32(x * inv), the first value lowest.

    layout "row": words $1, $2, values in halves lo, hi, lo, hi; "col": words $1..$4, half ``half``.
    """
    n_words = 2 if layout == "row" else 4
    inv = f"${1 + n_words}"
    lines = ["{", ".reg .b32 t;", ".reg .f32 f0, f1, f2, f3;", ".reg .b16 lo, hi;"]
    for e in range(4):
        w, h = (f"${1 + e // 2}", e % 2) if layout == "row" else (f"${1 + e}", half)
        if layout == "row":
            lines.append(f"shl.b32 t, {w}, 16;" if h == 0 else f"and.b32 t, {w}, 0xFFFF0000;")
        else:  # the same values by byte permutes: no instruction the rowwise pass could share with it
            lines.append(f"prmt.b32 t, {w}, 0, {0x1044 if h == 0 else 0x3244};")
        lines += [f"mov.b32 f{e}, t;", f"mul.rn.f32 f{e}, f{e}, {inv};"]
    lines += ["cvt.rn.satfinite.e4m3x2.f32 lo, f1, f0;", "cvt.rn.satfinite.e4m3x2.f32 hi, f3, f2;",
              "mov.b32 $0, {lo, hi};", "}"]
    return "\n".join(lines)


_MXFP8_WORD_PTX = {(lay, h): _mxfp8_word_ptx(lay, h) for lay, h in (("row", 0), ("col", 0), ("col", 1))}


@dsl_user_op
def _mxfp8_word(words, layout: str, half: int, inv, *, loc=None, ip=None) -> Uint32:
    args = [Uint32(w).ir_value(loc=loc, ip=ip) for w in words] + [Float32(inv).ir_value(loc=loc, ip=ip)]
    constraints = "=r," + ",".join(["r"] * len(words)) + ",f"
    return Uint32(_asm(T.i32(), _MXFP8_WORD_PTX[(layout, half)], constraints, args, loc, ip))


def _nvfp4_scales2(a_bits, s_vals):
    """Two blocks' fp32 amax bits (sign clear) and S -> [(E4M3 scale byte, r = fp32(S / d), zero codes,
    r = inf with codes used)] for each."""
    bad = [a >= Uint32(INF_BITS) for a in a_bits]
    sa = [_mul_rn(_div6(_f32(a)), s) for a, s in zip(a_bits, s_vals)]
    pair = _e4m3x2_lo16(sa[0], sa[1])
    d = [_sel(bad[0], E4M3_NAN, pair & Uint32(0xFF), Uint32), _sel(bad[1], E4M3_NAN, pair >> Uint32(8), Uint32)]
    dv = _e4m3x2_to_f32(d[0] | (d[1] << Uint32(8)))
    out = []
    for h in range(2):
        r = _div_rn(s_vals[h], dv[h])
        skip = bad[h] | ((d[h] & Uint32(0x7F)) == Uint32(0))
        fix = (~skip) & (_u32(r) == Uint32(INF_BITS))  # codes of zero values to clear afterwards
        out.append((d[h], r, skip, fix))
    return out


def _e2m1_bf16_ptx(layout: str, half: int, inf: bool) -> str:
    """PTX: 16 bf16 values and r -> two words of E2M1 nibbles of fp32(x * r) ($0, $1).

    layout "row": 8 words $2..$9, value e in half e % 2 of word e // 2; "col": 16 words $2..$17,
    value e in half ``half`` of word e; then r. Magnitudes as _e2m1_block_ptx (clamp at 6, the
    smallest of three correctly rounded candidates), without its r = inf fix: there zero values get
    code 7 here; ``inf`` gives the codes for r = inf instead (7 where x != 0, else 0), for the
    fix-up pass. Signs: byte permutes (sign-replicating selectors) gather each value's sign byte,
    two masks put the sign bits at bit 3 of their nibbles.
    """
    n_words = 8 if layout == "row" else 16
    r_arg = f"${2 + n_words}"

    def src(e):
        return (f"${2 + e // 2}", e % 2) if layout == "row" else (f"${2 + e}", half)

    lines = ["{", ".reg .f32 x, a, c1, c2, c3;", ".reg .b32 t, u, v, acc0, acc1, sP, sQ, sE, sO;", ".reg .pred q;"]
    if inf:
        lines += ["mov.b32 acc0, 0;", "mov.b32 acc1, 0;"]
    for e in range(16):
        w, h = src(e)
        acc, i = f"acc{e // 8}", e % 8
        if inf:
            lines += [f"and.b32 t, {w}, {0x7FFF if h == 0 else 0x7FFF0000};", "setp.ne.u32 q, t, 0;",
                      f"@q or.b32 {acc}, {acc}, {7 << (4 * i)};"]
            continue
        if layout == "col":  # byte permutes: no instruction the rowwise pass could share with it
            lines += [f"prmt.b32 t, {w}, 0, {0x1044 if h == 0 else 0x3244};", "mov.b32 x, t;", "abs.f32 x, x;"]
        elif h == 0:
            lines += [f"shl.b32 t, {w}, 16;", "mov.b32 x, t;", "abs.f32 x, x;"]
        else:
            lines += [f"and.b32 t, {w}, 0x7FFF0000;", "mov.b32 x, t;"]
        lines += [
            f"mul.rn.f32 a, x, {r_arg};",
            *_e2m1_code_ptx(acc, i),
        ]
    for o in range(2):  # output word o: values 8o .. 8o + 7
        acc = f"acc{o}"
        if layout == "row":
            # sP = signs of values 8o..8o+3 (bytes), sQ = 8o+4..8o+7; then even / odd values
            lines += [f"prmt.b32 sP, ${2 + 4 * o}, ${3 + 4 * o}, 0xFDB9;",
                      f"prmt.b32 sQ, ${4 + 4 * o}, ${5 + 4 * o}, 0xFDB9;",
                      "prmt.b32 sE, sP, sQ, 0x6420;", "prmt.b32 sO, sP, sQ, 0x7531;"]
        else:
            rep_a, rep_b = 8 | (2 * half + 1), 8 | (4 + 2 * half + 1)
            sel = rep_a | (rep_b << 4) | (rep_a << 8) | (rep_b << 12)
            base = 2 + 8 * o
            for name, first in (("sE", 0), ("sO", 1)):  # values 8o + first, + 2, + 4, + 6
                lines += [f"prmt.b32 sP, ${base + first}, ${base + first + 2}, {sel};",
                          f"prmt.b32 sQ, ${base + first + 4}, ${base + first + 6}, {sel};",
                          f"prmt.b32 {name}, sP, sQ, 0x5410;"]
        lines += ["and.b32 sE, sE, 0x08080808;", "and.b32 sO, sO, 0x80808080;",
                  f"or.b32 {acc}, {acc}, sE;", f"or.b32 {acc}, {acc}, sO;"]
    lines += ["mov.b32 $0, acc0;", "mov.b32 $1, acc1;", "}"]
    return "\n".join(lines)


_E2M1_BF16_PTX = {(lay, h, inf): _e2m1_bf16_ptx(lay, h, inf)
                  for lay, h in (("row", 0), ("col", 0), ("col", 1)) for inf in (False, True)}


@dsl_user_op
def _e2m1_bf16(words, layout: str, half: int, r, inf: bool = False, *, loc=None, ip=None):
    args = [Uint32(w).ir_value(loc=loc, ip=ip) for w in words] + [Float32(r).ir_value(loc=loc, ip=ip)]
    struct = llvm.StructType.get_literal([T.i32()] * 2)
    constraints = "=r,=r," + ",".join(["r"] * len(words)) + ",f"
    res = llvm.inline_asm(struct, args, _E2M1_BF16_PTX[(layout, half, inf)], constraints, has_side_effects=False,
                          is_align_stack=False, loc=loc, ip=ip)
    return [Uint32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(2)]


def _pred(cond) -> Int32:
    return _sel(cond, 1, 0, Int32)


def _fused2_tile(p, rt: Int32, ct: Int32):
    """One warp's MXFP8 tile: row tile rt, column tile ct of the CTA's columns (predicated, no branches)."""
    rl = p["rl"]
    n = BLOCK["mxfp8"]
    tb = FUSED_ROWS // n
    k_cols, lane, warp = p["k_cols"], p["lane"], p["warp"]
    g, c = lane // p["cl"], lane % p["cl"]
    slot = g if rl == n else g // 2  # the tile's padded block this lane's rows lie in
    local0 = Int64(0) if rl == n else Int64((g % 2) * 16)  # its first row in the block
    table = p["table"]
    grp, trow, j, valid = _find_block(table, Int64(rt) * tb + Int64(slot), p["n_groups"], p["steps"],
                                      p["total_blocks"], n)
    first = table[trow + ROW_START] + j * n
    col0 = Int64(ct) * p["cta_cols"] + Int64(warp * p["warp_cols"] + c * p["lc"])
    col_ok = col0 < k_cols
    # rows of the lane's piece that are real: in the group (valid) and in x, none past K
    n_rows = Int32(cutlass.max(cutlass.min(cutlass.min(valid - local0, p["m_rows"] - (first + local0)), Int64(rl)),
                               Int64(0)))
    n_ok = _sel(col_ok, n_rows, 0, Int32)
    row_ok = [Int32(i) < n_ok for i in range(rl)]

    # ---- loads: every row of the lane's piece, 16 bytes at a time, all issued before any use
    n_words = p["lc"] // 2
    x_row0 = p["x_addr"] + ((first + local0) * k_cols + col0) * 2
    row_pitch = k_cols * 2
    w = []
    for i in range(rl):
        at = x_row0 + Int64(i) * row_pitch
        words = []
        for v in range(n_words // 4):
            words += _ld("global", at + 16 * v, 4, pred=_pred(row_ok[i]), ld=p["ld"])
        w.append(words)
    blk_ok = col_ok & (valid > Int64(0))
    d_off, d_stride = table[trow + DATA_OFFSET], table[trow + DATA_STRIDE]
    s_off, s_stride = table[trow + SCALE_OFFSET], table[trow + SCALE_STRIDE]

    # ---- rowwise MXFP8: a row block is 4 lanes' 8 columns; two rows' amaxes a shuffle
    rd = p["row_data_addr"] + (first + local0) * k_cols + col0
    rsc = p["row_scale_addr"] + (first + local0) * (k_cols // 32) + col0 // 32
    # rl 32: a warp's two row blocks of a row, one 2-byte store where K / 32 is even and the
    # warp's columns lie inside K (warp-uniform), else a byte a block
    warp_col0 = col0 - Int64(c * p["lc"])
    pair_rows = rl == 32
    pair_ok = ((k_cols // 32) % 2 == Int64(0)) & (warp_col0 + 64 <= k_cols) if pair_rows else None
    for i in range(0, rl, 2):
        m0, m1 = _hmax_tree(w[i]), _hmax_tree(w[i + 1])
        mm = _hmax_abs(_prmt(m0, m1, 0x5410), _prmt(m0, m1, 0x7632))
        mm = _hmax_abs(mm, _shfl_bfly(mm, 1))
        mm = _hmax_abs(mm, _shfl_bfly(mm, 2))
        bytes2 = []
        for h, a in enumerate(_amax_halves(mm)):
            r = i + h
            byte, inv, bad = _mxfp8_scale_bits(a)
            bytes2.append(byte)
            out = [_sel(bad, 0x7F7F7F7F, _mxfp8_word(w[r][2 * q:2 * q + 2], "row", 0, inv), Uint32)
                   for q in range(2)]
            _st("global", rd + Int64(r) * k_cols, out, 32, _pred(row_ok[r]))
        if pair_rows:
            other = _shfl_bfly(bytes2[0] | (bytes2[1] << Uint32(16)), 4)  # lane c ^ 4: the other block
            for h in range(2):
                r = i + h
                two = bytes2[h] | (((other >> Uint32(16 * h)) & Uint32(0xFF)) << Uint32(8))
                _st("global", rsc + Int64(r) * (k_cols // 32), two, 16, _pred(row_ok[r] & pair_ok & (c == 0)))
                _st("global", rsc + Int64(r) * (k_cols // 32), bytes2[h], 8,
                    _pred(row_ok[r] & (~pair_ok) & ((c & 3) == 0)))
        elif p["stage_rows"]:  # to the CTA's staging area, [tile row][warp]: one store a row after
            for h in range(2):
                _st("shared", p["rs_buf"] + (Int32(g * rl + i + h) * p["warps"] + p["warp"]), bytes2[h], 8)
        else:
            for h in range(2):
                r = i + h
                _st("global", rsc + Int64(r) * (k_cols // 32), bytes2[h], 8, _pred(row_ok[r] & ((c & 3) == 0)))
    # column scales: the tile's 4 blocks of a column in one 4-byte store where they are one
    # group's consecutive blocks, 4-byte aligned (warp-uniform), else a byte a block
    bslot = Uint32(slot)
    grp0 = Int32(_shfl_idx(Uint32(grp), 0))
    quad_base = p["col_scale_addr"] + s_off + j - Int64(slot)  # block 0 of the tile, column 0
    quad_ok = Int32(_vote_all(_pred((valid > Int64(0)) & (grp == grp0) & (quad_base % 4 == Int64(0))
                                    & (s_stride % 4 == Int64(0))))) != 0
    # ---- columnwise MXFP8: 8 columns of the lane's rows (rl 16: half a block, the other half on lane ^ 4)
    for kw in range(4):
        cm = _hmax_tree([w[i][kw] for i in range(rl)])
        if rl == 16:
            cm = _hmax_abs(cm, _shfl_bfly(cm, 4))
        for h, a in enumerate(_amax_halves(cm)):
            col = col0 + (2 * kw + h)
            byte, inv, bad = _mxfp8_scale_bits(a)
            out = [_sel(bad, 0x7F7F7F7F, _mxfp8_word([w[4 * q + e][kw] for e in range(4)], "col", h, inv), Uint32)
                   for q in range(rl // 4)]
            vat = d_off + col * d_stride + j * 32
            ok = blk_ok & (vat >= Int64(0)) & (vat + 32 <= p["col_data_bytes"])
            at = p["col_data_addr"] + vat + local0
            for q in range(rl // 16):
                _st("global", at + 16 * q, out[4 * q:4 * q + 4], 32, _pred(ok))
            sat = s_off + col * s_stride + j
            sok = blk_ok & (sat >= Int64(0)) & (sat < p["col_scale_bytes"])
            if rl == 16:
                sok = sok & ((g % 2) == 0)
            _st("global", p["col_scale_addr"] + sat, byte, 8, _pred(sok & (~quad_ok)))
            quad = byte << (Uint32(8) * bslot)
            quad = quad | _shfl_bfly(quad, 8)  # lanes of the neighbouring block of this column
            quad = quad | _shfl_bfly(quad, 16)
            qok = quad_ok & (g == 0) & col_ok & (sat >= Int64(0)) & (sat + 4 <= p["col_scale_bytes"])
            _st("global", p["col_scale_addr"] + sat, quad, 32, _pred(qok))
    return first + local0, n_rows


def _fused2_flush_rows(p, first_row, n_rows, ct):
    """The CTA's staged row scales of the tile ([128 rows][warps] bytes): one store of `warps` bytes
    a row where K / 32 is a multiple of warps and the CTA's columns lie inside K, else a byte a
    block. A row's x row and validity come from the lanes of its 16 rows (g = row / 16)."""
    w = p["warps"]
    k_cols = p["k_cols"]
    blk0 = Int64(ct) * (p["cta_cols"] // 32)  # the CTA's first row block
    whole = ((k_cols // 32) % w == Int64(0)) & (Int64(ct) * p["cta_cols"] + p["cta_cols"] <= k_cols)
    fw = _split64(first_row)
    for q in range(FUSED_ROWS // (32 * w)):
        big = p["tid"] + 32 * w * q  # row of the tile
        src = (big >> 4) * 4
        first = _join64(_shfl_idx(fw[0], src), _shfl_idx(fw[1], src))
        ok = (big & 15) < Int32(_shfl_idx(Uint32(n_rows), src))
        at = p["row_scale_addr"] + (first + Int64(big & 15)) * (k_cols // 32) + blk0
        vals = [_ld("shared", p["rs_buf"] + big * w + b, bits=8)[0] for b in range(w)]
        packed = vals[0]
        for b in range(1, w):
            packed = packed | (vals[b] << Uint32(8 * b))
        _st("global", at, packed, 8 * w, _pred(ok & whole))  # w is 2 or 4
        for b in range(w):
            _st("global", at + b, vals[b], 8, _pred(ok & (~whole) & (Int64(ct) * p["cta_cols"] + 32 * b < k_cols)))


def _tile_rc(t, n_rt, n_ct, group_rows):
    """Tile t -> (row tile, column tile): bands of group_rows row tiles, row tile fastest within a
    band, bands one after another (1: column tile fastest; >= row tiles: row tile fastest). Tiles
    running at the same time then cover a block of rows x columns: long runs of x rows read and of
    transposed output rows written."""
    span = group_rows * n_ct
    band = t // span
    rem = t - band * span
    rows_in = cutlass.min(group_rows, n_rt - band * group_rows)
    return band * group_rows + rem % rows_in, rem // rows_in


@cute.kernel
def fused2_kernel(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, col_data_bytes: Int64, col_scale_bytes: Int64,
    group_rows: Int32, rl: cutlass.Constexpr, warps: cutlass.Constexpr, ld: cutlass.Constexpr,
    stage_rows: cutlass.Constexpr,
):
    lc = 8  # columns a lane
    cl = 32 // (FUSED_ROWS // rl)  # lanes across a warp's columns
    warp_cols = cl * lc
    cta_cols = warp_cols * warps
    tid = Int32(cute.arch.thread_idx()[0])
    n_rt, n_ct, total_blocks = _tile_counts(table, n_groups, k_cols, 32, FUSED_ROWS, cta_cols)
    n_rt32, n_ct32 = Int32(n_rt), Int32(n_ct)
    n_tiles = n_rt32 * n_ct32
    bid, _, _ = cute.arch.block_idx()
    nb, _, _ = cute.arch.grid_dim()
    b = Int32(bid)
    count = _sel(b < n_tiles, (n_tiles - b + Int32(nb) - 1) // Int32(nb), 0, Int32)
    p = dict(rl=rl, lc=lc, cl=cl, warp_cols=warp_cols, cta_cols=cta_cols, table=table, ld=ld,
             n_groups=n_groups, steps=steps, total_blocks=total_blocks, m_rows=m_rows, k_cols=k_cols,
             lane=tid % 32, warp=tid // 32, x_addr=x.iterator.toint(),
             row_data_addr=row_data.iterator.toint(), row_scale_addr=row_scale.iterator.toint(),
             col_data_addr=col_data.iterator.toint(), col_scale_addr=col_scale.iterator.toint(),
             col_data_bytes=col_data_bytes, col_scale_bytes=col_scale_bytes, tid=tid, warps=warps,
             stage_rows=stage_rows, rs_buf=Int32(0))
    if cutlass.const_expr(stage_rows):
        smem = cutlass.utils.SmemAllocator()
        rs = smem.allocate_tensor(Uint8, cute.make_layout(2 * FUSED_ROWS * warps), byte_alignment=16)
        rs0 = Int32(rs.iterator.toint())
        for it in cutlass.range(count, unroll=1):
            rt, ct = _tile_rc(b + it * Int32(nb), n_rt32, n_ct32, group_rows)
            # two staging buffers by tile parity: one barrier a tile
            pt = dict(p, rs_buf=rs0 + (it % 2) * (FUSED_ROWS * warps))
            first_row, n_rows = _fused2_tile(pt, rt, ct)
            cute.arch.sync_threads()
            _fused2_flush_rows(pt, first_row, n_rows, ct)
    else:
        for it in cutlass.range(count, unroll=1):
            rt, ct = _tile_rc(b + it * Int32(nb), n_rt32, n_ct32, group_rows)
            _fused2_tile(p, rt, ct)


@cute.jit
def fused2_mxfp8_host(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, col_data_bytes: Int64, col_scale_bytes: Int64,
    group_rows: Int32, grid_ctas: Int32, rl: cutlass.Constexpr, warps: cutlass.Constexpr, ld: cutlass.Constexpr,
    stage_rows: cutlass.Constexpr, stream,
):
    fused2_kernel(
        x, table, row_data, row_scale, col_data, col_scale, n_groups, steps, m_rows, k_cols, col_data_bytes,
        col_scale_bytes, group_rows, rl, warps, ld, stage_rows
    ).launch(grid=(grid_ctas, 1, 1), block=(32 * warps, 1, 1), smem=(2 * FUSED_ROWS * warps + 64) if stage_rows else 0,
             stream=stream)


# ---- NVFP4 from bf16: per-warp shared-memory tiles, rolled loops ---------------------------------
#
# Unrolling a whole tile as fused2_kernel does takes ~12k instructions for NVFP4, more than the
# instruction cache holds (an H200 then spent 74% of its stalls waiting for instruction fetch).
# Here each warp runs on its own (no CTA barriers) over tiles of 128 rows x 64 columns: lane
# (g, c) = (lane / 4, lane % 4) owns rows 16 g .. 16 g + 15 and columns 16 c .. 16 c + 15 of a
# tile, one padded block both ways, kept in a 512-byte slot of shared memory. Eight lanes cp.async
# a whole 128-byte row of the tile (_f3_issue), a __syncwarp makes them visible; ``stages`` 1:
# load, then quantize (12 one-warp CTAs an SM keep the loads in flight); 2: the next tile loads
# while this one is quantized (only 6 warps fit; slower). Chunk k (row
# k / 2, half k % 2) of a slot sits at (k & ~7) | ((k ^ lane) & 7): the lanes of a quarter-warp
# meet different banks for 16-byte accesses; the 4-byte column reads of a column's eight lanes
# meet 4-way conflicts, the price of 64-byte contiguous column stores. Rows (two a step) and
# column pairs are rolled loops (~2.1k instructions in all). Scale bytes go through two small
# staging areas: rowwise four bytes a row (one 4-byte store where K % 64 == 0), columnwise the
# tile's eight blocks of a column (one 8-byte store where the eight blocks are one group's, 8-byte
# aligned; else a byte a block, straight from the column pass).
# What limits it (ncu on an H100, 32768 x 7168): neither memory nor instructions alone. With
# L1-bypassing loads (cp.async.cg) every sector was its own L2 request and the L2 tag lookups the
# busiest unit (65%); through L1 a 128-byte row is one request (tags 47%): 0.428 -> 0.388 ms. Now
# the fabric between the two L2 partitions is the busiest unit (68%), issue 66%, ~2.9 warps a
# scheduler. Ablations in one run: without the E2M1 codec ~10% faster, then without the scale
# flush ~13% more, without either data stream ~15%: the scale bytes are 6% of the bytes written
# but 43% of the sectors (4 bytes a row, 8 a column a tile, each a partial sector). Yet fewer
# partial sectors did not pay: four-warp CTAs storing their neighbouring tiles' row scales as 16
# bytes a row (a CTA barrier a tile) were 2-4% slower. Nor did overlapping the loads: two 8 KB
# stages a warp of half-height tiles (two lanes a block, a shuffle for the column amax) gave the
# same bytes 6% slower (22% more instructions). Fewer instructions pay little: a codec without its
# clamp and sign bits (12% fewer, wrong bytes) was 2-5% faster; a branch-free division
# (reciprocal and one correction, 5% fewer) and loops unrolled by two were not faster. Also tried:
# the clamp done on bf16 pairs, fewer shared address computations, issuing the next tile before
# the flush, an L2 prefetch of the next tile (20% slower), the 128-byte L2 fetch hint, tile orders
# (group_rows 1 to 64), two full stages (6 warps an SM), and two warps a tile, one for its rows and
# one for its columns, meeting at a named barrier (24 warps an SM at 80 registers: 10% slower), so
# more warps to hide latency do not pay either.
F3_STAGE = 16384  # bytes of one stage of one warp (32 lanes x 16 rows x 32 bytes)


def _f3_warp_smem(stages: int) -> int:
    return stages * F3_STAGE + 512 + 512  # stages, row-scale and column-scale staging


def _f3_info(p, t):
    """Tile t's facts for this lane's block: column tile, group, table row, j, valid rows of the
    block, first x row, first column, real rows of the lane's piece (0 past K)."""
    rt, ct = _tile_rc(t, p["n_rt"], p["n_ct"], p["group_rows"])
    table = p["table"]
    grp, trow, j, valid = _find_block(table, Int64(rt) * 8 + Int64(p["g"]), p["n_groups"], p["steps"],
                                      p["total_blocks"], 16)
    first = table[trow + ROW_START] + j * 16
    col0 = Int64(ct) * 64 + Int64(p["c"] * 16)
    n_rows = Int32(cutlass.max(cutlass.min(cutlass.min(valid, p["m_rows"] - first), Int64(16)), Int64(0)))
    n_ok = _sel(col0 < p["k_cols"], n_rows, 0, Int32)
    return dict(ct=ct, grp=grp, trow=trow, j=j, valid=valid, first=first, col0=col0, n_rows=n_rows, n_ok=n_ok)


def _f3_dpos(k, lane7):
    """Slot of chunk k (run-time) in a lane's 32 chunks."""
    return (k & Int32(~7)) | ((k & Int32(7)) ^ lane7)


def _f3_issue(p, t, stage):
    """cp.async tile t into stage (zeros for rows not real and columns past K). Eight lanes load a
    whole 128-byte tile row an instruction, through L1 ("ca"): one L2 request a line, where
    L1-bypassing loads cost one a sector and left the L2 tag lookups the busiest unit. Instruction
    4 g + i loads rows 4 i .. 4 i + 3 of block g (its first row and size from lane 4 g)."""
    info = _f3_info(p, t)
    lane = p["lane"]
    chunk = lane & 7  # the 16-byte chunk of the row: chunk & 1 of lane chunk / 2's piece
    warp_col0 = Int64(info["ct"]) * 64
    chunk_ok = warp_col0 + Int64(chunk * 8) < p["k_cols"]
    first_w = _split64(info["first"])
    for g in range(8):
        first = _join64(_shfl_idx(first_w[0], g * 4), _shfl_idx(first_w[1], g * 4))
        n_rows = _sel(chunk_ok, Int32(_shfl_idx(Uint32(info["n_rows"]), g * 4)), 0, Int32)
        owner = g * 4 + (chunk >> 1)
        base = stage + owner * 512
        src0 = p["x_addr"] + (first * p["k_cols"] + warp_col0) * 2 + Int64(chunk * 16)
        for i in range(4):
            r = (lane >> 3) + 4 * i
            ok = r < n_rows
            src = _sel(ok, src0 + Int64(r) * p["row_pitch"], p["x_addr"], Int64)
            _cp_async16(base + _f3_dpos(2 * r + (chunk & 1), owner & 7) * 16, src, _sel(ok, 16, 0, Int32), "ca")


def _f3_row_words(p, base, r):
    return (_ld("shared", base + _f3_dpos(2 * r, p["lane7"]) * 16, 4)
            + _ld("shared", base + _f3_dpos(2 * r + 1, p["lane7"]) * 16, 4))


def _f3_col_words(p, base, h, wsel):
    return [_ld("shared", base + _f3_dpos(h + 2 * r, p["lane7"]) * 16 + wsel * 4, 1)[0] for r in range(16)]


def _f3_row_store(p, info, r, out):
    at = p["row_data_addr"] + (info["first"] + Int64(r)) * (p["k_cols"] // 2) + info["col0"] // 2
    _st("global", at, out, 32, _pred(r < info["n_ok"]))


def _f3_col_store(p, info, pl, cc, out):
    col = info["col0"] + Int64(cc)
    vat = pl["d_off"] + col * pl["d_stride"] + info["j"] * 8
    ok = pl["blk_ok"] & (vat >= Int64(0)) & (vat + 8 <= p["col_data_bytes"])
    _st("global", p["col_data_addr"] + vat, out, 32, _pred(ok))


def _f3_rows(p, info, base, s_grp, rp):
    """Rows 2 rp, 2 rp + 1 of the lane's piece: rowwise blocks, data to memory, scales to staging.
    Returns the fix-up bits of the two rows (bit r: r = inf)."""
    rows = [rp * 2, rp * 2 + 1]
    w = []
    s_rows = []
    for r in rows:
        w.append(_f3_row_words(p, base, r))
        ok = r < info["n_ok"]
        loaded = _ld("global", p["s_row_addr"] + (info["first"] + Int64(r)) * 4, pred=_pred(ok & p["per_row"]))[0]
        s_rows.append(_sel(p["per_row"], _f32(loaded), s_grp, Float32))
    m0, m1 = _hmax_tree(w[0]), _hmax_tree(w[1])
    mm = _hmax_abs(_prmt(m0, m1, 0x5410), _prmt(m0, m1, 0x7632))
    scales = _nvfp4_scales2(_amax_halves(mm), s_rows)
    fix = Uint32(0)
    for h in range(2):
        r = rows[h]
        d, rr, skip, need = scales[h]
        codes = _e2m1_bf16(w[h], "row", 0, rr)
        _f3_row_store(p, info, r, [_sel(skip, 0, cw, Uint32) for cw in codes])
        _st("shared", p["rs_stage"] + (p["g"] * 16 + r) * 4 + p["c"], d, 8)
        fix = fix | (_sel(need, 1, 0, Uint32) << Uint32(r))
    return fix


def _f3_cols(p, info, pl, base, s_grp, t2):
    """Column pair t2 of the lane's piece: two columnwise blocks (the 4-byte reads of the eight
    lanes of a column group meet the same banks: 4-way conflicts, for stores of 64 contiguous bytes
    a column). Returns their fix-up bits (bit 16 + column)."""
    h = t2 >> 2
    wsel = t2 & 3
    kw = t2
    words = _f3_col_words(p, base, h, wsel)
    cm = _hmax_tree(words)
    scales = _nvfp4_scales2(_amax_halves(cm), [s_grp, s_grp])
    fix = Uint32(0)
    for e in range(2):
        d, rr, skip, need = scales[e]
        cc = kw * 2 + e
        codes = _e2m1_bf16(words, "col", e, rr)
        _f3_col_store(p, info, pl, cc, [_sel(skip, 0, cw, Uint32) for cw in codes])
        col = info["col0"] + Int64(cc)
        sat = pl["s_off"] + col * pl["s_stride"] + info["j"]
        sok = pl["blk_ok"] & (sat >= Int64(0)) & (sat < p["col_scale_bytes"]) & (~pl["oct_ok"])
        _st("global", p["col_scale_addr"] + sat, d, 8, _pred(sok))
        _st("shared", p["cs_stage"] + (p["c"] * 16 + cc) * 8 + p["g"], d, 8)
        fix = fix | (_sel(need, 1, 0, Uint32) << Uint32(16 + cc))
    return fix


def _f3_flush(p, info, pl):
    """Staged scale bytes to memory: rowwise 4 bytes a row, columnwise 8 bytes a column."""
    k_cols = p["k_cols"]
    lane = p["lane"]
    quad = (k_cols % 64) == Int64(0)
    first_w = _split64(info["first"])
    row_col0 = Int64(info["ct"]) * 64
    for q in range(4):
        big = lane + 32 * q  # row of the tile
        src = (big >> 4) * 4  # a lane of the block holding it
        first = _join64(_shfl_idx(first_w[0], src), _shfl_idx(first_w[1], src))
        n_ok = Int32(_shfl_idx(Uint32(info["n_ok"]), src))
        ok = (big & 15) < n_ok
        word = _ld("shared", p["rs_stage"] + big * 4, 1)[0]
        at = p["row_scale_addr"] + (first + Int64(big & 15)) * (k_cols // 16) + row_col0 // 16
        _st("global", at, word, 32, _pred(ok & quad))
        for b in range(4):
            _st("global", at + b, word >> Uint32(8 * b), 8, _pred(ok & (~quad) & (row_col0 + 16 * b < k_cols)))
    j0 = info["j"] - Int64(p["g"])
    v = _ld("shared", p["cs_stage"] + lane * 16, 4)
    for e in range(2):
        col = row_col0 + Int64(lane * 2 + e)
        sat = pl["s_off"] + col * pl["s_stride"] + j0
        ok = pl["oct_ok"] & (col < k_cols) & (sat >= Int64(0)) & (sat + 8 <= p["col_scale_bytes"])
        _st("global", p["col_scale_addr"] + sat, v[2 * e:2 * e + 2], 32, _pred(ok))


@dsl_user_op
def _vote_any(pred, *, loc=None, ip=None) -> Int32:
    ptx = "{\n.reg .pred p;\nsetp.ne.b32 p, $1, 0;\nvote.sync.any.pred p, p, 0xffffffff;\nselp.b32 $0, 1, 0, p;\n}"
    return Int32(_words_asm(1, ptx, "=r,r", [Int32(pred).ir_value(loc=loc, ip=ip)], loc, ip)[0])


@cute.kernel
def fused3_kernel(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor, s_row: cute.Tensor, s_col: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, row_s_mode: Int32,
    col_data_bytes: Int64, col_scale_bytes: Int64, group_rows: Int32, warps: cutlass.Constexpr,
    stages: cutlass.Constexpr,
):
    tid = Int32(cute.arch.thread_idx()[0])
    lane = tid % 32
    warp = tid // 32
    warp_smem = _f3_warp_smem(stages)
    smem = cutlass.utils.SmemAllocator()
    buf = smem.allocate_tensor(Uint8, cute.make_layout(warps * warp_smem), byte_alignment=128)
    wbase = Int32(buf.iterator.toint()) + warp * warp_smem
    n_rt, n_ct, total_blocks = _tile_counts(table, n_groups, k_cols, 16, FUSED_ROWS, 64)
    n_tiles = Int32(n_rt * n_ct)
    bid, _, _ = cute.arch.block_idx()
    nb, _, _ = cute.arch.grid_dim()
    gw = Int32(bid) * warps + warp
    tw = Int32(nb) * warps
    count = _sel(gw < n_tiles, (n_tiles - gw + tw - 1) // tw, 0, Int32)
    p = dict(table=table, n_groups=n_groups, steps=steps, total_blocks=total_blocks, m_rows=m_rows,
             k_cols=k_cols, row_pitch=k_cols * 2, n_rt=Int32(n_rt), n_ct=Int32(n_ct), group_rows=group_rows,
             lane=lane, lane7=lane & 7, g=lane >> 2, c=lane & 3, x_addr=x.iterator.toint(),
             row_data_addr=row_data.iterator.toint(), row_scale_addr=row_scale.iterator.toint(),
             col_data_addr=col_data.iterator.toint(), col_scale_addr=col_scale.iterator.toint(),
             s_row_addr=s_row.iterator.toint(), per_row=row_s_mode != 0,
             col_data_bytes=col_data_bytes, col_scale_bytes=col_scale_bytes,
             rs_stage=wbase + stages * F3_STAGE, cs_stage=wbase + stages * F3_STAGE + 512)
    if cutlass.const_expr(stages == 2):
        if count > 0:
            _f3_issue(p, gw, wbase)
        cute.arch.cp_async_commit_group()
    for it in cutlass.range(count, unroll=1):
        t = gw + it * tw
        cur = wbase
        if cutlass.const_expr(stages == 2):
            cur = wbase + (it % 2) * F3_STAGE
            if it + 1 < count:
                _f3_issue(p, t + tw, wbase + ((it + 1) % 2) * F3_STAGE)
        else:
            _f3_issue(p, t, wbase)
        cute.arch.cp_async_commit_group()
        info = _f3_info(p, t)
        s_grp = s_col[info["grp"]]
        trow = info["trow"]
        s_off = table[trow + SCALE_OFFSET]
        s_stride = table[trow + SCALE_STRIDE]
        grp0 = Int32(_shfl_idx(Uint32(info["grp"]), 0))
        oct_ok = _vote_all(_pred((info["valid"] > Int64(0)) & (info["grp"] == grp0)
                                 & ((p["col_scale_addr"] + s_off + info["j"] - Int64(p["g"])) % 8 == Int64(0))
                                 & (s_stride % 8 == Int64(0)))) != 0
        pl = dict(d_off=table[trow + DATA_OFFSET], d_stride=table[trow + DATA_STRIDE], s_off=s_off,
                  s_stride=s_stride, blk_ok=(info["col0"] < k_cols) & (info["valid"] > Int64(0)), oct_ok=oct_ok)
        base = cur + lane * 512
        cute.arch.cp_async_wait_group(stages - 1)
        cute.arch.sync_warp()  # the piece of a lane was loaded by the four lanes of its block row
        fix = Uint32(0)
        for rp in cutlass.range(8, unroll=1):
            fix = fix | _f3_rows(p, info, base, s_grp, rp)
        for t2 in cutlass.range(8, unroll=1):
            fix = fix | _f3_cols(p, info, pl, base, s_grp, t2)
        # r = inf (S / d overflowed) with codes used: zero values must keep code 0 (rare: a group of
        # subnormals); those blocks again, from the staged input still here
        if _vote_any(_pred(fix != Uint32(0))) != 0:
            for fr in cutlass.range(16, unroll=1):
                if ((fix >> Uint32(fr)) & Uint32(1)) != Uint32(0):
                    _f3_row_store(p, info, fr, _e2m1_bf16(_f3_row_words(p, base, fr), "row", 0, Float32(0.0), True))
            for fc in cutlass.range(16, unroll=1):
                if ((fix >> Uint32(16 + fc)) & Uint32(1)) != Uint32(0):
                    fkw = fc >> 1
                    fwords = _f3_col_words(p, base, fkw >> 2, fkw & 3)
                    c0 = _e2m1_bf16(fwords, "col", 0, Float32(0.0), True)
                    c1 = _e2m1_bf16(fwords, "col", 1, Float32(0.0), True)
                    odd = (fc & 1) != 0
                    _f3_col_store(p, info, pl, fc, [_sel(odd, c1[i], c0[i], Uint32) for i in range(2)])
        cute.arch.sync_warp()
        _f3_flush(p, info, pl)
        cute.arch.sync_warp()


@cute.jit
def fused3_nvfp4_host(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor, s_row: cute.Tensor, s_col: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, row_s_mode: Int32,
    col_data_bytes: Int64, col_scale_bytes: Int64, group_rows: Int32, grid_ctas: Int32, warps: cutlass.Constexpr,
    stages: cutlass.Constexpr, stream,
):
    fused3_kernel(
        x, table, row_data, row_scale, col_data, col_scale, s_row, s_col, n_groups, steps, m_rows, k_cols,
        row_s_mode, col_data_bytes, col_scale_bytes, group_rows, warps, stages
    ).launch(grid=(grid_ctas, 1, 1), block=(32 * warps, 1, 1), smem=warps * _f3_warp_smem(stages), stream=stream)
