"""The block codec of every quantize kernel (device code): x -> E4M3 / E2M1 elements and their
E8M0 / E4M3 block scales, bit-exact with grouped.formats (the numerics: the package doc).

Every constant of the format comes from the kernel's FormatFacts. Blocks arrive in one of two
forms, each the other's bytes:
- fp32 bit patterns, one block a call (rowwise, columnwise, fused_rowcol): any fp32 input;
- packed bf16 pairs (the bf16 one-pass kernels): fewer instructions, using what bf16 input
  allows. Block amaxes by bf16x2 max; the E8M0 exponent of a finite amax by one add and shift;
  fp32(amax / 6) by a reciprocal and one correction step (checked against the correctly rounded
  quotient for every bf16 amax, subnormals included); values unpacked inside the E4M3 / E2M1 asm
  (by shifts rowwise, by byte permutes columnwise: an unpacked value the two directions shared
  would keep all 256 of a register tile live).
Both share the E2M1 rounding (``_e2m1_index_ptx``), the E4M3 conversions and the rule for
non-finite blocks (amax bits >= Inf: the NaN scale, NaN elements or zero codes).
"""

import functools

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint16, Uint32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from ..ptx import asm, asm_words, div_rn, f32, fp32_bits, fp32_hex, hmax_abs, max_u16x2, mul_rn, sel, u32

ABS_MASK = 0x7FFFFFFF
INF_BITS = 0x7F800000
TWO_POW_M127_BITS = 0x00400000  # the fp32 subnormal 2^-127


# ---- inputs and block amaxes -----------------------------------------------------------------


def to_bits(value, in_bits: int) -> Uint32:
    """A loaded raw element (Uint16 bf16 bits or Uint32 fp32 bits) -> fp32 bits (exact)."""
    if in_bits == 16:
        return Uint32(value) << Uint32(16)
    return Uint32(value)


def raw_view(x: cute.Tensor, in_bits: int) -> cute.Tensor:
    """x's elements as raw bits (Uint16 bf16 / Uint32 fp32)."""
    raw = Uint16 if in_bits == 16 else Uint32
    return cute.make_tensor(cute.recast_ptr(x.iterator, dtype=raw), x.layout)


def amax_bits(xb: cute.Tensor, n: int) -> Uint32:
    """max over |x| bit patterns: finite < Inf < NaN as unsigned ints; no NaN is dropped."""
    amax = Uint32(0)
    for i in range(n):
        amax = cutlass.max(amax, xb[i] & Uint32(ABS_MASK))
    return amax


def _block_amax(facts, xb: cute.Tensor, amax):
    """fp32 form: (block size, the block's amax bits unless the caller has them, non-finite block)."""
    n = facts.block_size
    if amax is None:
        amax = amax_bits(xb, n)
    return n, amax, amax >= Uint32(INF_BITS)


def packed_amax(words, first: int, count: int) -> Uint32:
    """max.u16x2 over |bf16 pairs| of words[first:first + count]: both halves' block amaxes at once."""
    m = Uint32(0)
    for i in range(first, first + count):
        m = max_u16x2(m, words[i] & Uint32(0x7FFF7FFF))
    return m


def hmax_tree(words):
    """max.NaN.abs over packed bf16 pairs, as a tree: both halves' amaxes (signs undefined)."""
    level = list(words)
    while len(level) > 1:
        nxt = [hmax_abs(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def amax_halves(m):
    """A packed pair of bf16 magnitudes (signs undefined) -> the two fp32 bit patterns, sign cleared."""
    return [(Uint32(m) << Uint32(16)) & Uint32(ABS_MASK), Uint32(m) & Uint32(0x7FFF0000)]


# ---- E4M3 ------------------------------------------------------------------------------------


@dsl_user_op
def e4m3x4(a, b, c, d, *, loc=None, ip=None) -> Uint32:
    """Four fp32 -> four E4M3 bytes (RNE, saturating to +-448, NaN kept), a in the lowest byte."""
    args = [Float32(v).ir_value(loc=loc, ip=ip) for v in (a, b, c, d)]
    ptx = (
        "{\n.reg .b16 lo, hi;\n"
        "cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"  # first source -> upper byte
        "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n"
        "mov.b32 $0, {lo, hi};\n}"
    )
    return Uint32(asm(T.i32(), ptx, "=r,f,f,f,f", args, loc, ip))


@dsl_user_op
def e4m3x2_lo16(a, b, *, loc=None, ip=None) -> Uint32:
    """Two fp32 -> E4M3 bytes (a in byte 0, b in byte 1), upper half zero."""
    args = [Float32(v).ir_value(loc=loc, ip=ip) for v in (a, b)]
    ptx = "{\n.reg .b16 lo;\ncvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\ncvt.u32.u16 $0, lo;\n}"
    return Uint32(asm(T.i32(), ptx, "=r,f,f", args, loc, ip))


@dsl_user_op
def e4m3x2_to_f32(pair, *, loc=None, ip=None):
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
    struct_type = llvm.StructType.get_literal([T.f32()] * 2)
    res = llvm.inline_asm(struct_type, [Uint32(pair).ir_value(loc=loc, ip=ip)], ptx, "=f,=f,r",
                          has_side_effects=False, is_align_stack=False, loc=loc, ip=ip)
    return [Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(2)]


# ---- E8M0 scales (MXFP8) ---------------------------------------------------------------------


def mxfp8_exponent(amax: Uint32, facts) -> Int32:
    """e = ceil(log2 fp32(amax * fp32(1 / e4m3_max))) clamped to [-127, 127], from t's bits."""
    t = u32(mul_rn(f32(amax), f32(fp32_bits(1.0 / facts.e4m3_max))))
    biased = Int32(t >> Uint32(23))
    normal = biased - 127 + sel((t & Uint32(0x7FFFFF)) != Uint32(0), 1, 0, Int32)
    small = sel(t > Uint32(TWO_POW_M127_BITS), -126, -127, Int32)  # t subnormal or zero
    return sel(biased == 0, small, cutlass.min(normal, Int32(127)), Int32)


def pow2_neg(e: Int32) -> Float32:
    """Exact fp32 2^-e for e in [-127, 127] (2^-127 is subnormal)."""
    normal = Uint32(127 - e) << Uint32(23)
    return f32(sel(e < 127, normal, TWO_POW_M127_BITS, Uint32))


def mxfp8_scale_bits(a: Uint32, facts):
    """bf16 form: a block's fp32 amax bits (sign clear) -> (E8M0 byte, fp32 2^-e, non-finite block).

    e + 127 from t = fp32(amax * fp32(1 / e4m3_max)) as (t + 0x7FFFFF) >> 23 (0 where t <= 2^-127),
    2^-e as the bits (254 - (e + 127)) << 23: a finite bf16 amax has e <= 120.
    """
    bad = a >= Uint32(INF_BITS)
    t = u32(mul_rn(f32(a), f32(fp32_bits(1.0 / facts.e4m3_max))))
    e = sel(t > Uint32(TWO_POW_M127_BITS), (t + Uint32(0x7FFFFF)) >> Uint32(23), 0, Uint32)
    inv = f32((Uint32(254) - e) << Uint32(23))
    return sel(bad, facts.nan_scale, e, Uint32), inv, bad


def nan_word(facts) -> int:
    """A word of four MXFP8 elements of a non-finite block."""
    return facts.nan_element * 0x01010101


@functools.lru_cache(maxsize=None)
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


@dsl_user_op
def mxfp8_word(words, layout: str, half: int, inv, *, loc=None, ip=None) -> Uint32:
    """bf16 form of four MXFP8 elements (see _mxfp8_word_ptx)."""
    args = [Uint32(w).ir_value(loc=loc, ip=ip) for w in words] + [Float32(inv).ir_value(loc=loc, ip=ip)]
    constraints = "=r," + ",".join(["r"] * len(words)) + ",f"
    return Uint32(asm(T.i32(), _mxfp8_word_ptx(layout, half), constraints, args, loc, ip))


def mxfp8_block(facts, xb: cute.Tensor, words: cute.Tensor, amax=None):
    """fp32 form: a block of fp32 bit patterns -> its words of E4M3 bytes; returns the E8M0 scale byte.

    ``amax``: the block's maximum |x| bit pattern, where the caller has it already.
    """
    n, amax, bad = _block_amax(facts, xb, amax)
    e = mxfp8_exponent(amax, facts)
    inv = pow2_neg(e)
    for w in range(n // 4):
        q = [mul_rn(f32(xb[4 * w + i]), inv) for i in range(4)]
        words[w] = sel(bad, nan_word(facts), e4m3x4(*q), Uint32)
    return sel(bad, facts.nan_scale, Uint32(e + 127), Uint32)


# ---- E2M1 elements and E4M3 scales (NVFP4) -----------------------------------------------------


def _e2m1_index_ptx(acc: str, i: int, e2m1_max: float) -> list[str]:
    """PTX: round the scaled magnitude in ``a`` (fp32, >= 0) to an E2M1 index (ties to even,
    saturating at e2m1_max) and add it as nibble ``i`` of the word ``acc``.

    The index is the smallest of rne(2a), rne(a) + 2 and rne(a / 2) + 4 (each the right one on
    its range, [0, 2), [2, 4) and [4, 6], and no smaller than it elsewhere), each read off the
    bits of a correctly rounded fp32 add onto 2^23 (so ties go to the even code; checked against
    the midpoint rule for every fp32); the minimum is taken on the bit patterns, all positive
    floats. Summing those bit patterns times 16^i lays a word's eight indices into their nibbles;
    2^23's own bits sum to 0xFB000000 over the eight, taken off by starting from 0x05000000.
    """
    return [
        f"min.f32 a, a, {fp32_hex(e2m1_max)};",
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


@functools.lru_cache(maxsize=None)
def _e2m1_fp32_ptx(e2m1_max: float) -> str:
    """PTX: 16 fp32 x ($2..$17) and r ($18) -> two words of the E2M1 nibbles of fp32(x * r) ($0, $1).

    a = fp32(|x| * r), its index by _e2m1_index_ptx, the sign (bit 3 of a nibble) x's sign bit.
    r = +inf (S / d overflowed) makes |0| * r NaN, which min turns into the largest code; then,
    and only then, zero elements get their index cleared: x = 0 encodes as itself.
    """
    lines = ["{", ".reg .f32 a, c1, c2, c3;", ".reg .b32 t, u, v, acc0, acc1;", ".reg .pred p, q;"]
    for e in range(16):
        x, acc, i = f"${e + 2}", f"acc{e // 8}", e % 8
        lines += [
            f"abs.f32 a, {x};",
            "mul.rn.f32 a, a, $18;",
            *_e2m1_index_ptx(acc, i, e2m1_max),
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


@functools.lru_cache(maxsize=None)
def _e2m1_bf16_ptx(layout: str, half: int, inf: bool, e2m1_max: float) -> str:
    """PTX: 16 bf16 values and r -> two words of E2M1 nibbles of fp32(x * r) ($0, $1).

    layout "row": 8 words $2..$9, value e in half e % 2 of word e // 2; "col": 16 words $2..$17,
    value e in half ``half`` of word e; then r. Magnitudes as _e2m1_fp32_ptx, without its r = inf
    fix: there zero values get the largest code here; ``inf`` gives the codes for r = inf instead
    (7 where x != 0, else 0), for a fix-up pass. Signs: byte permutes (sign-replicating
    selectors) gather each value's sign byte, two masks put the sign bits at bit 3 of their nibbles.
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
        lines += [f"mul.rn.f32 a, x, {r_arg};", *_e2m1_index_ptx(acc, i, e2m1_max)]
    for o in range(2):  # output word o: values 8o .. 8o + 7
        acc = f"acc{o}"
        if layout == "row":
            # sP = signs of values 8o..8o+3 (bytes), sQ = 8o+4..8o+7; then even / odd values
            lines += [f"prmt.b32 sP, ${2 + 4 * o}, ${3 + 4 * o}, 0xFDB9;",
                      f"prmt.b32 sQ, ${4 + 4 * o}, ${5 + 4 * o}, 0xFDB9;",
                      "prmt.b32 sE, sP, sQ, 0x6420;", "prmt.b32 sO, sP, sQ, 0x7531;"]
        else:
            rep_a, rep_b = 8 | (2 * half + 1), 8 | (4 + 2 * half + 1)
            selector = rep_a | (rep_b << 4) | (rep_a << 8) | (rep_b << 12)
            base = 2 + 8 * o
            for name, first in (("sE", 0), ("sO", 1)):  # values 8o + first, + 2, + 4, + 6
                lines += [f"prmt.b32 sP, ${base + first}, ${base + first + 2}, {selector};",
                          f"prmt.b32 sQ, ${base + first + 4}, ${base + first + 6}, {selector};",
                          f"prmt.b32 {name}, sP, sQ, 0x5410;"]
        lines += ["and.b32 sE, sE, 0x08080808;", "and.b32 sO, sO, 0x80808080;",
                  f"or.b32 {acc}, {acc}, sE;", f"or.b32 {acc}, {acc}, sO;"]
    lines += ["mov.b32 $0, acc0;", "mov.b32 $1, acc1;", "}"]
    return "\n".join(lines)


@dsl_user_op
def e2m1_fp32(facts, xs, r, *, loc=None, ip=None):
    """16 fp32 bit patterns and r = fp32(S / d) -> the two words of their E2M1 nibbles (first element
    lowest): each e2m1_rn_satfinite(fp32(x * r)) with x's sign; x = 0 encodes as itself even
    where r is +inf."""
    args = [f32(v).ir_value(loc=loc, ip=ip) for v in xs] + [Float32(r).ir_value(loc=loc, ip=ip)]
    return asm_words(2, _e2m1_fp32_ptx(facts.e2m1_max), "=r,=r," + ",".join(["f"] * 17), args, loc, ip,
                     side_effects=False)


@dsl_user_op
def e2m1_bf16(facts, words, layout: str, half: int, r, inf: bool = False, *, loc=None, ip=None):
    """bf16 form of 16 E2M1 codes (see _e2m1_bf16_ptx)."""
    args = [Uint32(w).ir_value(loc=loc, ip=ip) for w in words] + [Float32(r).ir_value(loc=loc, ip=ip)]
    constraints = "=r,=r," + ",".join(["r"] * len(words)) + ",f"
    return asm_words(2, _e2m1_bf16_ptx(layout, half, inf, facts.e2m1_max), constraints, args, loc, ip,
                     side_effects=False)


@dsl_user_op
def div_e2m1_max(facts, a, *, loc=None, ip=None) -> Float32:
    """bf16 form: fp32(a / e2m1_max) for a bf16 value a >= 0, one correction step on a * fp32(1 / e2m1_max)."""
    recip, neg = fp32_hex(1.0 / facts.e2m1_max), fp32_hex(-facts.e2m1_max)
    ptx = (
        "{\n.reg .f32 q, e;\n"
        f"mul.rn.f32 q, $1, {recip};\n"
        f"fma.rn.f32 e, q, {neg}, $1;\n"
        f"fma.rn.f32 $0, e, {recip}, q;\n}}"
    )
    return Float32(asm(T.f32(), ptx, "=f,f", [Float32(a).ir_value(loc=loc, ip=ip)], loc, ip))


def nvfp4_block(facts, xb: cute.Tensor, words: cute.Tensor, s: Float32, amax=None):
    """fp32 form: a block of fp32 bit patterns and the per-tensor S -> its words of E2M1 nibbles;
    returns the E4M3 scale byte d. A zero or NaN d gives zero codes."""
    n, amax, bad = _block_amax(facts, xb, amax)
    scaled_amax = mul_rn(div_rn(f32(amax), f32(fp32_bits(facts.e2m1_max))), s)
    zero = Float32(0.0)
    d = sel(bad, facts.nan_scale, e4m3x4(scaled_amax, zero, zero, zero) & Uint32(0xFF), Uint32)
    r = div_rn(s, e4m3x2_to_f32(d)[0])
    skip = bad | ((d & Uint32(0x7F)) == Uint32(0))  # d == 0 or NaN: zero codes
    codes = e2m1_fp32(facts, [xb[i] for i in range(n)], r)
    for w in range(n // 8):
        words[w] = sel(skip, 0, codes[w], Uint32)
    return d


def nvfp4_pair_scales(facts, a_bits, s_vals):
    """bf16 form, two blocks: fp32 amax bits (sign clear) and S of each -> [(E4M3 scale byte d,
    r = fp32(S / d), zero codes, r = inf with codes used)] for each."""
    bad = [a >= Uint32(INF_BITS) for a in a_bits]
    sa = [mul_rn(div_e2m1_max(facts, f32(a)), s) for a, s in zip(a_bits, s_vals)]
    pair = e4m3x2_lo16(sa[0], sa[1])
    d = [sel(bad[0], facts.nan_scale, pair & Uint32(0xFF), Uint32),
         sel(bad[1], facts.nan_scale, pair >> Uint32(8), Uint32)]
    dv = e4m3x2_to_f32(d[0] | (d[1] << Uint32(8)))
    out = []
    for h in range(2):
        r = div_rn(s_vals[h], dv[h])
        skip = bad[h] | ((d[h] & Uint32(0x7F)) == Uint32(0))
        fix = (~skip) & (u32(r) == Uint32(INF_BITS))  # codes of zero values to clear afterwards
        out.append((d[h], r, skip, fix))
    return out


def block(facts, xb, words, s):
    """fp32 form of one block of either format: its data words; returns its scale byte."""
    if facts.name == "mxfp8":
        return mxfp8_block(facts, xb, words)
    return nvfp4_block(facts, xb, words, s)
