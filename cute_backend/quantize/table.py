"""group_table: the (G, TABLE_COLS) int64 group table of the columnwise and one-pass kernels."""

from __future__ import annotations

from typing import Sequence

import torch

from .checks import check_format
from .config import (
    BLOCK_START,
    DATA_ALIGN,
    DATA_OFFSET,
    DATA_STRIDE,
    ROW_START,
    ROWS,
    SCALE_OFFSET,
    SCALE_STRIDE,
    TABLE_COLS,
)


def _per_group(value, n: int, device, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.shape != (n,):
            raise ValueError(f"group_table: {name} must have {n} entries, got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=torch.int64)
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.full((n,), value, dtype=torch.int64, device=device)
    if isinstance(value, Sequence) and len(value) == n and all(isinstance(v, int) for v in value):
        return torch.tensor(list(value), dtype=torch.int64).to(device)
    raise ValueError(f"group_table: {name} must be an int, a list of {n} ints or a ({n},) tensor, got {value!r:.80}")


def _split_sizes(split_sizes, device) -> torch.Tensor:
    """The split sizes as an int64 tensor, on the device of a tensor given (no sync) or on ``device``."""
    if isinstance(split_sizes, torch.Tensor):
        if split_sizes.dim() != 1 or split_sizes.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"group_table: split_sizes must be a 1-D int32/int64 tensor, got {tuple(split_sizes.shape)} "
                f"{split_sizes.dtype}"
            )
        return split_sizes.to(device=device or split_sizes.device, dtype=torch.int64)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in split_sizes):
        raise ValueError(f"group_table: split_sizes must be non-negative ints, got {split_sizes!r:.80}")
    return torch.tensor(list(split_sizes), dtype=torch.int64).to(device or "cpu")


def group_table(split_sizes, fmt, *, data_row_bytes: int | None = None, scale_row_bytes: int | None = None,
                data_offsets=None, data_strides=None, scale_offsets=None, scale_strides=None, row_starts=None,
                device=None) -> torch.Tensor:
    """The (G, TABLE_COLS) int64 group table of quantize_columnwise (see the package doc).

    split_sizes: a 1-D int tensor (kept on its device: no sync) or a list of ints.
    Defaults: groups are consecutive rows of x (ROW_START the prefix sum),
    data / scale offsets the padded prefix of one (K, P) matrix; pass
    ``data_row_bytes`` (= P / epb) and ``scale_row_bytes`` (= P / block) for it.
    Each of data_offsets, data_strides, scale_offsets, scale_strides,
    row_starts overrides the default with an int, a list or a (G,) tensor.
    """
    reason = check_format(fmt)
    if reason:
        raise ValueError(f"group_table: {reason}")
    block, epb, align = fmt.block_size, fmt.elements_per_byte, DATA_ALIGN[fmt.name]
    m = _split_sizes(split_sizes, device)
    n = m.shape[0]
    for name, value in (("data_offsets", data_offsets), ("data_strides", data_strides),
                        ("data_row_bytes", data_row_bytes)):
        host = [value] if isinstance(value, int) else value
        if isinstance(host, Sequence) and any(v % align for v in host):
            raise ValueError(f"group_table: {fmt} {name} must be multiples of {align} bytes, got {value}")
    if data_strides is None and data_row_bytes is None:
        raise ValueError("group_table: give data_strides or data_row_bytes")
    if scale_strides is None and scale_row_bytes is None:
        raise ValueError("group_table: give scale_strides or scale_row_bytes")

    def given(value, name):
        return _per_group(value, n, m.device, name)

    n_blocks = torch.div(m + (block - 1), block, rounding_mode="floor")
    block_start = torch.cumsum(n_blocks, 0) - n_blocks
    columns = [torch.zeros_like(m)] * TABLE_COLS
    columns[ROW_START] = torch.cumsum(m, 0) - m if row_starts is None else given(row_starts, "row_starts")
    columns[ROWS] = m
    columns[BLOCK_START] = block_start
    columns[DATA_OFFSET] = block_start * (block // epb) if data_offsets is None else given(data_offsets, "data_offsets")
    columns[DATA_STRIDE] = given(data_row_bytes if data_strides is None else data_strides, "data_strides")
    columns[SCALE_OFFSET] = block_start if scale_offsets is None else given(scale_offsets, "scale_offsets")
    columns[SCALE_STRIDE] = given(scale_row_bytes if scale_strides is None else scale_strides, "scale_strides")
    return torch.stack(columns, dim=1).contiguous()
