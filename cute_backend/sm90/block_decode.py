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

Why here and not an fp8 wgmma with the scales applied on CUDA cores: with
per-32 scales on both operands, promoting each k32 fp8 wgmma's result costs
two fp32 instructions per accumulator element (about 96 a thread for a 64 x 192
warpgroup tile against 96 clocks of MMA), which caps it below the bf16 rate,
while decoding costs about two instructions per operand element, which a
few warps hide behind the bf16 MMA. See docs/performance.md for measurements.
"""

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
