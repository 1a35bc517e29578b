"""Autograd modules built only on the public GEMM entry (grouped.gemm)."""

from .linear import GroupedLinear
from .mlp import GroupedMLP

__all__ = ["GroupedLinear", "GroupedMLP"]
