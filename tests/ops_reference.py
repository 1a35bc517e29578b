"""Helpers shared by the GroupedLinear / GroupedMLP tests (CPU and GPU)."""

import torch


def bounds(sizes):
    """Row slices of the experts, in order."""
    start = 0
    for m in sizes:
        yield slice(start, start + m)
        start += m


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error, in fp64 on the CPU."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()
