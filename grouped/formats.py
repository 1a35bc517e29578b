"""Format descriptors: BF16, MXFP8 and NVFP4, the one place format knowledge lives.

A descriptor says how a format stores its values (element dtype, packing,
block size, scale dtype, whether it has a per-tensor scale) and holds the
reference quantize / dequantize of one run of blocks. Everything else
(``grouped.quantize``, GroupedTensor, the GEMM backends) asks the descriptor
instead of branching on the format's name.

Numerics (docs/design.md, "Numerics"), for blocks that run along the last
dim of an fp32 tensor:

MXFP8 (OCP MX v1.0, E4M3 elements, block 32, E8M0 scales)
    t = fp32(amax * fp32(1/448)); e = ceil(log2 t) clamped to [-127, 127]
    (t = 0 gives e = -127); scale byte = e + 127;
    element = e4m3_rn_satfinite(x * 2^-e); dequantized = element * 2^e.

NVFP4 (E2M1 elements, block 16, E4M3 block scales, fp32 per-tensor scale S)
    S = fp32(2688 / amax) over the tensor (per member of a grouped operand),
    capped at the largest finite fp32, S = 1 when amax = 0;
    d = e4m3_rn_satfinite(fp32(fp32(block_amax / 6) * S));
    q = e2m1_rn_satfinite(fp32(x * fp32(S / d))), zero codes where d = 0
    and for x = 0 (S / d may overflow to inf: 0 * inf is not taken as NaN);
    dequantized = q * d / S. Two codes a byte, the first element in the low nibble.

Non-finite input (decided here, identical in every kernel): NaN and Inf are
propagated, never turned into finite values. A block holding any NaN or +-Inf
gets a NaN scale (E8M0 0xFF for MXFP8, E4M3 NaN for NVFP4) and dequantizes to
NaN in every element; its element bytes are E4M3 NaN (MXFP8) or zero codes
(NVFP4). NVFP4's per-tensor amax is taken over the finite values only, so one
bad block does not poison the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import elements as el

FP32_MAX = torch.finfo(torch.float32).max
_NVFP4_AMAX_TO_S = el.E4M3_MAX * el.E2M1_MAX  # S maps the tensor amax onto E4M3 max x E2M1 max


@dataclass(frozen=True)
class Format:
    """What a format stores. Subclasses add the block codec."""

    name: str
    block_size: int | None  # elements sharing one scale; None for unscaled formats
    data_dtype: torch.dtype  # dtype of the stored data tensor
    scale_dtype: torch.dtype | None
    elements_per_byte: int = 1  # NVFP4 packs two codes a byte
    has_global_scale: bool = False

    @property
    def quantized(self) -> bool:
        return self.block_size is not None

    def packed_len(self, n: int) -> int:
        """Stored length along the blocked dim for n logical elements."""
        return n // self.elements_per_byte

    def data_nbytes(self, numel: int) -> int:
        return numel * self.data_dtype.itemsize // self.elements_per_byte

    def global_scale(self, amax: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no per-tensor scale")

    def quantize_blocks(self, x: torch.Tensor, global_scale: torch.Tensor | None):
        """fp32 x (..., n) with n a multiple of block_size -> (data, scale).

        global_scale (formats that have one) broadcasts against x with a last
        dim of 1: a 0-d S for a whole tensor, (G, 1, 1) for a (G, N, K) weight,
        (M, 1) holding each row's member S for a grouped token tensor.
        """
        raise NotImplementedError(f"{self.name} is not a block-scaled format")

    def dequantize_blocks(self, data, scale, global_scale) -> torch.Tensor:
        """Inverse of quantize_blocks: fp32 (..., n)."""
        raise NotImplementedError(f"{self.name} is not a block-scaled format")

    def __str__(self) -> str:
        return self.name


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


class MXFP8Format(Format):
    def quantize_blocks(self, x, global_scale=None):
        xb = _blocks(x, self.block_size)
        amax = xb.abs().amax(dim=-1, keepdim=True)  # NaN if the block has one
        bad = ~torch.isfinite(amax)
        t = amax * torch.tensor(1.0 / el.E4M3_MAX, dtype=torch.float32)
        e = el.ceil_log2(t).clamp(-el.E8M0_BIAS, el.E8M0_BIAS)
        elements = el.to_e4m3_satfinite(xb * el.pow2(-e))
        elements = torch.where(bad, torch.full_like(elements, float("nan")), elements)
        scale = torch.where(bad, torch.full_like(e, el.E8M0_NAN), e + el.E8M0_BIAS)
        return elements.reshape(x.shape), scale.squeeze(-1).to(torch.uint8)

    def dequantize_blocks(self, data, scale, global_scale=None):
        values = _blocks(data.float(), self.block_size) * el.e8m0_to_float(scale).unsqueeze(-1)
        return values.reshape(data.shape)


class NVFP4Format(Format):
    def global_scale(self, amax):
        """S = fp32(2688 / amax), capped at the largest finite fp32; 1 where amax = 0."""
        amax = amax.float()
        s = (torch.tensor(_NVFP4_AMAX_TO_S, dtype=torch.float32) / amax).clamp(max=FP32_MAX)
        return torch.where(amax == 0, torch.ones_like(s), s)

    def quantize_blocks(self, x, global_scale):
        xb = _blocks(x, self.block_size)
        s = global_scale.float().unsqueeze(-1)
        block_amax = xb.abs().amax(dim=-1, keepdim=True)
        bad = ~torch.isfinite(block_amax)
        d = el.to_e4m3_satfinite((block_amax / el.E2M1_MAX) * s)
        d = torch.where(bad, torch.full_like(d, float("nan")), d)
        d32 = d.float()
        # S / d overflows to inf when the tensor amax is tiny (S near the fp32
        # max); 0 * inf would be NaN, so zeros are encoded as the zeros they are.
        scaled = xb * (s / d32)
        codes = el.e2m1_encode(torch.where(xb == 0, xb, scaled))
        codes = torch.where((d32 == 0) | bad, torch.zeros_like(codes), codes)
        return el.pack_nibbles(codes.reshape(x.shape)), d.squeeze(-1)

    def dequantize_blocks(self, data, scale, global_scale):
        q = el.e2m1_decode(el.unpack_nibbles(data))
        s = global_scale.float().unsqueeze(-1)
        values = (_blocks(q, self.block_size) * scale.float().unsqueeze(-1)) / s
        return values.reshape(q.shape)


BF16 = Format("bf16", block_size=None, data_dtype=torch.bfloat16, scale_dtype=None)
MXFP8 = MXFP8Format(
    "mxfp8", block_size=32, data_dtype=torch.float8_e4m3fn, scale_dtype=torch.uint8
)
NVFP4 = NVFP4Format(
    "nvfp4",
    block_size=16,
    data_dtype=torch.uint8,
    scale_dtype=torch.float8_e4m3fn,
    elements_per_byte=2,
    has_global_scale=True,
)

FORMATS: dict[str, Format] = {f.name: f for f in (BF16, MXFP8, NVFP4)}


def get_format(fmt: str | Format, *, argument: str = "fmt") -> Format:
    """The descriptor for a name ("bf16", "mxfp8", "nvfp4") or a descriptor."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str) and fmt.lower() in FORMATS:
        return FORMATS[fmt.lower()]
    raise ValueError(f"{argument} must be one of {sorted(FORMATS)} or a Format descriptor, got {fmt!r}")
