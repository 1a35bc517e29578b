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
Inputs may be bf16, fp16 or fp32, any strides. On a Hopper GPU with the CuTe DSL toolchain the bytes come from the
kernels of cute_backend/quantize.py (one launch per direction; NVFP4's S from
torch ops); elsewhere from the torch reference here, which they match bit for
bit. Split sizes given as a GPU tensor are read to the host here (a sync).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from . import kernels
from .buffers import ceil_to
from .formats import Format, get_format
from .scale_layout import from_blocked, to_blocked

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KERNEL_INPUT_DTYPES = (torch.bfloat16, torch.float32)  # what the quantize kernels read (fp16 goes as fp32, exactly)
LAYOUTS = ("compact", "blocked")


def finite_row_amax(t: torch.Tensor) -> torch.Tensor:
    """Row-wise amax of |t| over finite values for an (R, C) tensor, in t's dtype; 0 for empty rows.

    NaN and Inf count as 0, so one bad value does not decide NVFP4's per-tensor scale.
    """
    finite = t.abs().nan_to_num_(nan=0.0, posinf=0.0)  # in t's dtype: no fp32 copy
    return finite.amax(dim=1) if t.shape[1] else finite.new_zeros(t.shape[0])


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
        return [ceil_to(m, self.fmt.block_size) for m in self.split_sizes]

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
        if x.dim() == 3:
            return finite_row_amax(x.flatten(1))
        if self.split_sizes is None:
            return finite_row_amax(x.reshape(1, -1))[0]
        row_amax = finite_row_amax(x[: sum(self.split_sizes)])
        amax = row_amax.new_zeros(len(self.split_sizes))
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
    if torch.compiler.is_compiling():  # one grouped::quantize op in the graph (grouped/custom_ops.py)
        from .custom_ops import quantize_in_graph

        return quantize_in_graph(x, fmt, axis=axis, split_sizes=sizes)
    on_gpu = kernels.usable(x)
    if on_gpu:
        try:
            data, scale, global_scale = _quantize_on_gpu(x, geometry)
        except Exception as e:
            if not kernels.fall_back(e):
                raise
            on_gpu = False
    if not on_gpu:
        global_scale = fmt.global_scale(geometry.global_amax(x)) if fmt.has_global_scale else None
        s = geometry.broadcast_global_scale(global_scale, x.device)
        data, scale = fmt.quantize_blocks(geometry.to_stored(x.float()), s)
    return QuantizedTensor(data, scale, global_scale, fmt, axis, x.shape, sizes)


@functools.lru_cache(maxsize=None)
def kernel_facts(fmt: Format):
    """What cute_backend's kernels compile in about fmt (they import nothing from grouped)."""
    from cute_backend.facts import FormatFacts

    from . import elements as el
    from .formats import _NVFP4_AMAX_TO_S

    return FormatFacts(
        fmt.name, fmt.block_size, fmt.elements_per_byte, e4m3_max=el.E4M3_MAX, e2m1_max=el.E2M1_MAX,
        amax_to_s=_NVFP4_AMAX_TO_S,
        nan_scale=el.E4M3_NAN_BYTE if fmt.scale_dtype == torch.float8_e4m3fn else el.E8M0_NAN,
        nan_element=el.E4M3_NAN_BYTE if fmt.data_dtype == torch.float8_e4m3fn else 0,  # NVFP4: zero codes
        e2m1_values=el.E2M1_VALUES if fmt.elements_per_byte == 2 else (),
    )


def _quantize_on_gpu(x: torch.Tensor, geometry: _Geometry):
    """(data, scale, global_scale): the reference's bytes, from the CuTe DSL kernels (cute_backend.quantize)."""
    from cute_backend import quantize as kernel

    fmt, axis, sizes = geometry.fmt, geometry.axis, geometry.split_sizes
    facts = kernel_facts(fmt)
    block, epb = fmt.block_size, fmt.elements_per_byte
    if x.dtype not in KERNEL_INPUT_DTYPES:
        x = x.float()  # fp16 -> fp32 is exact
    rows = x.contiguous().reshape(-1, x.shape[-1])  # (R, K): a 3-D weight's experts stacked
    k = rows.shape[1]
    s = global_scale = None
    if fmt.has_global_scale:  # one S a member (expert / group / the whole tensor), from one amax pass
        members = [x.shape[1]] * x.shape[0] if x.dim() == 3 else list(sizes or [x.shape[0]])
        s = torch.empty(len(members), dtype=torch.float32, device=x.device)
        table = kernel.group_table(members, facts, device=x.device, data_row_bytes=0, scale_row_bytes=0)
        kernel.group_amax(rows, facts, table, s)
        global_scale = s if x.dim() == 3 or sizes is not None else s.reshape(())
    if axis == -1:
        total = rows.shape[0] if sizes is None else sum(sizes)
        data = torch.empty(*x.shape[:-1], k // epb, dtype=fmt.data_dtype, device=x.device)
        scale = torch.empty(*x.shape[:-1], k // block, dtype=fmt.scale_dtype, device=x.device)
        data.view(torch.uint8)[total:].zero_()  # rows past the groups (2-D with split_sizes)
        scale.view(torch.uint8)[total:].zero_()
        row_scale = None
        if s is not None:  # each row's member S
            per_row = [rows.shape[0] // s.numel()] * s.numel() if sizes is None else list(sizes)
            row_scale = s.repeat_interleave(torch.tensor(per_row, device=x.device), output_size=total)
        kernel.quantize_rowwise(rows[:total], facts, data.view(-1, k // epb)[:total],
                                scale.view(-1, k // block)[:total], row_scale)
        return data, scale, global_scale
    if x.dim() == 3:  # blocks along N, per expert: expert g's (K, N) at its own offset
        g, n = x.shape[0], x.shape[1]
        data = torch.empty(g, k, n // epb, dtype=fmt.data_dtype, device=x.device)
        scale = torch.empty(g, k, n // block, dtype=fmt.scale_dtype, device=x.device)
        groups = kernel.group_table([n] * g, facts, device=x.device,
                                    data_offsets=[i * k * n // epb for i in range(g)], data_strides=n // epb,
                                    scale_offsets=[i * k * n // block for i in range(g)], scale_strides=n // block)
    else:  # one (K, P) matrix, groups zero-padded to the block
        group_sizes = [x.shape[0]] if sizes is None else list(sizes)
        padded = sum(geometry.padded_splits) if sizes is not None else x.shape[0]
        data = torch.empty(k, padded // epb, dtype=fmt.data_dtype, device=x.device)
        scale = torch.empty(k, padded // block, dtype=fmt.scale_dtype, device=x.device)
        groups = kernel.group_table(group_sizes, facts, device=x.device,
                                    data_row_bytes=padded // epb, scale_row_bytes=padded // block)
    kernel.quantize_columnwise(rows, facts, data, scale, groups, s)
    return data, scale, global_scale
