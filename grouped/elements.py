"""Element and scale codecs of the low-precision formats, in plain torch.

Each function is exact: it reproduces the rounding the hardware conversion
instructions do (round to nearest, ties to even, saturating to the largest
finite value), so the GPU kernels can be checked against it bit for bit.

- E4M3 (``torch.float8_e4m3fn``): 1 sign, 4 exponent, 3 mantissa bits, largest
  finite 448, no infinities, NaN = 0x7F / 0xFF.
- E8M0: a biased power-of-two exponent byte, 127 means 2^0, 255 is NaN.
- E2M1: 1 sign, 2 exponent, 1 mantissa bit; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6
  by code index 0..7; nibble = sign * 8 + index; no NaN or infinity.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E8M0_NAN = 255
E8M0_BIAS = 127
E4M3_NAN_BYTE = 0x7F

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Rounding boundaries between consecutive E2M1 magnitudes: a magnitude v goes to
# index i with bound[i-1] < v <= bound[i] (torch.bucketize, right=False), so an
# exact tie goes down. Where the tie must go up (to the even code), the bound is
# the next fp32 below the midpoint, which sends the midpoint itself up.
#   0.25 -> 0 (down), 0.75 -> 1 (up), 1.25 -> 1 (down), 1.75 -> 2 (up),
#   2.5 -> 2 (down), 3.5 -> 4 (up), 5 -> 4 (down)
_MIDPOINTS_TIE_UP = (False, True, False, True, False, True, False)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _e2m1_bounds(device: torch.device) -> torch.Tensor:
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32, device=device)
    below = torch.nextafter(mids, torch.zeros_like(mids))
    tie_up = torch.tensor(_MIDPOINTS_TIE_UP, device=device)
    return torch.where(tie_up, below, mids)


def to_e4m3_satfinite(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> E4M3, round to nearest even, saturating at +-448; NaN stays NaN.

    torch's own cast turns values at or past 480 into NaN, so clamp first
    (clamping before rounding gives the same result as saturating after).
    """
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact fp32 2^k for integer k in [-149, 127], built from the bit pattern."""
    k = exponent.to(torch.int32)
    normal = (k + 127).clamp(min=1) << 23
    subnormal = torch.ones_like(k) << (k + 149).clamp(0, 22)
    return torch.where(k >= -126, normal, subnormal).view(torch.float32)


def ceil_log2(t: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2 t) for finite t > 0 (int32); t = 0 gives a very small value.

    frexp gives t = m * 2^E with m in [0.5, 1): log2 t <= E, with equality of
    ceil(log2 t) and E - 1 exactly when m == 0.5 (t a power of two).
    """
    mantissa, exponent = torch.frexp(t)
    e = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.where(t > 0, e, torch.full_like(e, -(2**30)))


def e8m0_to_float(scale_bytes: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> fp32 scale 2^(byte - 127); byte 255 is NaN."""
    b = scale_bytes.to(torch.int32)
    value = pow2(b - E8M0_BIAS)
    return torch.where(b == E8M0_NAN, torch.full_like(value, float("nan")), value)


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> E2M1 nibble (uint8 in [0, 15]), round to nearest even, saturating at +-6.

    The sign bit is kept (a negative value that rounds to zero gives nibble 8,
    negative zero), as the hardware conversion does. NaN input is not handled
    here: callers zero or flag non-finite blocks first.
    """
    index = torch.bucketize(v.abs(), _e2m1_bounds(v.device), right=False)
    sign = torch.signbit(v).to(torch.uint8) << 3
    return sign | index.to(torch.uint8)


def e2m1_decode(nibbles: torch.Tensor) -> torch.Tensor:
    """E2M1 nibble -> fp32 value."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=nibbles.device)
    n = nibbles.to(torch.int64)
    magnitude = table[n & 7]
    return torch.where((n & 8) != 0, -magnitude, magnitude)


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """(..., 2n) nibbles -> (..., n) bytes, the first element of each pair in the low nibble."""
    pairs = nibbles.reshape(*nibbles.shape[:-1], nibbles.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) bytes -> (..., 2n) nibbles; inverse of pack_nibbles."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
