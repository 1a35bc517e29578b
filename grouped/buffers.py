"""Rules for caller-provided output buffers (out=, grad_input=, main_grad).

A buffer must be on the right device, of the right dtype and shape, have unit
stride along its last dim and a row stride >= the row length that keeps every
row 16-byte aligned (a strided view into a larger buffer is fine), not require
grad, and not overlap any input. Every check runs before any kernel, and a
failed one raises ValueError, so the buffer is never left half-written.
"""

from __future__ import annotations

from typing import Iterable

import torch

ALIGN_BYTES = 16  # rows, row strides and base addresses: what TMA and vector loads need


def ceil_to(n: int, m: int) -> int:
    """n rounded up to a multiple of m."""
    return -(-n // m) * m


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the bytes a strided tensor can touch."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size())


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = byte_span(a), byte_span(b)
    return a0 < b1 and b0 < a1


def check_buffer(
    buf,
    *,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    inputs: Iterable[torch.Tensor] = (),
) -> torch.Tensor:
    """Check a caller buffer against the rules above; return it unchanged."""
    if not isinstance(buf, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(buf).__name__}")
    if buf.device != device:
        raise ValueError(f"{name} must be on {device}, got {buf.device}")
    if buf.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} (the call's output dtype), got {buf.dtype}")
    if tuple(buf.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(buf.shape)}")
    if buf.requires_grad:
        raise ValueError(f"{name} must not require grad (it is written in place)")
    if buf.numel() == 0:
        return buf
    row_len = shape[-1]
    if buf.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dim, got strides {buf.stride()}")
    for dim in range(buf.dim() - 1):  # each outer dim must step past everything inside it
        inner = (buf.shape[dim + 1] - 1) * buf.stride(dim + 1) + 1 if dim + 1 < buf.dim() - 1 else row_len
        if buf.shape[dim] > 1 and buf.stride(dim) < inner:
            raise ValueError(f"{name} strides {buf.stride()} make its own elements overlap (shape {tuple(buf.shape)})")
    row_bytes = [buf.stride(d) * buf.element_size() for d in range(buf.dim() - 1) if buf.shape[d] > 1]
    if buf.data_ptr() % ALIGN_BYTES or any(b % ALIGN_BYTES for b in row_bytes):
        raise ValueError(
            f"{name} rows must start 16-byte aligned: data_ptr % 16 = {buf.data_ptr() % ALIGN_BYTES}, "
            f"row strides in bytes {row_bytes}"
        )
    for t in inputs:
        if t is not None and t.device == buf.device and overlaps(buf, t):
            raise ValueError(f"{name} overlaps an input tensor (shape {tuple(t.shape)}); it must not alias inputs")
    return buf
