"""Tests for grouped.scale_layout: compact <-> blocked 128x4 scale layouts (CPU).

The reference below is written independently of the library, with explicit
Python loops, straight from the rule in docs/design.md ("Numerics", "Storage"): pad the
(rows, cols) scale matrix to multiples of (128, 4), cut it into 128x4 tiles laid
out tile-row-major, and inside a tile put the byte for (r, c) at offset
(r % 32) * 16 + (r // 32) * 4 + c.
"""

import pytest
import torch

import grouped
from grouped.scale_layout import blocked_numel

SHAPES = [
    (128, 4),
    (256, 8),
    (1, 1),
    (127, 3),
    (129, 5),
    (300, 7),
    (32, 12),
    (64, 2),
    (0, 4),
    (0, 0),
    (5, 0),
]
DTYPES = [torch.uint8, torch.float8_e4m3fn]


def _ceil_to(n, m):
    return -(-n // m) * m


def _ref_to_blocked_2d(s: torch.Tensor) -> torch.Tensor:
    """Explicit-loop reference: (rows, cols) uint8 -> flat blocked uint8 bytes."""
    rows, cols = s.shape
    rows_p, cols_p = _ceil_to(rows, 128), _ceil_to(cols, 4)
    tiles_per_row = cols_p // 4
    out = [0] * (rows_p * cols_p)
    values = s.tolist()
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * tiles_per_row + (c // 4)
            rr, cc = r % 128, c % 4
            out[tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + cc] = values[r][c]
    return torch.tensor(out, dtype=torch.uint8)


def _ref_to_blocked(s: torch.Tensor) -> torch.Tensor:
    """Reference over any number of leading batch dims (loops over the batch)."""
    s8 = s.view(torch.uint8)
    *batch, rows, cols = s8.shape
    count = 1
    for b in batch:
        count *= b
    flat = s8.reshape(count, rows, cols)
    outs = [_ref_to_blocked_2d(flat[i]) for i in range(flat.shape[0])]
    n = _ceil_to(rows, 128) * _ceil_to(cols, 4)
    if outs:
        stacked = torch.stack(outs)
    else:
        stacked = torch.zeros((0, n), dtype=torch.uint8)
    return stacked.reshape(*batch, n)


def _random_scales(gen, shape, dtype) -> torch.Tensor:
    """Random nonzero bytes (so padding zeros are distinguishable), viewed as dtype."""
    b = torch.randint(1, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    return b.view(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES, ids=["uint8", "e4m3"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_to_blocked_matches_loop_reference(gen, shape, dtype):
    s = _random_scales(gen, shape, dtype)
    out = grouped.to_blocked(s)
    assert out.dtype == dtype
    assert out.shape == (blocked_numel(*shape),)
    assert out.shape == (_ceil_to(shape[0], 128) * _ceil_to(shape[1], 4),)
    assert torch.equal(_bytes(out), _ref_to_blocked(s))


@pytest.mark.parametrize("dtype", DTYPES, ids=["uint8", "e4m3"])
@pytest.mark.parametrize("batch", [(1,), (3,), (2, 3), (0,)], ids=lambda b: "x".join(map(str, b)))
@pytest.mark.parametrize("shape", [(129, 5), (128, 4), (7, 9)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_to_blocked_batched_matches_reference(gen, batch, shape, dtype):
    s = _random_scales(gen, (*batch, *shape), dtype)
    out = grouped.to_blocked(s)
    assert out.dtype == dtype
    assert out.shape == (*batch, blocked_numel(*shape))
    assert torch.equal(_bytes(out), _ref_to_blocked(s))
    # Each batch member is blocked on its own: equal to to_blocked of the member.
    count = 1
    for b in batch:
        count *= b
    flat_in = s.reshape(count, *shape)
    flat_out = out.reshape(count, out.shape[-1])
    for i in range(flat_in.shape[0]):
        assert torch.equal(_bytes(flat_out[i]), _bytes(grouped.to_blocked(flat_in[i])))


@pytest.mark.parametrize("dtype", DTYPES, ids=["uint8", "e4m3"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trip_exact(gen, shape, dtype):
    s = _random_scales(gen, shape, dtype)
    back = grouped.from_blocked(grouped.to_blocked(s), *shape)
    assert back.dtype == dtype
    assert back.shape == s.shape
    assert torch.equal(_bytes(back), _bytes(s))


@pytest.mark.parametrize("dtype", DTYPES, ids=["uint8", "e4m3"])
@pytest.mark.parametrize("batch", [(4,), (2, 3)], ids=lambda b: "x".join(map(str, b)))
def test_round_trip_batched(gen, batch, dtype):
    shape = (131, 6)
    s = _random_scales(gen, (*batch, *shape), dtype)
    back = grouped.from_blocked(grouped.to_blocked(s), *shape)
    assert back.shape == s.shape and back.dtype == dtype
    assert torch.equal(_bytes(back), _bytes(s))


@pytest.mark.parametrize("shape", [(1, 1), (127, 3), (129, 5), (300, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_from_blocked_matches_loop_inverse(gen, shape):
    """from_blocked of arbitrary blocked bytes equals an explicit-loop gather."""
    rows, cols = shape
    n = blocked_numel(rows, cols)
    blocked = torch.randint(0, 256, (n,), generator=gen, dtype=torch.int32).to(torch.uint8)
    tiles_per_row = _ceil_to(cols, 4) // 4
    flat = blocked.tolist()
    expected = [
        [
            flat[((r // 128) * tiles_per_row + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4]
            for c in range(cols)
        ]
        for r in range(rows)
    ]
    out = grouped.from_blocked(blocked, rows, cols)
    assert out.tolist() == expected


@pytest.mark.parametrize("shape", [(1, 1), (127, 3), (129, 5), (300, 7), (128, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_padding_bytes_are_zero(gen, shape):
    rows, cols = shape
    s = _random_scales(gen, shape, torch.uint8)  # every real byte is nonzero
    out = grouped.to_blocked(s)
    # Exactly rows*cols nonzero bytes: the padding is zero and nothing is duplicated.
    assert int((out != 0).sum()) == rows * cols
    assert torch.equal(out[out != 0].sort().values, s.flatten().sort().values)
    # Padding positions, computed from the rule, hold zero.
    real = set()
    tiles_per_row = _ceil_to(cols, 4) // 4
    for r in range(rows):
        for c in range(cols):
            real.add(((r // 128) * tiles_per_row + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4)
    pad = [i for i in range(out.numel()) if i not in real]
    assert all(v == 0 for v in out[pad].tolist())


def test_first_tile_positions():
    """Spot checks of the in-tile offset rule on hand-picked coordinates."""
    s = torch.zeros((256, 8), dtype=torch.uint8)
    marks = {(0, 0): 1, (1, 0): 2, (32, 0): 3, (0, 1): 4, (33, 3): 5, (127, 3): 6, (0, 4): 7, (128, 0): 8, (255, 7): 9}
    for (r, c), v in marks.items():
        s[r, c] = v
    out = grouped.to_blocked(s)
    expected_offset = {
        1: 0,
        2: 16,
        3: 4,
        4: 1,
        5: 1 * 16 + 1 * 4 + 3,
        6: 31 * 16 + 3 * 4 + 3,
        7: 512,  # second tile of the first tile-row
        8: 2 * 512,  # first tile of the second tile-row
        9: 3 * 512 + 31 * 16 + 3 * 4 + 3,
    }
    for v, off in expected_offset.items():
        assert int(out[off]) == v, (v, off)
    assert int((out != 0).sum()) == len(marks)


@pytest.mark.parametrize("dtype", DTYPES, ids=["uint8", "e4m3"])
def test_non_contiguous_input(gen, dtype):
    base = _random_scales(gen, (9, 130), dtype)
    s = base.t()  # (130, 9), non-contiguous
    assert not s.is_contiguous()
    assert torch.equal(_bytes(grouped.to_blocked(s)), _bytes(grouped.to_blocked(s.contiguous())))
    sliced = _random_scales(gen, (260, 14), dtype)[::2, 1::2]  # (130, 7), strided
    assert torch.equal(_bytes(grouped.to_blocked(sliced)), _ref_to_blocked(sliced.contiguous()))
    blocked = grouped.to_blocked(s.contiguous())
    padded = torch.zeros((2, blocked.numel()), dtype=torch.uint8)
    padded[0] = _bytes(blocked)
    strided_blocked = padded.t()[:, 0].view(dtype)  # a strided 1-D view
    assert torch.equal(_bytes(grouped.from_blocked(strided_blocked, 130, 9)), _bytes(s.contiguous()))


def test_inputs_unchanged(gen):
    s = _random_scales(gen, (129, 5), torch.uint8)
    keep = s.clone()
    blocked = grouped.to_blocked(s)
    keep_b = blocked.clone()
    grouped.from_blocked(blocked, 129, 5)
    assert torch.equal(s, keep)
    assert torch.equal(blocked, keep_b)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(8, dtype=torch.uint8),  # 1-D
        torch.tensor(3, dtype=torch.uint8),  # 0-D
        torch.zeros((4, 4), dtype=torch.bfloat16),
        torch.zeros((4, 4), dtype=torch.float16),
        torch.zeros((4, 4), dtype=torch.int16),
        torch.zeros((4, 4), dtype=torch.float32),
        torch.zeros((2, 4, 4), dtype=torch.int32),
    ],
    ids=["1d", "0d", "bf16", "fp16", "int16", "fp32", "int32-3d"],
)
def test_to_blocked_bad_input(bad):
    with pytest.raises(ValueError, match="to_blocked"):
        grouped.to_blocked(bad)


@pytest.mark.parametrize(
    "bad, rows, cols",
    [
        (torch.zeros(512, dtype=torch.uint8), 129, 4),  # needs 1024
        (torch.zeros(513, dtype=torch.uint8), 1, 1),  # needs 512
        (torch.zeros(0, dtype=torch.uint8), 1, 1),
        (torch.zeros(512, dtype=torch.bfloat16), 1, 1),  # 2-byte dtype
        (torch.zeros(512, dtype=torch.int16), 1, 1),
        (torch.tensor(0, dtype=torch.uint8), 0, 0),  # 0-D
        (torch.zeros((3, 511), dtype=torch.uint8), 128, 4),  # batched, wrong length
    ],
    ids=["short", "long", "empty", "bf16", "int16", "0d", "batched-short"],
)
def test_from_blocked_bad_input(bad, rows, cols):
    with pytest.raises(ValueError, match="from_blocked"):
        grouped.from_blocked(bad, rows, cols)
