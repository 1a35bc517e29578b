"""CuTe DSL kernels (nvidia-cutlass-dsl) for Hopper (sm_90a) and their compile cache.

Nothing here is imported by ``import grouped``, and nothing here imports grouped: the library
imports these modules lazily, on first use on a Hopper GPU, and passes in what a kernel needs to
know of its formats. Each kernel family has host modules (checks, compile entry, launch; no
cutlass import) and device modules (the kernel itself, imported only to compile); what both
sides compile in lives in a small config module they share.
"""


def kernel_configs(quantize_formats) -> list:
    """Every (KernelSpec, build) the library can pick, for CI's compile check; quantize_formats:
    the FormatFacts the library quantizes with (grouped.quantize.kernel_facts of its formats)."""
    from . import offsets, quantize
    from .sm90 import grouped_gemm

    return offsets.configs() + quantize.configs(quantize_formats) + grouped_gemm.configs(quantize_formats)
