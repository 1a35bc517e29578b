"""What our kernels compile in about a block-scaled format, handed over by the library.

No cutlass or torch import: host modules put it in a kernel's config (its KernelSpec, hence its
cache key), device modules compile its values in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FormatFacts:
    """The facts of a block-scaled format that a kernel compiles in.

    The caller builds it from its own format descriptors (grouped.quantize.kernel_facts) and
    passes it as ``fmt`` to every host function that needs it; it is part of the kernel's
    config, so a change to any fact compiles the kernels anew. The numerics: docs/design.md.
    """

    name: str  # "mxfp8" or "nvfp4": which kernels run
    block_size: int  # elements sharing one scale (32 / 16)
    elements_per_byte: int  # 1, or 2 for E2M1 codes (first element in the low nibble)
    e4m3_max: float  # largest finite E4M3 (448): MXFP8's t = fp32(amax * fp32(1 / e4m3_max))
    e2m1_max: float  # largest E2M1 magnitude (6): NVFP4's fp32(block_amax / e2m1_max); the E2M1 clamp
    amax_to_s: float  # NVFP4's S = fp32(amax_to_s / amax) (448 * 6 = 2688)
    nan_scale: int  # scale byte of a block holding NaN or Inf: E8M0 0xFF (MXFP8), E4M3 0x7F (NVFP4)
    nan_element: int  # MXFP8: element byte of such a block (E4M3 NaN 0x7F); NVFP4 writes zero codes
    e2m1_values: tuple[float, ...] = ()  # E2M1 magnitudes by code 0..7 (NVFP4; what a decode looks up)

    def __str__(self) -> str:  # what a compiled kernel's name shows of it
        return self.name
