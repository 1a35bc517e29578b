"""Scale layouts: compact (row-major, one byte a block) and blocked 128x4.

The blocked layout is the one Blackwell block-scaled MMA, cuBLAS and cuDNN
frontend read. The (rows, cols) scale matrix (cols = blocks along the
contraction dim) is zero-padded to multiples of (128, 4), cut into 128x4 tiles
stored tile-row-major (all tiles of the first 128 rows, then the next), and
inside a tile the byte for (r, c) sits at offset (r % 32) * 16 + (r // 32) * 4 + c.

Both directions are pure permutations (plus padding), so they are exact.
"""

from __future__ import annotations

import torch

from .buffers import ceil_to

TILE_ROWS, TILE_COLS = 128, 4


def blocked_numel(rows: int, cols: int) -> int:
    """Bytes a (rows, cols) scale matrix takes in the blocked layout."""
    return ceil_to(rows, TILE_ROWS) * ceil_to(cols, TILE_COLS)


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """(..., rows, cols) compact scales -> (..., blocked_numel(rows, cols)) blocked bytes.

    Leading dims are batch dims (one matrix per expert); the dtype is kept.
    """
    if scales.dim() < 2 or scales.element_size() != 1:
        raise ValueError(
            f"to_blocked: scales must be a (..., rows, cols) tensor of 1-byte elements, "
            f"got shape {tuple(scales.shape)} dtype {scales.dtype}"
        )
    *batch, rows, cols = scales.shape
    rows_p, cols_p = ceil_to(rows, TILE_ROWS), ceil_to(cols, TILE_COLS)
    padded = scales.new_zeros((*batch, rows_p, cols_p), dtype=torch.uint8)
    padded[..., :rows, :cols] = scales.view(torch.uint8)
    # row = tile_r*128 + hi*32 + lo, col = tile_c*4 + c  ->  [tile_r, tile_c, lo, hi, c]
    tiles = padded.reshape(*batch, rows_p // 128, 4, 32, cols_p // 4, 4)
    n = len(batch)
    order = [*range(n), n + 0, n + 3, n + 2, n + 1, n + 4]
    blocked = tiles.permute(order).reshape(*batch, rows_p * cols_p)
    return blocked.view(scales.dtype)


def from_blocked(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of to_blocked: (..., blocked_numel(rows, cols)) -> (..., rows, cols)."""
    rows_p, cols_p = ceil_to(rows, TILE_ROWS), ceil_to(cols, TILE_COLS)
    if blocked.dim() < 1 or blocked.shape[-1] != rows_p * cols_p or blocked.element_size() != 1:
        raise ValueError(
            f"from_blocked: blocked must be (..., {rows_p * cols_p}) 1-byte elements for "
            f"rows={rows}, cols={cols}, got shape {tuple(blocked.shape)} dtype {blocked.dtype}"
        )
    *batch, _ = blocked.shape
    tiles = blocked.view(torch.uint8).reshape(*batch, rows_p // 128, cols_p // 4, 32, 4, 4)
    n = len(batch)
    order = [*range(n), n + 0, n + 3, n + 2, n + 1, n + 4]  # [tile_r, hi, lo, tile_c, c]
    compact = tiles.permute(order).reshape(*batch, rows_p, cols_p)[..., :rows, :cols]
    return compact.contiguous().view(blocked.dtype)
