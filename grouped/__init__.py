"""grouped: grouped GEMMs for Mixture-of-Experts layers (BF16, MXFP8, NVFP4).

Importing this package is light: it does not import cutlass or cuDNN frontend,
compile anything or initialise CUDA. Backends load their kernels on first use.
"""

__version__ = "0.1.0"

from . import custom_ops  # noqa: F401  (registers the grouped:: torch.library ops for torch.compile)
from .formats import BF16, FORMATS, MXFP8, NVFP4, Format, get_format
from .fused import explain_swiglu, gemm_swiglu
from .gemm import explain, gemm, grouped_mm
from .offsets import splits_to_offsets
from .ops import GroupedLinear, GroupedMLP
from .quantize import QuantizedTensor, quantize
from .scale_layout import from_blocked, to_blocked
from .splits import Splits
from .tensor import GroupedTensor

__all__ = [
    "BF16",
    "FORMATS",
    "MXFP8",
    "NVFP4",
    "Format",
    "explain",
    "explain_swiglu",
    "gemm",
    "gemm_swiglu",
    "grouped_mm",
    "GroupedLinear",
    "GroupedMLP",
    "GroupedTensor",
    "QuantizedTensor",
    "Splits",
    "from_blocked",
    "get_format",
    "quantize",
    "splits_to_offsets",
    "to_blocked",
]
