"""The MXFP8 -> bf16 decode of the sm90 kernel (cute_backend/sm90/block_decode.py), emulated bit for
bit on the CPU: its instruction sequence (prmt with sign replication, shift, mask, bf16 multiplies
by the factors e8m0_factors builds) against the definition, for every E4M3 byte and every E8M0
scale. The kernel itself runs only on a GPU (tests/test_cute_mxfp8_gpu.py)."""

import pytest
import torch

from grouped import elements as el

decode = pytest.importorskip("cute_backend.sm90.block_decode", reason="nvidia-cutlass-dsl not installed")


def prmt_sign_replicate(words: torch.Tensor, selector: int) -> torch.Tensor:
    """PTX prmt.b32 d, a, 0, selector (default mode) on int64 words holding 32-bit values."""
    out = torch.zeros_like(words)
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = (words >> (8 * (nibble & 7))) & 0xFF if (nibble & 7) < 4 else torch.zeros_like(words)
        if nibble & 8:
            byte = torch.where(byte & 0x80 != 0, 0xFF, 0)
        out |= byte << (8 * i)
    return out


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
