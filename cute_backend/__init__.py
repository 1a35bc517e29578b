"""CuTe DSL kernels (nvidia-cutlass-dsl) for Hopper (sm_90a) and their compile cache.

Nothing here is imported by ``import grouped``; the library imports these
modules lazily, on first use on a Hopper GPU. Each kernel family has a host
module (checks, compile entry, launch; no cutlass import) and a device module
(the kernel itself, imported only to compile).
"""


def kernel_configs():
    """Every (KernelSpec, build) the library can pick, for CI's compile check."""
    from . import offsets, quantize
    from .sm90 import grouped_gemm

    return offsets.configs() + quantize.configs() + grouped_gemm.configs()
