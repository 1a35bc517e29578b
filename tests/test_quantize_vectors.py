"""Bit-exact, hand-derived test vectors for grouped.quantize (MXFP8 and NVFP4).

Every expected byte below is worked out by hand from docs/design.md "Numerics" (and the
NaN/Inf policy decided for the quantizers); the derivation sits next to each value.
Nothing here re-implements the quantizer.

Reference facts used throughout
-------------------------------
E4M3 (float8_e4m3fn) byte = s<<7 | E<<3 | M, value = 2^(E-7) * (1 + M/8) for E >= 1,
2^-6 * M/8 for E = 0 (subnormals, step 2^-9); 0x7E = 448 (max), 0x7F = NaN.
Spacing: [8,16) -> 1, [16,32) -> 2, [128,256) -> 16, [256,448] -> 32.
Some bytes: 448=0x7E 416=0x7D 384=0x7C 256=0x78 240=0x77 224=0x76 128=0x70
96=0x6C 64=0x68 20=0x5A 18=0x59 16=0x58 8=0x50 2=0x40 1.5=0x3C 1.125=0x39
1=0x38 0.5=0x30 0.125=0x20 1.125*2^-6=0x09 2^-6=0x08 2^-8=0x02 2^-9=0x01;
negative = positive | 0x80.

fp32(1/448) is inexact: 1/448 = (8/7) * 2^-9 and 8/7 = 1.001001001...b, the 23-bit
mantissa rounds UP, so c := fp32(1/448) = (1/448) * (1 + 3*2^-26).  Hence for
amax = 448 * 2^k, amax * c = 2^k * (1 + 3*2^-26), and 3*2^-26 is below half an ulp
of 1.0 (2^-24), so t = fp32(amax * c) = 2^k exactly and e = k.

E2M1 code index 0..7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6; nibble = sign*8 + index; two per
byte, first element in the LOW nibble.
"""

import pytest
import torch

import grouped

F32 = torch.float32
U8 = torch.uint8
E4M3 = torch.float8_e4m3fn
FMAX = torch.finfo(torch.float32).max
NAN = float("nan")
INF = float("inf")


# --------------------------------------------------------------------------- helpers


def t32(rows):
    return torch.tensor(rows, dtype=F32)


def pad(values, n):
    """Pad a python list with zeros up to length n."""
    assert len(values) <= n
    return list(values) + [0.0] * (n - len(values))


def as_bytes(t):
    return t.view(U8) if t.dtype != U8 else t


def assert_bytes(actual, expected):
    got = as_bytes(actual)
    want = torch.tensor(expected, dtype=U8)
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    if not torch.equal(got, want):
        diff = (got != want).nonzero().tolist()[:8]
        details = [(i, hex(got[tuple(i)].item()), hex(want[tuple(i)].item())) for i in diff]
        raise AssertionError(f"byte mismatch (index, got, want): {details}")


def assert_exact(actual, expected):
    want = expected if isinstance(expected, torch.Tensor) else t32(expected)
    assert actual.dtype == F32, actual.dtype
    assert actual.shape == want.shape, (tuple(actual.shape), tuple(want.shape))
    torch.testing.assert_close(actual, want, rtol=0, atol=0, equal_nan=True)


def nibbles(packed):
    """Unpack NVFP4 bytes: element 2i is the low nibble of byte i, 2i+1 the high."""
    b = as_bytes(packed).to(torch.int16)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*b.shape[:-1], -1)


def assert_codes(packed, expected):
    """Compare E2M1 nibbles. An expected 8 (-0: a negative value that rounds to zero)
    accepts 0 or 8, both dequantize to zero. Every other nibble must match exactly."""
    got = nibbles(packed)
    want = torch.tensor(expected, dtype=torch.int16)
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    ok = (got == want) | ((want == 8) & (got == 0))
    if not bool(ok.all()):
        bad = (~ok).nonzero().tolist()[:8]
        details = [(i, got[tuple(i)].item(), want[tuple(i)].item()) for i in bad]
        raise AssertionError(f"E2M1 nibble mismatch (index, got, want): {details}")


def assert_global_scale(gs, expected):
    want = torch.tensor(expected, dtype=F32)
    assert isinstance(gs, torch.Tensor)
    assert gs.dtype == F32, gs.dtype
    assert gs.shape == want.shape, (tuple(gs.shape), tuple(want.shape))
    torch.testing.assert_close(gs, want, rtol=0, atol=0)


# =========================================================================== MXFP8


def test_mxfp8_dtypes_and_rowwise_shapes():
    x = t32([pad([1.0, -2.0], 64), pad([448.0], 64)])
    x_before = x.clone()
    q = grouped.quantize(x, "mxfp8")
    assert q.data.dtype == E4M3
    assert q.scale.dtype == U8
    assert q.global_scale is None
    assert tuple(q.data.shape) == (2, 64)
    assert tuple(q.scale.shape) == (2, 2)
    # row 0 block 0: amax 2 -> t = 2*c = 0.571 * 2^-7, log2 t = -7.8 -> e = -7 (byte 120);
    # elements x * 2^7: 1 -> 128 (0x70), -2 -> -256 (0xF8). Block 1 zero -> byte 0.
    # row 1 block 0: amax 448 -> e = 0 (byte 127), 448 -> 0x7E.
    assert_bytes(q.scale, [[120, 0], [127, 0]])
    assert_bytes(q.data[0, :2], [0x70, 0xF8])
    assert_bytes(q.data[1, :1], [0x7E])
    assert_exact(q.dequantize(), x)
    assert torch.equal(x, x_before), "quantize must not modify its input"


# (block values, expected scale byte, expected element bytes, expected dequant or None)
_MX_EDGES = [
    # amax 448: t = fp32(448*c) = 1.0 exactly (header) -> e = 0 -> byte 127; 448 -> 0x7E
    ([448.0], 127, [0x7E], [448.0]),
    # next fp32 after 448 (448 + 2^-15): 448*c*(1 + 2^-15/448) = 1 + ~7.6*2^-26 -> rounds
    # to 1 + 2^-23 > 1 -> e = 1 -> byte 128; element 224.0000153 -> 224 = 0x76
    ([448.0 + 2.0**-15], 128, [0x76], [448.0]),
    # 448*(1 + 2^-10) = 448.4375: t = 1.0009765625 -> e = 1; 224.21875 -> 224 (0x76)
    ([448.4375], 128, [0x76], [448.0]),
    # previous fp32 before 448 (448 - 2^-15): t rounds to exactly 1.0 -> e = 0 (127);
    # the element 447.99997 rounds up to 448 (0x7E), not past it
    ([448.0 - 2.0**-15], 127, [0x7E], [448.0]),
    # 224 = 448 * 2^-1: t = 0.5 exactly -> e = -1 (byte 126); 224 * 2 = 448 -> 0x7E
    ([224.0], 126, [0x7E], [224.0]),
    # next fp32 after 224 (224 + 2^-16): t = 0.5 + 2^-24 -> e = 0 (127); 224.0000153 -> 0x76
    ([224.0 + 2.0**-16], 127, [0x76], [224.0]),
    # amax 1: t = c = 0.0022321 = 0.571 * 2^-8 -> log2 t = -8.807 -> e = -8 -> byte 119;
    # elements x * 256: 1 -> 256 (0x78), 0.0625 -> 16 (0x58), -0.5 -> -128 (0xF0)
    ([1.0, 0.0625, -0.5], 119, [0x78, 0x58, 0xF0], [1.0, 0.0625, -0.5]),
    # 896 = 448 * 2: t = 2 exactly -> e = 1 (128); 896/2 = 448 -> 0x7E
    ([896.0], 128, [0x7E], [896.0]),
    # 2^127: t = 2^127 * c = 0.571 * 2^119 -> e = 119 -> byte 246; 2^127/2^119 = 256 -> 0x78
    ([2.0**127], 246, [0x78], [2.0**127]),
    # largest fp32 (2 - 2^-23) * 2^127: t = 0.571 * 2^121 -> e = 120 -> byte 247;
    # element 256 - 2^-16 -> 256 (0x78). Dequant 256 * 2^120 = 2^128 is not an fp32 value
    # (overflows), so it is not checked here.
    ([FMAX], 247, [0x78], None),
    # 2^-118: t = 0.571 * 2^-126 is an fp32 SUBNORMAL, log2 t = -126.8 -> e = -126 -> byte 1;
    # element 2^-118 * 2^126 = 256 (0x78)
    ([2.0**-118], 1, [0x78], [2.0**-118]),
    # 2^-119: t = 0.571 * 2^-127 (subnormal) -> e = -127 exactly, byte 0; element 2^8 -> 0x78
    ([2.0**-119], 0, [0x78], [2.0**-119]),
    # 2^-120: log2 t = -128.8 -> e = -128 -> clamped to -127 (byte 0); 2^-120 * 2^127 = 128
    ([2.0**-120], 0, [0x70], [2.0**-120]),
    # 2^-130: t ~ 2^-138.8 (subnormal, nonzero) -> clamp -127 (byte 0); 2^-3 = 0.125 -> 0x20
    ([2.0**-130], 0, [0x20], [2.0**-130]),
    # 1e-40 (fp32 subnormal, stored as 71362 * 2^-149): t = 2.2e-43 (nonzero subnormal),
    # log2 t = -141.x -> clamp -127 (byte 0); element 71362 * 2^-22 = 2^-6 * 1.0889 ->
    # E4M3 step 2^-9 in [2^-6, 2^-5): mantissa 0.711 -> 1 -> 1.125 * 2^-6 = 0x09;
    # dequant 1.125 * 2^-6 * 2^-127 = 1.125 * 2^-133
    ([1e-40], 0, [0x09], [1.125 * 2.0**-133]),
    # 2^-149 (smallest subnormal): t = 2^-149 * c underflows to 0 -> byte 0; element
    # 2^-149 * 2^127 = 2^-22, far below half the smallest E4M3 subnormal (2^-10) -> 0
    ([2.0**-149], 0, [0x00], [0.0]),
    # all-zero block: t = 0 -> byte 0, elements 0, dequant 0
    ([0.0], 0, [0x00], [0.0]),
]


def test_mxfp8_scale_exponent_edges():
    x = t32([pad(v, 32) for v, _, _, _ in _MX_EDGES])
    q = grouped.quantize(x, "mxfp8")
    assert tuple(q.scale.shape) == (len(_MX_EDGES), 1)
    assert_bytes(q.scale, [[s] for _, s, _, _ in _MX_EDGES])
    assert_bytes(q.data, [pad(b, 32) for _, _, b, _ in _MX_EDGES])
    deq = q.dequantize()
    assert deq.shape == x.shape
    for row, (_, _, _, want) in enumerate(_MX_EDGES):
        if want is not None:
            assert_exact(deq[row], pad(want, 32))


def test_mxfp8_e4m3_round_to_nearest_even_and_saturation_edge():
    # Block amax 448 -> e = 0 (byte 127), so the elements are plain E4M3 roundings of x.
    # Note: with the ceil scale rule no scaled element can exceed 448 (t >= amax/448 up to
    # one rounding that cannot cross a power of two, see the 448 +- ulp edge rows), so
    # the saturation edge is exercised by values that round UP TO 448: 432, 440, 448-ulp.
    vals_bytes_deq = [
        (448.0, 0x7E, 448.0),
        (17.0, 0x58, 16.0),  # [16,32) step 2: tie 16 (M=0) / 18 (M=1) -> 16, even
        (19.0, 0x5A, 20.0),  # tie 18 (M=1) / 20 (M=2) -> 20, even
        (17.5, 0x59, 18.0),  # not a tie: nearer 18
        (-17.0, 0xD8, -16.0),  # sign-symmetric tie -> -16
        (-19.0, 0xDA, -20.0),
        (432.0, 0x7E, 448.0),  # [256,448] step 32: tie 416 (M=5) / 448 (M=6) -> 448
        (440.0, 0x7E, 448.0),  # nearer 448
        (448.0 - 2.0**-15, 0x7E, 448.0),  # rounds up to 448 exactly, not past it
        (400.0, 0x7C, 384.0),  # tie 384 (M=4) / 416 (M=5) -> 384
        (240.0, 0x77, 240.0),  # exact, M=7
        (232.0, 0x76, 224.0),  # [128,256) step 16: tie 224 (M=6) / 240 (M=7) -> 224
        (248.0, 0x78, 256.0),  # tie 240 (M=7) / 256 (next binade, M=0) -> 256
        (8.5, 0x50, 8.0),  # [8,16) step 1: tie 8 / 9 -> 8
        (3 * 2.0**-10, 0x02, 2.0**-8),  # subnormal step 2^-9: tie 1 / 2 steps -> 2 (even)
        (2.0**-10, 0x00, 0.0),  # tie 0 / 2^-9 -> 0 (even)
        (0.75 * 2.0**-9, 0x01, 2.0**-9),  # nearer 2^-9
        (15 * 2.0**-10, 0x08, 2.0**-6),  # tie 7*2^-9 (0x07) / 2^-6 (0x08) -> 0x08 (even)
        (-448.0, 0xFE, -448.0),
        (1.0, 0x38, 1.0),
    ]
    x = t32([pad([v for v, _, _ in vals_bytes_deq], 32)])
    q = grouped.quantize(x, "mxfp8")
    assert_bytes(q.scale, [[127]])
    assert_bytes(q.data, [pad([b for _, b, _ in vals_bytes_deq], 32)])
    assert_exact(q.dequantize(), [pad([d for _, _, d in vals_bytes_deq], 32)])


def test_mxfp8_blocks_spanning_2pow_pm40_odd_rows():
    x = t32(
        [
            # block 0 amax 2^40: t = 0.571 * 2^32 -> e = 32 -> byte 159; elements / 2^32:
            #   2^40 -> 256 (0x78), 3*2^37 -> 96 (0x6C), -2^33 -> -2 (0xC0)
            # block 1 amax 2^-40: t = 0.571 * 2^-48 -> e = -48 -> byte 79; elements * 2^48:
            #   2^-40 -> 256 (0x78), -1.5*2^-42 -> -96 (0xEC), 2^-45 -> 8 (0x50)
            pad([2.0**40, 3 * 2.0**37, -(2.0**33)], 32) + pad([2.0**-40, -1.5 * 2.0**-42, 2.0**-45], 32),
            # block 0 amax 1 -> e = -8 (byte 119): 1 -> 256 (0x78), 0.0625 -> 16 (0x58),
            # -0.5 -> -128 (0xF0); block 1 all zero -> byte 0
            pad([1.0, 0.0625, -0.5], 32) + pad([], 32),
            # block 0 zero -> byte 0; block 1 amax 448 -> e = 0 (127): 448 -> 0x7E,
            # -17 -> tie -> -16 (0xD8)
            pad([], 32) + pad([448.0, -17.0], 32),
        ]
    )
    q = grouped.quantize(x, "mxfp8", axis=-1)
    assert tuple(q.data.shape) == (3, 64)
    assert tuple(q.scale.shape) == (3, 2)
    assert_bytes(q.scale, [[159, 79], [119, 0], [0, 127]])
    assert_bytes(
        q.data,
        [
            pad([0x78, 0x6C, 0xC0], 32) + pad([0x78, 0xEC, 0x50], 32),
            pad([0x78, 0x58, 0xF0], 32) + pad([], 32),
            pad([], 32) + pad([0x7E, 0xD8], 32),
        ],
    )
    want = x.clone()
    want[2, 33] = -16.0  # the only inexact element
    assert_exact(q.dequantize(), want)


def test_mxfp8_columnwise_is_transposed():
    # x (64, 32), axis=0: blocks of 32 rows per column; data stored transposed (32, 64).
    # Column j holds integers in [-16, 16] (exact in E4M3) times 2^(j-16), and each of its
    # two 32-row blocks contains +-448 * 2^(j-16) -> block amax 448 * 2^(j-16) -> t =
    # 2^(j-16) exactly (header) -> e = j - 16 -> byte 111 + j; element = x / 2^(j-16) exact.
    g = torch.Generator().manual_seed(1234)
    ints = torch.randint(-16, 17, (64, 32), generator=g).to(F32)
    col_scale = 2.0 ** (torch.arange(32, dtype=F32) - 16)
    for j in range(32):
        ints[(7 * j) % 32, j] = 448.0
        ints[32 + (5 * j + 3) % 32, j] = -448.0
    x = ints * col_scale
    q = grouped.quantize(x, "mxfp8", axis=0)
    assert tuple(q.data.shape) == (32, 64)
    assert tuple(q.scale.shape) == (32, 2)
    assert_bytes(q.scale, [[111 + j, 111 + j] for j in range(32)])
    # q.data[j, i] is the quantized x[i, j]
    assert torch.equal(q.data.to(F32), ints.T.contiguous())
    assert_exact(q.dequantize(), x)
    # and it matches the rowwise quantization of x^T, byte for byte
    qt = grouped.quantize(x.T.contiguous(), "mxfp8", axis=-1)
    assert torch.equal(as_bytes(q.data), as_bytes(qt.data))
    assert torch.equal(as_bytes(q.scale), as_bytes(qt.scale))


def test_mxfp8_columnwise_split_sizes_padding_and_empty_group():
    # x (36, 2), split_sizes [3, 0, 33], axis=0: group 0 = rows 0..2 (one block, padded
    # 3 -> 32), group 1 empty (no blocks), group 2 = rows 3..35 (33 rows -> two blocks:
    # rows 3..34 and row 35 + 31 pad). P = 32 + 0 + 64 = 96: data (2, 96), scale (2, 3).
    x = torch.zeros(36, 2, dtype=F32)
    x[0:3, 0] = t32([1.0, -0.5, 0.25])  # amax 1 -> e=-8 (119): 256, -128, 64
    x[0:3, 1] = t32([448.0, 17.0, -19.0])  # amax 448 -> e=0 (127): 448, 16, -20 (ties)
    x[3, 0] = 896.0  # rows 3..34 col 0: amax 896 -> e=1 (128): 448 (0x7E)
    x[4, 0] = 3.0  # 3/2 = 1.5 -> 0x3C
    # rows 3..34 col 1 all zero -> byte 0
    x[35, 0] = 2.0**-130  # e clamped -127 (byte 0); 2^-3 -> 0x20
    x[35, 1] = -1.0  # e=-8 (119); -256 -> 0xF8
    q = grouped.quantize(x, "mxfp8", axis=0, split_sizes=[3, 0, 33])
    assert tuple(q.data.shape) == (2, 96)
    assert tuple(q.scale.shape) == (2, 3)
    assert_bytes(q.scale, [[119, 128, 0], [127, 0, 119]])
    want = torch.zeros(2, 96, dtype=U8)  # padding must be zero bytes
    want[0, 0:3] = torch.tensor([0x78, 0xF0, 0x68], dtype=U8)
    want[1, 0:3] = torch.tensor([0x7E, 0x58, 0xDA], dtype=U8)
    want[0, 32] = 0x7E
    want[0, 33] = 0x3C
    want[0, 64] = 0x20
    want[1, 64] = 0xF8
    assert_bytes(q.data, want.tolist())
    deq_want = x.clone()
    deq_want[1, 1] = 16.0
    deq_want[2, 1] = -20.0
    assert_exact(q.dequantize(), deq_want)


def test_mxfp8_nan_inf_blocks():
    # Policy: a block with any NaN/+-Inf -> scale 0xFF, all element bytes 0x7F, dequant
    # NaN for the whole block; other blocks unaffected.
    x = t32(
        [
            pad([1.0, 2.0, 3.0, 4.0, 5.0, NAN], 32) + pad([448.0, 17.0], 32),
            pad([INF, 1.0], 32) + pad([-INF, 0.5], 32),
        ]
    )
    q = grouped.quantize(x, "mxfp8")
    assert_bytes(q.scale, [[0xFF, 127], [0xFF, 0xFF]])
    assert_bytes(
        q.data,
        [[0x7F] * 32 + pad([0x7E, 0x58], 32), [0x7F] * 64],
    )
    deq = q.dequantize()
    assert deq.dtype == F32 and deq.shape == x.shape
    assert bool(torch.isnan(deq[0, :32]).all())
    assert bool(torch.isnan(deq[1]).all())
    assert_exact(deq[0, 32:], pad([448.0, 16.0], 32))


def test_mxfp8_bad_inputs():
    with pytest.raises(ValueError):
        grouped.quantize(torch.ones(2, 33), "mxfp8")  # 33 not a multiple of 32
    with pytest.raises(ValueError):
        grouped.quantize(torch.ones(2, 48), "mxfp8", axis=-1)
    with pytest.raises(ValueError):
        grouped.quantize(torch.ones(3, 32), "mxfp8", axis=0)  # M = 3, no split_sizes
    with pytest.raises(ValueError):
        grouped.quantize(torch.ones(33, 4), "mxfp8", axis=0)


# =========================================================================== NVFP4


def test_nvfp4_dtypes_and_rowwise_shapes():
    x = t32([pad([6.0, 0.5], 32), pad([], 32), pad([-3.0], 32)])
    q = grouped.quantize(x, "nvfp4")
    assert q.data.dtype == U8
    assert q.scale.dtype == E4M3
    assert tuple(q.data.shape) == (3, 16)  # 32 elements -> 16 bytes
    assert tuple(q.scale.shape) == (3, 2)  # 32 / 16 blocks
    # tensor amax 6 -> S = fp32(2688/6) = 448 exactly
    assert_global_scale(q.global_scale, 448.0)
    dq = q.dequantize()
    assert dq.dtype == F32 and dq.shape == x.shape


def test_nvfp4_unit_global_scale_ties_saturation_and_block_scale_rounding():
    x = t32(
        [
            # block (0,0): amax 2688 -> d = e4m3(2688/6 * 1) = 448 (0x7E); S/d = c = fp32(1/448)
            #   2688*c = 6(1+3*2^-26) -> 6+2^-21 -> saturates to 6 -> code 7
            #   1120*c = 2.5 + 7.5*2^-26 -> rounds to fp32 2.5 (half ulp 8*2^-26) -> tie -> 2 (4)
            #   2240*c = 5 + 15*2^-26 -> fp32 5.0 (half ulp 16*2^-26) -> tie -> 4 (code 6)
            #   -448*c = -1 -> code 10;  112*c = 0.25 -> tie -> 0 (code 0)
            #   336*c = 0.75 + tiny -> 1 (code 2)
            pad([2688.0, 1120.0, 2240.0, -448.0, 112.0, 336.0], 16)
            # block (0,1): amax 6 -> d = e4m3(1.0) = 1.0 (0x38), S/d = 1: plain E2M1 rounding
            + [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.5, 3.0, -0.75, -5.0, -6.0, -0.1, 4.0],
            # block (1,0): amax 6.375 -> fp32(6.375/6) = 1.0625, a tie between E4M3 1.0 (M=0)
            #   and 1.125 (M=1) -> d = 1.0 (0x38, even), S/d = 1; so 6.375 and 6.25 lie above
            #   the E2M1 max and saturate to 6 (code 7); 5.01 -> 6 (7); 5 -> tie -> 4 (6);
            #   -2.5 -> tie -> -2 (code 12); 0.3 -> nearer 0.5 (code 1)
            pad([6.375, -6.375, 6.25, 5.0, 5.01, -2.5, 0.3], 16)
            # block (1,1): amax 6.5 -> 6.5/6 = 1.0833 -> E4M3 nearer 1.125 -> d = 1.125 (0x39)
            #   S/d = fp32(1/1.125) = 0.88888890: 6.5 -> 5.78 -> 6 (7); 4.5 -> 4 (6);
            #   2.25 -> 2 (4); 1.125 -> 1 (2); -3.375 -> -3 (13); 0.5625 -> 0.5 (1)
            + pad([6.5, 4.5, 2.25, 1.125, -3.375, 0.5625], 16),
        ]
    )
    q = grouped.quantize(x, "nvfp4")
    # tensor amax 2688 -> S = fp32(2688/2688) = 1
    assert_global_scale(q.global_scale, 1.0)
    assert_bytes(q.scale, [[0x7E, 0x38], [0x38, 0x39]])
    assert_codes(
        q.data,
        [
            pad([7, 4, 6, 10, 0, 2], 16) + [0, 2, 2, 4, 4, 6, 6, 7, 1, 3, 5, 10, 14, 15, 8, 6],
            pad([7, 15, 7, 6, 7, 12, 1], 16) + pad([7, 6, 4, 2, 13, 1], 16),
        ],
    )
    # dequant = fp32(q * d) / S, here S = 1
    assert_exact(
        q.dequantize(),
        [
            pad([2688.0, 896.0, 1792.0, -448.0, 0.0, 448.0], 16)
            + [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.5, 1.5, 3.0, -1.0, -4.0, -6.0, 0.0, 4.0],
            pad([6.0, -6.0, 6.0, 4.0, 6.0, -2.0, 0.5], 16) + pad([6.75, 4.5, 2.25, 1.125, -3.375, 0.5625], 16),
        ],
    )


def test_nvfp4_non_unit_global_scale():
    x = t32(
        [
            # tensor amax 1 -> S = 2688.
            # block 0: amax 1: fp32(1/6) = (1/6)(1 + 2^-25); * 2688 = 448 + 0.875*2^-16 -> fp32
            #   448 -> d = 448 (0x7E); S/d = 2688/448 = 6 exactly. Codes = E2M1(6x):
            #   1 -> 6 (7); 0.5 -> 3 (5); 0.25 -> 1.5 (3); -1 -> -6 (15);
            #   fp32(1/3) -> 2.0000000x -> 2 (4); 0.125 -> 0.75 -> tie -> 1 (2)
            pad([1.0, 0.5, 0.25, -1.0, 1.0 / 3.0, 0.125], 16)
            # block 1: amax 0.1: fp32(fp32(0.1)/6) * 2688 = 44.8 -> E4M3 [32,64) step 4 ->
            #   44 (1.375*32: E=12, M=3 -> 0x63); S/d = fp32(2688/44) = 61.090908:
            #   0.1 -> 6.109 -> saturates to 6 (7); 0.05 -> 3.05 -> 3 (5);
            #   -0.07 -> -4.28 -> -4 (14); 0.01 -> 0.611 -> 0.5 (1)
            + pad([0.1, 0.05, -0.07, 0.01], 16)
        ]
    )
    q = grouped.quantize(x, "nvfp4")
    assert_global_scale(q.global_scale, 2688.0)
    assert_bytes(q.scale, [[0x7E, 0x63]])
    assert_codes(q.data, [pad([7, 5, 3, 15, 4, 2], 16) + pad([7, 5, 14, 1], 16)])
    # dequant = fp32(q*d) / S with S = 2688
    s = torch.tensor(2688.0, dtype=F32)
    qd = t32(pad([6 * 448, 3 * 448, 1.5 * 448, -6 * 448, 2 * 448, 1 * 448], 16)
             + pad([6 * 44, 3 * 44, -4 * 44, 0.5 * 44], 16))
    assert_exact(q.dequantize(), (qd / s).reshape(1, 32))
    # sanity of the hand values above: 2688/2688 = 1, 1344/2688 = 0.5, 672/2688 = 0.25
    assert q.dequantize()[0, :4].tolist() == [1.0, 0.5, 0.25, -1.0]


def test_nvfp4_packing_negatives_and_zero_block():
    # tensor amax 6 -> S = 448; block 0 amax 6 -> d = e4m3(1.0 * 448) = 448 (0x7E),
    # S/d = 1 -> codes are plain E2M1 of x. Block 1 all zero -> d = 0 -> zero codes.
    vals = [6.0, -6.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 4.0, -4.0, 1.5, -1.5, 0.0, 0.0]
    # codes 7 15 1 9 2 10 4 12 5 13 6 14 3 11 0 0; first element in the LOW nibble:
    # (7,15) -> 0xF7, (1,9) -> 0x91, (2,10) -> 0xA2, (4,12) -> 0xC4, (5,13) -> 0xD5,
    # (6,14) -> 0xE6, (3,11) -> 0xB3, (0,0) -> 0x00
    x = t32([vals + pad([], 16)])
    q = grouped.quantize(x, "nvfp4")
    assert_global_scale(q.global_scale, 448.0)
    assert_bytes(q.scale, [[0x7E, 0x00]])
    assert_bytes(q.data, [[0xF7, 0x91, 0xA2, 0xC4, 0xD5, 0xE6, 0xB3, 0x00] + [0x00] * 8])
    assert_exact(q.dequantize(), x)  # q * 448 / 448 = q, exact


def test_nvfp4_packing_order_single_pair():
    # x = [6, 0.5] (S = 448, d = 448, S/d = 1): codes 7, 1 -> byte 0x17 (low nibble = first)
    x = t32([pad([6.0, 0.5], 16)])
    q = grouped.quantize(x, "nvfp4")
    assert_bytes(q.data, [pad([0x17], 8)])


def test_nvfp4_all_zero_tensor():
    x = torch.zeros(2, 16, dtype=F32)
    q = grouped.quantize(x, "nvfp4")
    assert_global_scale(q.global_scale, 1.0)  # amax 0 -> S = 1
    assert_bytes(q.scale, [[0x00], [0x00]])  # d = 0
    assert_bytes(q.data, [[0x00] * 8, [0x00] * 8])
    assert_exact(q.dequantize(), x)


def test_nvfp4_global_scale_capped_for_tiny_amax():
    # amax 1e-40 (fp32 subnormal): 2688 / 1e-40 = 2.7e43 overflows fp32 -> S = FMAX.
    # d = e4m3(fp32(fp32(1e-40 / 6) * FMAX)): fp32(1e-40/6) = 1.6667e-41 (subnormal),
    # * 3.4028e38 = 0.0056715 -> E4M3 subnormal step 2^-9: 2.90 steps -> 3 -> d = 3*2^-9
    # = 0.005859375 (byte 0x03). fp32(S/d) overflows to +inf, x * inf = +-inf ->
    # e2m1 satfinite -> +-6 (codes 7 / 15); exact math gives 5.8 -> 6 as well.
    x = t32([[1e-40, -1e-40] * 8])
    q = grouped.quantize(x, "nvfp4")
    assert_global_scale(q.global_scale, FMAX)
    assert_bytes(q.scale, [[0x03]])
    assert_codes(q.data, [[7, 15] * 8])
    # dequant = fp32(6 * 0.005859375) / FMAX = 0.03515625 / FMAX ~ 1.0331e-40 (subnormal)
    v = (torch.tensor(6 * 0.005859375, dtype=F32) / torch.tensor(FMAX, dtype=F32)).item()
    assert v > 0
    assert_exact(q.dequantize(), [[v, -v] * 8])


def test_nvfp4_zero_element_in_capped_block_is_zero():
    # Same capped S as above; here the block also holds zeros. A zero element has E2M1
    # code 0 (the literal fp32(S/d) = inf times 0 would be NaN, which is no E2M1 value):
    # it must come back as 0 and never as NaN or as a nonzero value.
    x = t32([pad([1e-40, -1e-40], 16)])
    q = grouped.quantize(x, "nvfp4")
    assert_global_scale(q.global_scale, FMAX)
    assert_codes(q.data, [pad([7, 15], 16)])
    deq = q.dequantize()
    assert not bool(torch.isnan(deq).any())
    assert_exact(deq[0, 2:], pad([], 14))


def test_nvfp4_rowwise_split_sizes_per_group_global_scale():
    # split_sizes [1, 0, 3]: group 0 = row 0, group 1 empty, group 2 = rows 1..3.
    x = t32(
        [
            pad([6.0, -3.0, 1.5, 0.75], 16),  # group 0: amax 6 -> S0 = 448; d = 448 (0x7E)
            pad([2688.0], 16),  # group 2 amax 2688 -> S2 = 1; d = 448 (0x7E), code 7
            pad([6.0, -3.0, 1.5, 0.75], 16),  # same values as row 0 but S2 = 1 -> d = 1 (0x38)
            pad([], 16),  # zero block -> d = 0
        ]
    )
    q = grouped.quantize(x, "nvfp4", split_sizes=[1, 0, 3])
    # empty group: amax 0 -> S = 1
    assert_global_scale(q.global_scale, [448.0, 1.0, 1.0])
    assert tuple(q.data.shape) == (4, 8)
    assert_bytes(q.scale, [[0x7E], [0x7E], [0x38], [0x00]])
    # rows 0 and 2 have S/d = 1: codes 6 -> 7, -3 -> 13, 1.5 -> 3, 0.75 -> tie -> 1 (2)
    assert_codes(
        q.data,
        [pad([7, 13, 3, 2], 16), pad([7], 16), pad([7, 13, 3, 2], 16), pad([], 16)],
    )
    want = x.clone()
    want[0, 3] = 1.0
    want[2, 3] = 1.0
    assert_exact(q.dequantize(), want)


def test_nvfp4_columnwise_split_sizes_odd_member_padding():
    # x (19, 2), axis=0, split_sizes [3, 16]: group 0 = rows 0..2 padded to 16, group 1 =
    # rows 3..18. P = 16 + 16 = 32 -> data (2, 16) bytes, scale (2, 2), S per group.
    x = torch.zeros(19, 2, dtype=F32)
    # group 0: amax 6 -> S0 = 448.
    #   col 0 [6, -1.5, 0.75]: d = 448 (0x7E), S/d = 1 -> codes 7, 11, 2 (0.75 tie -> 1)
    #   col 1 [3, 0.5, -2]: d = e4m3(0.5 * 448) = 224 (0x76), S/d = 2 -> E2M1(6, 1, -4)
    #   -> codes 7, 2, 14; dequant q * 224 / 448 = q / 2 -> 3, 0.5, -2
    x[0:3, 0] = t32([6.0, -1.5, 0.75])
    x[0:3, 1] = t32([3.0, 0.5, -2.0])
    # group 1: amax 2688 -> S1 = 1.
    #   col 0 [2688, 1120, 0..]: d = 448, S/d = c -> 7, 4 (2.5 tie -> 2); dequant 2688, 896
    #   col 1 [6, 5, 2.5, -0.25, 0..]: d = 1 (0x38) -> 7, 6 (5 -> 4), 4 (2.5 -> 2), -0
    x[3:5, 0] = t32([2688.0, 1120.0])
    x[3:7, 1] = t32([6.0, 5.0, 2.5, -0.25])
    q = grouped.quantize(x, "nvfp4", axis=0, split_sizes=[3, 16])
    assert tuple(q.data.shape) == (2, 16)
    assert tuple(q.scale.shape) == (2, 2)
    assert_global_scale(q.global_scale, [448.0, 1.0])
    assert_bytes(q.scale, [[0x7E, 0x7E], [0x76, 0x38]])
    assert_codes(
        q.data,
        [
            pad([7, 11, 2], 16) + pad([7, 4], 16),
            pad([7, 2, 14], 16) + pad([7, 6, 4, 8], 16),
        ],
    )
    # padding nibbles must be plain zero bytes: group 0 bytes 2..7 of each row
    assert_bytes(q.data[:, 2:8], [[0] * 6, [0] * 6])
    want = x.clone()
    want[2, 0] = 1.0
    want[4, 0] = 896.0
    want[4, 1] = 4.0
    want[5, 1] = 2.0
    want[6, 1] = 0.0
    assert_exact(q.dequantize(), want)


def test_nvfp4_3d_weights_one_global_scale_per_expert():
    x = torch.zeros(2, 2, 16, dtype=F32)
    # expert 0: amax 6 -> S = 448. row 0 [6, -0.5]: d = 448 (0x7E), codes 7, 9;
    #   row 1 [3, 1]: d = 224 (0x76), S/d = 2 -> E2M1(6, 2) = codes 7, 4; dequant q/2
    x[0, 0, :2] = t32([6.0, -0.5])
    x[0, 1, :2] = t32([3.0, 1.0])
    # expert 1: amax 2688 -> S = 1. row 0 [2688]: d = 448, code 7; row 1 [6, -0.5]:
    #   d = 1 (0x38), codes 7, 9
    x[1, 0, 0] = 2688.0
    x[1, 1, :2] = t32([6.0, -0.5])
    q = grouped.quantize(x, "nvfp4")
    assert tuple(q.data.shape) == (2, 2, 8)
    assert tuple(q.scale.shape) == (2, 2, 1)
    assert_global_scale(q.global_scale, [448.0, 1.0])
    assert_bytes(q.scale, [[[0x7E], [0x76]], [[0x7E], [0x38]]])
    assert_codes(
        q.data,
        [[pad([7, 9], 16), pad([7, 4], 16)], [pad([7], 16), pad([7, 9], 16)]],
    )
    assert_exact(q.dequantize(), x)


def test_nvfp4_columnwise_is_transposed():
    # x (32, 2), axis=0 -> data (2, 16), scale (2, 2); tensor amax 6 -> S = 448.
    x = torch.zeros(32, 2, dtype=F32)
    # col 0 block 0 (rows 0..15) [6, -0.5, 1, 1.5]: d = 448, codes 7, 9, 2, 3 -> 0x97, 0x32
    x[0:4, 0] = t32([6.0, -0.5, 1.0, 1.5])
    # col 0 block 1 (rows 16..31): only row 31 = -6 -> code 15 in the HIGH nibble of byte 15
    x[31, 0] = -6.0
    # col 1 block 0 [3, -2]: d = 224 (0x76), S/d = 2 -> codes 7, 14 -> 0xE7; block 1 zero
    x[0:2, 1] = t32([3.0, -2.0])
    q = grouped.quantize(x, "nvfp4", axis=0)
    assert tuple(q.data.shape) == (2, 16)
    assert tuple(q.scale.shape) == (2, 2)
    assert_global_scale(q.global_scale, 448.0)
    assert_bytes(q.scale, [[0x7E, 0x7E], [0x76, 0x00]])
    assert_bytes(q.data, [[0x97, 0x32] + [0] * 13 + [0xF0], [0xE7] + [0] * 15])
    assert_exact(q.dequantize(), x)
    qt = grouped.quantize(x.T.contiguous(), "nvfp4", axis=-1)
    assert torch.equal(q.data, qt.data)
    assert torch.equal(as_bytes(q.scale), as_bytes(qt.scale))


def test_nvfp4_nan_inf_blocks_excluded_from_global_scale():
    # block 0 holds NaN and -Inf (its only finite values are 1 and 0); block 1 amax 6.
    # S over finite values = 2688/6 = 448; block 0 -> d = 0x7F, codes 0, dequant NaN;
    # block 1 -> d = 448 (0x7E), S/d = 1: codes 7, 9, 5 (6, -0.5, 3)
    x = t32([pad([NAN, -INF, 1.0], 16) + pad([6.0, -0.5, 3.0], 16)])
    q = grouped.quantize(x, "nvfp4")
    assert_global_scale(q.global_scale, 448.0)
    assert_bytes(q.scale, [[0x7F, 0x7E]])
    assert_bytes(q.data, [[0x00] * 8 + [0x97, 0x05] + [0x00] * 6])
    deq = q.dequantize()
    assert bool(torch.isnan(deq[0, :16]).all())
    assert_exact(deq[0, 16:], pad([6.0, -0.5, 3.0], 16))


def test_nvfp4_finite_values_inside_nan_block_count_for_global_scale():
    # S is computed from the FINITE values of the whole tensor, including the finite
    # values of blocks that hold a NaN/Inf: here 2688 sits in the NaN block -> S = 1.
    # block 2 amax 6 -> d = e4m3(1 * 1) = 1.0 (0x38) (it would be 448 = 0x7E if S were 448)
    x = t32([pad([NAN, 2688.0], 16) + pad([INF, -3.0], 16) + pad([6.0, -0.5, 3.0], 16)])
    q = grouped.quantize(x, "nvfp4")
    assert_global_scale(q.global_scale, 1.0)
    assert_bytes(q.scale, [[0x7F, 0x7F, 0x38]])
    assert_bytes(q.data, [[0x00] * 16 + [0x97, 0x05] + [0x00] * 6])
    deq = q.dequantize()
    assert bool(torch.isnan(deq[0, :32]).all())
    assert_exact(deq[0, 32:], pad([6.0, -0.5, 3.0], 16))


def test_nvfp4_bad_inputs():
    with pytest.raises(ValueError):
        grouped.quantize(torch.ones(2, 24), "nvfp4")  # 24 not a multiple of 16
    with pytest.raises(ValueError):
        grouped.quantize(torch.ones(2, 8), "nvfp4")
    with pytest.raises(ValueError):
        grouped.quantize(torch.ones(8, 16), "nvfp4", axis=0)  # M = 8, no split_sizes


# =========================================================================== formats


@pytest.mark.parametrize("name", ["fp6", "not_a_format", "mxfp8_typo"])
def test_unknown_format_raises(name):
    with pytest.raises(ValueError):
        grouped.quantize(torch.ones(2, 32), name)
