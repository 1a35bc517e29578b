"""The MXFP8 and NVFP4 -> bf16 decodes of the sm90 kernel (cute_backend/sm90/block_decode.py),
emulated bit for bit on the CPU: their instruction sequences (prmt byte moves and table lookups,
shifts, masks, bf16 multiplies) against the definitions, for every E4M3 byte and E8M0 scale, and
every pair of E2M1 codes and E4M3 scale. The kernel itself runs only on a GPU
(tests/test_cute_block_scaled_gpu.py)."""

import pytest
import torch

from grouped import elements as el

decode = pytest.importorskip("cute_backend.sm90.block_decode", reason="nvidia-cutlass-dsl not installed")


def prmt(a: torch.Tensor, b, selector) -> torch.Tensor:
    """PTX prmt.b32 d, a, b, selector (default mode) on int64 tensors holding 32-bit values; the
    selector an int or a tensor (one per word)."""
    a, b, selector = torch.broadcast_tensors(*(torch.as_tensor(t, dtype=torch.int64) for t in (a, b, selector)))
    both = a | (b << 32)
    out = torch.zeros_like(a)
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = (both >> (8 * (nibble & 7))) & 0xFF
        byte = torch.where(nibble & 8 != 0, torch.where(byte & 0x80 != 0, 0xFF, 0), byte)
        out |= byte << (8 * i)
    return out


def prmt_sign_replicate(words: torch.Tensor, selector: int) -> torch.Tensor:
    return prmt(words, 0, selector)


def bf16_pairs(words: torch.Tensor) -> torch.Tensor:
    """int64 words of two bf16 halves -> float32 (..., 2), low half first."""
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1).to(torch.int16)
    return halves.view(torch.bfloat16).float()


def factors(scale: int) -> tuple[float, float | None]:
    """The kernel's bf16x2 factor words for an E8M0 byte, as floats (second None when unused)."""
    s = scale
    first_field = min(s + decode.E4M3_TO_BF16_BIAS, decode.BF16_MAX_EXPONENT_FIELD)
    first = (first_field << decode.BF16_EXPONENT_SHIFT) * decode.PAIR
    if s == el.E8M0_NAN:
        first = decode.BF16X2_NAN
    twice = s > decode.BF16_MAX_EXPONENT_FIELD - decode.E4M3_TO_BF16_BIAS and s != el.E8M0_NAN
    second = ((s - 7) << decode.BF16_EXPONENT_SHIFT) * decode.PAIR
    as_float = lambda w: float(bf16_pairs(torch.tensor([w]))[0, 0])  # noqa: E731
    return as_float(first), (as_float(second) if twice else None)


def emulate(byte_words: torch.Tensor, scale: int) -> torch.Tensor:
    """The decode of 32-bit words of four E4M3 bytes under one block scale: (..., 4) float32."""
    first, second = factors(scale)
    parts = []
    for selector in (0x9180, 0xB3A2):
        bits = (prmt_sign_replicate(byte_words, selector) << 4) & 0x87F087F0
        value = (bf16_pairs(bits).to(torch.bfloat16) * torch.tensor(first, dtype=torch.bfloat16))
        if second is not None:
            value = value * torch.tensor(second, dtype=torch.bfloat16)
        parts.append(value.float())
    return torch.cat(parts, dim=-1)


@pytest.fixture(scope="module")
def all_bytes():
    codes = torch.arange(256, dtype=torch.int64)
    words = codes  # one byte a word in the lowest position; the others exercise the other lanes
    words = codes | (codes.roll(1) << 8) | (codes.roll(2) << 16) | (codes.roll(3) << 24)
    values = codes.to(torch.uint8).view(torch.float8_e4m3fn).double()
    expected = torch.stack([values, values.roll(1), values.roll(2), values.roll(3)], dim=-1)
    return words, expected


@pytest.mark.parametrize("scale", range(0, 255, 1))
def test_every_e4m3_byte_under_every_scale(scale, all_bytes):
    words, values = all_bytes
    got = emulate(words, scale).double()
    e = scale - el.E8M0_BIAS
    expected = values * 2.0**e
    finite = ~torch.isnan(values)  # E4M3 NaN codes come only with the NaN scale (the quantizer's rule)
    if e >= -124:  # element x 2^e representable in bf16: exact
        assert torch.equal(got[finite], expected[finite].float().double()), f"scale byte {scale}"
    else:  # below 2^-124 the smallest E4M3 subnormals fall under bf16's: rounded, never by more than 2^-134
        assert float((got[finite] - expected[finite]).abs().max()) <= 2.0**-134


def test_nan_scale_decodes_every_element_to_nan(all_bytes):
    words, _ = all_bytes
    assert torch.isnan(emulate(words, el.E8M0_NAN)).all()


def test_block_not_present_decodes_to_zero(all_bytes):
    """e8m0_factors gives a zero factor for a block past a group's or the tensor's end."""
    words, values = all_bytes
    bits = (prmt_sign_replicate(words, 0x9180) << 4) & 0x87F087F0
    zero = bf16_pairs(bits).to(torch.bfloat16) * torch.tensor(0.0, dtype=torch.bfloat16)
    assert (zero.float() == 0).all()


# ---- NVFP4 -------------------------------------------------------------------------------------


def mul_bf16x2(words: torch.Tensor, factor_words: torch.Tensor) -> torch.Tensor:
    """mul.rn.bf16x2 on int64 words: both halves multiplied in bf16."""
    product = bf16_pairs(words).to(torch.bfloat16) * bf16_pairs(torch.as_tensor(factor_words)).to(torch.bfloat16)
    halves = product.view(torch.int16).to(torch.int64) & 0xFFFF
    return halves[..., 0] | (halves[..., 1] << 16)


def e4m3_factor(scale: torch.Tensor) -> torch.Tensor:
    """block_decode.e4m3_factor, emulated (every block present)."""
    bits = (prmt(scale, 0, 0x8080) << 4) & 0x87F087F0
    factor = mul_bf16x2(bits, torch.tensor(decode.E4M3_UNBIAS))
    return torch.where((scale & 0x7F) == el.E4M3_NAN_BYTE, decode.BF16X2_NAN, factor)


def decode_e2m1x8(words: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """block_decode.decode_e2m1x8, emulated: (..., 8) float32."""
    low_a, low_b, high_a, high_b = decode.e2m1_tables(el.E2M1_VALUES)
    magnitudes = words & decode.MAGNITUDE_BITS
    shifted = (words << 4) & 0xFFFFFFFF
    out = []
    for half in range(2):
        index = magnitudes >> (16 * half)
        low, high = prmt(low_a, low_b, index), prmt(high_a, high_b, index)
        signs = prmt(shifted, words, 0x5140 + 0x2222 * half)
        high = high | (signs & decode.SIGN_BITS)
        for selector in (0x5140, 0x7362):
            out.append(bf16_pairs(mul_bf16x2(prmt(low, high, selector), factor)))
    return torch.cat(out, dim=-1)


def test_every_e2m1_pair_under_every_e4m3_scale():
    """All 2^16 pairs of code bytes (4 a word, so every code sits at every position) times all 256
    E4M3 scale bytes: q * d exactly, NaN for the NaN scale."""
    codes = torch.arange(256, dtype=torch.int64)
    words = codes | (codes.roll(37) << 8) | (codes.roll(101) << 16) | (codes.roll(211) << 24)
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    q = el.e2m1_decode(nibbles.to(torch.uint8)).double()
    for scale in range(256):
        factor = e4m3_factor(torch.tensor(scale))
        got = decode_e2m1x8(words, factor.expand_as(words)).double()
        d = torch.tensor([scale], dtype=torch.uint8).view(torch.float8_e4m3fn).double()
        if torch.isnan(d).any():
            assert torch.isnan(got).all(), f"scale byte {scale:#x}"
        else:
            assert torch.equal(got, q * d), f"scale byte {scale:#x}"
