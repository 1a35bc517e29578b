"""Block-scaled operands decoded to bf16 on their way to wgmma (device code).

Hopper's wgmma has no block-scale operand. An MXFP8 element times its E8M0
block scale, e4m3 x 2^e, is a number of at most 4 significant bits, exactly
representable in bf16 while it stays in bf16's range, so decoding both
operands to bf16 and running the bf16 wgmma reproduces the MXFP8 GEMM up to
accumulation order (fp32 accumulation, no rounding of operands). The decode
of four E4M3 bytes is, per pair of elements:

    prmt   [S1 b1 S0 b0] from the word (S: the byte's sign replicated)
    shl 4, and 0x87F087F0  -> bf16 bits s|0000eeee|mmm0000 = e4m3 x 2^-120
                              (e4m3 subnormals land on bf16 subnormals, exactly)
    mul.rn.bf16x2 by 2^(e + 120)   (a power of two: exact)

For e > 7 the factor 2^(e + 120) is past bf16's largest power of two, so it
is applied as 2^127 x 2^(e - 7): a second multiply, only for such blocks.
Exactness fails only for blocks whose scale is below 2^-124 (block amax under
~1e-35), whose E4M3 subnormals fall under bf16's smallest subnormal and round.
An E8M0 NaN scale (255) decodes every element of its block to NaN; a block
that is not there (past a group's or the tensor's end) to zero.

NVFP4: an E2M1 element times its E4M3 block scale d has at most 5 significant
bits, so it is exact in bf16 (the per-tensor scales S fold into the epilogue).
The eight magnitudes of E2M1 come from a byte table (two prmt lookups a four
elements: low and high bytes of their bf16 values, indexed by the codes'
three magnitude bits), the sign bits are moved into the high bytes (one prmt
and one lop3 a four elements), the bytes paired into bf16 words (prmt), and
each pair multiplied by d (mul.rn.bf16x2, exact). d itself is decoded like an
MXFP8 element (E4M3 bits -> bf16 x 2^-120, times 2^120); an E4M3 NaN scale
decodes its block to NaN.

Why here and not an fp8 wgmma with the scales applied on CUDA cores: with
per-32 scales on both operands, promoting each k32 fp8 wgmma's result costs
two fp32 instructions per accumulator element (about 96 a thread for a 64 x 192
warpgroup tile against 96 clocks of MMA), which caps it below the bf16 rate,
while decoding costs about two instructions per operand element, which a
few warps hide behind the bf16 MMA. docs/performance.md has the estimate;
it has not yet been measured on a GPU.
"""

import struct

import cutlass
from cutlass import Boolean, Int32, Uint32

from ..ptx import mul_bf16x2, prmt, sel

BF16X2_NAN = 0x7FC07FC0
BF16_EXPONENT_SHIFT = 7
E4M3_TO_BF16_BIAS = 120  # bf16 bits s|eeee|mmm -> value e4m3 x 2^-120
BF16_MAX_EXPONENT_FIELD = 254  # 2^127
PAIR = 0x00010001  # a 16-bit value in both halves of a word


def e8m0_factors(scale_byte, present, nan_scale: int) -> tuple[Uint32, Uint32, Boolean]:
    """(first factor, second factor, whether the second applies) as bf16x2 words for a block with
    E8M0 ``scale_byte`` (0..255; ``nan_scale`` marks a NaN block); a block that is not ``present``
    gets zero."""
    s = Int32(scale_byte)
    first = Uint32(cutlass.min(s + E4M3_TO_BF16_BIAS, BF16_MAX_EXPONENT_FIELD) << BF16_EXPONENT_SHIFT) * Uint32(PAIR)
    first = sel(s == nan_scale, BF16X2_NAN, first, Uint32)
    first = sel(present, first, 0, Uint32)
    # 2^(e + 120) = 2^127 * 2^(e - 7): field (e - 7) + 127 = s - 7
    second = Uint32((s - 7) << BF16_EXPONENT_SHIFT) * Uint32(PAIR)
    twice = Boolean(present) & (s > BF16_MAX_EXPONENT_FIELD - E4M3_TO_BF16_BIAS) & (s != nan_scale)
    return first, second, twice


def decode_e4m3x4(word: Uint32, factor: Uint32) -> tuple[Uint32, Uint32]:
    """Four E4M3 bytes (first in the low byte) times ``factor`` -> two bf16x2 words (elements 0-1, 2-3)."""
    pairs = []
    for selector in (0x9180, 0xB3A2):
        bits = (prmt(word, Uint32(0), selector) << Uint32(4)) & Uint32(0x87F087F0)
        pairs.append(mul_bf16x2(bits, factor))
    return pairs[0], pairs[1]


# ---- NVFP4 -----------------------------------------------------------------------------------

E4M3_UNBIAS = 0x7B807B80  # bf16x2 2^120: bf16 bits s|eeee|mmm (e4m3 x 2^-120) -> the E4M3 value
MAGNITUDE_BITS = 0x77777777  # the three magnitude bits of every E2M1 code of a word
SIGN_BITS = 0x80808080  # bit 7 of every byte


def e2m1_tables(values: tuple[float, ...]) -> tuple[int, int, int, int]:
    """(low bytes 0-3, low bytes 4-7, high bytes 0-3, high bytes 4-7) of the bf16 bit patterns of the
    eight E2M1 magnitudes, as prmt's two-register byte tables (every value is exact in bf16)."""
    patterns = [struct.unpack("<I", struct.pack("<f", v))[0] >> 16 for v in values]
    low = [p & 0xFF for p in patterns]
    high = [p >> 8 for p in patterns]
    word = lambda bs: bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24  # noqa: E731
    return word(low[:4]), word(low[4:]), word(high[:4]), word(high[4:])


def e4m3_factor(scale_byte, present, nan_scale: int) -> Uint32:
    """An NVFP4 block's E4M3 scale d in both bf16 halves (exact), NaN for the NaN scale byte, zero for a
    block that is not ``present``."""
    bits = (prmt(Uint32(scale_byte), Uint32(0), 0x8080) << Uint32(4)) & Uint32(0x87F087F0)
    factor = mul_bf16x2(bits, Uint32(E4M3_UNBIAS))
    factor = sel((Uint32(scale_byte) & Uint32(0x7F)) == Uint32(nan_scale & 0x7F), BF16X2_NAN, factor, Uint32)
    return sel(present, factor, 0, Uint32)


def decode_e2m1x8(word: Uint32, factor: Uint32, tables) -> list[Uint32]:
    """Eight E2M1 codes (the first in the low nibble) times ``factor`` -> four bf16x2 words."""
    low_a, low_b, high_a, high_b = (Uint32(t) for t in tables)
    magnitudes = word & Uint32(MAGNITUDE_BITS)
    shifted = word << Uint32(4)  # code i's sign bit at bit 7 of byte i // 2 for even i, of word for odd i
    out = []
    for half in range(2):  # codes 0-3, then 4-7
        index = magnitudes >> Uint32(16 * half)  # prmt reads the low four nibbles as byte indices
        low = prmt(low_a, low_b, index)
        high = prmt(high_a, high_b, index)
        # bit 7 of byte i: the sign of code 4 half + i (even codes from `shifted`, odd ones from `word`)
        signs = prmt(shifted, word, 0x5140 + 0x2222 * half)
        high = high | (signs & Uint32(SIGN_BITS))
        out.append(mul_bf16x2(prmt(low, high, 0x5140), factor))  # codes 4 half + 0, 1
        out.append(mul_bf16x2(prmt(low, high, 0x7362), factor))  # codes 4 half + 2, 3
    return out
