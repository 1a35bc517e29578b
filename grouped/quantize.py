"""grouped.quantize: BF16/fp32 -> MXFP8 or NVFP4, the torch reference path.

Storage rule: the blocked dim (the GEMM's contraction dim) is always the LAST
dim of ``.data`` and ``.scale``, because every GEMM kernel wants it contiguous.
So rowwise data keeps x's shape, and columnwise data is stored transposed:

=====================  ==========  ================  =====================
x                      axis        .data (MXFP8)     .scale (compact)
=====================  ==========  ================  =====================
(M, K)                 -1          (M, K)            (M, K/32)
(M, K)                 0           (K, M)            (K, M/32)
(M, K), split_sizes    0           (K, P)            (K, P/32)
(G, N, K)              -1          (G, N, K)         (G, N, K/32)
(G, N, K)              1           (G, K, N)         (G, K, N/32)
=====================  ==========  ================  =====================

NVFP4 halves the data's last dim (two codes a byte) and uses blocks of 16.

With ``split_sizes`` (2-D x only) the rows form groups (experts):
- columnwise (axis 0): blocks restart at every group boundary, and each group
  is zero-padded to a multiple of the block size, so P = sum(ceil(m_g / block)
  * block) and every group starts block-aligned (a wgrad kernel then needs no
  masking inside a block);
- NVFP4 gets one per-tensor scale S per group (``global_scale`` of shape (G,));
  a 3-D weight always gets one per expert;
- rows past sum(split_sizes) belong to no group: they are stored as zeros
  (rowwise) or not stored (columnwise), and dequantize to zero.

Without ``split_sizes`` a blocked dim that is not a multiple of the block size
is refused (pass ``split_sizes=[n]`` to get the zero-padded columnwise form).
Inputs may be bf16, fp16 or fp32, any strides. On CUDA the GPU kernels of
``cute_backend`` will serve this; this module is the reference they match.
Split sizes given as a GPU tensor are read to the host here (a sync).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .formats import Format, get_format
from .scale_layout import from_blocked, to_blocked

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LAYOUTS = ("compact", "blocked")


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _row_amax(t: torch.Tensor) -> torch.Tensor:
    """Row-wise amax of a non-negative (R, C) tensor; 0 for rows of no elements."""
    return t.amax(dim=1) if t.shape[1] else t.new_zeros(t.shape[0])


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized tensor: data, block scales and (NVFP4) per-tensor scales.

    ``shape`` is the logical shape of the tensor that was quantized; ``axis``
    is -1 (rowwise) or the blocked dim (0 for 2-D, 1 for 3-D). ``layout`` says
    how ``scale`` is stored: "compact" (see the module table) or "blocked"
    (the 128x4 layout of grouped.scale_layout, one flat run per matrix).
    """

    data: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None
    fmt: Format
    axis: int
    shape: torch.Size
    split_sizes: tuple[int, ...] | None = None
    layout: str = "compact"

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def columnwise(self) -> bool:
        return self.axis != -1

    @property
    def compact_scale_shape(self) -> tuple[int, ...]:
        *lead, n = self.data.shape
        return (*lead, n * self.fmt.elements_per_byte // self.fmt.block_size)

    def compact_scale(self) -> torch.Tensor:
        if self.layout == "compact":
            return self.scale
        *lead, rows, cols = self.compact_scale_shape
        return from_blocked(self.scale, rows, cols)

    def with_layout(self, layout: str) -> "QuantizedTensor":
        """The same tensor with its scales in another layout (a new scale tensor)."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == self.layout:
            return self
        scale = to_blocked(self.scale) if layout == "blocked" else self.compact_scale()
        return replace(self, scale=scale, layout=layout)

    def dequantize(self) -> torch.Tensor:
        """fp32 tensor of ``shape``: the values the quantized data stands for."""
        geometry = _Geometry(self.shape, self.axis, self.split_sizes, self.fmt)
        s = geometry.broadcast_global_scale(self.global_scale, self.device)
        stored = self.fmt.dequantize_blocks(self.data, self.compact_scale(), s)
        return geometry.restore(stored)


@dataclass(frozen=True)
class _Geometry:
    """How x maps onto the stored (blocked-dim-last) tensor, and back."""

    shape: torch.Size
    axis: int
    split_sizes: tuple[int, ...] | None
    fmt: Format

    @property
    def padded_splits(self) -> list[int]:
        return [_ceil_to(m, self.fmt.block_size) for m in self.split_sizes]

    def _padded_rows(self, device) -> torch.Tensor:
        """For each real row of x (grouped, columnwise): its row in the padded layout."""
        starts, rows, padded_start = [], [], 0
        for m, p in zip(self.split_sizes, self.padded_splits):
            starts.append(padded_start)
            rows.append(m)
            padded_start += p
        return torch.repeat_interleave(
            torch.tensor(starts, dtype=torch.int64), torch.tensor(rows, dtype=torch.int64)
        ).to(device) + self._local_row_index(device)

    def _local_row_index(self, device) -> torch.Tensor:
        total = sum(self.split_sizes)
        offsets = torch.tensor([0, *self.split_sizes], dtype=torch.int64).cumsum(0)[:-1]
        group_start = torch.repeat_interleave(offsets, torch.tensor(self.split_sizes))
        return (torch.arange(total) - group_start).to(device)

    def _row_group(self, device) -> torch.Tensor:
        groups = torch.arange(len(self.split_sizes))
        return torch.repeat_interleave(groups, torch.tensor(self.split_sizes)).to(device)

    def to_stored(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 x -> contiguous fp32 tensor with the blocked dim last."""
        if self.split_sizes is not None:
            total = sum(self.split_sizes)
            if self.axis == 0:
                padded = x.new_zeros((sum(self.padded_splits), x.shape[1]))
                padded[self._padded_rows(x.device)] = x[:total]
                return padded.t().contiguous()
            if total < x.shape[0]:
                x = torch.cat((x[:total], x.new_zeros((x.shape[0] - total, x.shape[1]))))
        if self.axis == -1:
            return x.contiguous()
        return x.transpose(self.axis, -1).contiguous()

    def restore(self, stored: torch.Tensor) -> torch.Tensor:
        """Inverse of to_stored: stored fp32 -> x's shape."""
        if self.axis == -1:
            return stored
        if self.split_sizes is None:
            return stored.transpose(self.axis, -1).contiguous()
        out = stored.new_zeros(self.shape)
        out[: sum(self.split_sizes)] = stored.t()[self._padded_rows(stored.device)]
        return out

    def global_amax(self, x: torch.Tensor) -> torch.Tensor:
        """amax of |x| over finite values: 0-d, or one per group / expert (0 when empty)."""
        finite = torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x))
        if x.dim() == 3:
            return _row_amax(finite.flatten(1))
        if self.split_sizes is None:
            return _row_amax(finite.reshape(1, -1))[0]
        row_amax = _row_amax(finite[: sum(self.split_sizes)])
        amax = finite.new_zeros(len(self.split_sizes))
        return amax.scatter_reduce(0, self._row_group(x.device), row_amax, "amax")

    def broadcast_global_scale(self, s: torch.Tensor | None, device) -> torch.Tensor | None:
        """S shaped to broadcast against the stored tensor's blocks (Format.quantize_blocks)."""
        if s is None or s.dim() == 0:
            return s
        if len(self.shape) == 3:
            return s.reshape(-1, 1, 1)
        if self.axis == -1:
            rows = torch.ones(self.shape[0], dtype=s.dtype, device=device)
            rows[: sum(self.split_sizes)] = s[self._row_group(device)]
            return rows.unsqueeze(1)
        blocks_per_group = torch.tensor(self.padded_splits) // self.fmt.block_size
        return s.repeat_interleave(blocks_per_group.to(device)).unsqueeze(0)


def _normalize_axis(axis, ndim: int) -> int:
    allowed = {2: {-1: -1, 1: -1, 0: 0, -2: 0}, 3: {-1: -1, 2: -1, 1: 1, -2: 1}}[ndim]
    if isinstance(axis, bool) or not isinstance(axis, int) or axis not in allowed:
        raise ValueError(
            f"quantize: axis must be one of {sorted(allowed)} for a {ndim}-D tensor "
            f"(-1 rowwise, {1 if ndim == 3 else 0} columnwise), got {axis!r}"
        )
    return allowed[axis]


def split_sizes_to_list(split_sizes, *, rows: int, argument: str = "split_sizes") -> tuple[int, ...]:
    """Validate split sizes (list or 1-D int tensor) against ``rows``; host ints.

    A CUDA tensor is copied to the host (a sync).
    """
    if isinstance(split_sizes, torch.Tensor):
        if split_sizes.dim() != 1 or split_sizes.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{argument} must be a 1-D int32/int64 tensor or a list of ints, got a tensor "
                f"of shape {tuple(split_sizes.shape)} and dtype {split_sizes.dtype}"
            )
        sizes = tuple(split_sizes.tolist())
    elif isinstance(split_sizes, (list, tuple)) and all(type(m) is int for m in split_sizes):
        sizes = tuple(split_sizes)
    else:
        raise ValueError(f"{argument} must be a list of ints or a 1-D int tensor, got {split_sizes!r}")
    if sizes and min(sizes) < 0:
        raise ValueError(f"{argument} must be non-negative, got {list(sizes)}")
    if sum(sizes) > rows:
        raise ValueError(f"{argument} sum to {sum(sizes)}, past the {rows} rows of the tensor")
    return sizes


def quantize(
    x: torch.Tensor,
    fmt: str | Format,
    *,
    axis: int = -1,
    split_sizes: Sequence[int] | torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize x to MXFP8 or NVFP4 with blocks along ``axis`` (see the module doc)."""
    fmt = get_format(fmt)
    if not fmt.quantized:
        raise ValueError(f"quantize: fmt must be a block-scaled format (mxfp8, nvfp4), got {fmt.name}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"quantize: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(f"quantize: x must be bf16, fp16 or fp32, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"quantize: x must be 2-D (tokens) or 3-D (G, N, K weights), got shape {tuple(x.shape)}")
    axis = _normalize_axis(axis, x.dim())
    sizes = None
    if split_sizes is not None:
        if x.dim() != 2:
            raise ValueError("quantize: split_sizes applies to a 2-D token tensor; a 3-D weight is per expert already")
        sizes = split_sizes_to_list(split_sizes, rows=x.shape[0])
    geometry = _Geometry(x.shape, axis, sizes, fmt)
    blocked_len = x.shape[axis] if sizes is None or axis != 0 else sum(geometry.padded_splits)
    if blocked_len % fmt.block_size:
        hint = "; pass split_sizes to zero-pad each group" if axis == 0 else ""
        raise ValueError(
            f"quantize: the blocked dim (axis {axis}) of x has {x.shape[axis]} elements, "
            f"not a multiple of the {fmt.name} block size {fmt.block_size}{hint}"
        )
    xf = x.float()
    global_scale = fmt.global_scale(geometry.global_amax(xf)) if fmt.has_global_scale else None
    s = geometry.broadcast_global_scale(global_scale, x.device)
    data, scale = fmt.quantize_blocks(geometry.to_stored(xf), s)
    return QuantizedTensor(data, scale, global_scale, fmt, axis, x.shape, sizes)
