"""MXFP8 / NVFP4 quantize kernels (cute_backend.quantize) against grouped.quantize, bit for bit.

Every test draws fresh data on the CPU (the `gen` fixture), computes the torch
reference on the CPU and runs the kernels on the same values on CUDA; the
stored bytes (data and scales) must be identical. The data mixes what breaks
quantizers: blocks whose values span 2^+-40, all-zero blocks, signed zeros,
subnormals, NaN and +-Inf, values at 448 and at the E2M1 midpoints.

The last tests (group table, argument checks that need no GPU) run everywhere.
"""

import pytest
import torch
from conftest import kernels_unavailable

import grouped
from grouped import kernels
from grouped.formats import NVFP4, get_format
from grouped.quantize import kernel_facts

gpu = pytest.mark.gpu

BLOCK = {"mxfp8": 32, "nvfp4": 16}
EPB = {"mxfp8": 1, "nvfp4": 2}
DTYPES = [torch.bfloat16, torch.float32]
DTYPE_IDS = ["bf16", "fp32"]
fmt_param = pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
E2M1_MIDPOINTS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
SPLITS = [
    [5, 0, 37, 1, 64],
    [0, 0, 0],
    [32],
    [1],
    [0, 17, 0],
    [16, 48, 31, 33, 0, 2],
]


def facts(name):
    """The FormatFacts grouped hands the kernels for a format name."""
    return kernel_facts(get_format(name))


def _qk():
    """The kernel module, or skip with the reason the kernels cannot run here."""
    reason = kernels.unavailable("cuda", torch.cuda.get_device_capability())
    if reason:
        kernels_unavailable(reason)
    from cute_backend import quantize

    return quantize


# ----------------------------------------------------------------------------- data


def special(gen, rows, cols, *, specials=True):
    """fp32 (rows, cols) on the CPU: wide magnitudes with every awkward value sprinkled in."""
    x = torch.randn(rows, cols, generator=gen)
    if rows == 0 or cols == 0:
        return x
    # a binade per 8x8 tile (so row- and column-blocks both see jumps) plus a wide per-element spread
    tile = torch.randint(-40, 41, (-(-rows // 8), -(-cols // 8)), generator=gen).float()
    tile = tile.repeat_interleave(8, 0)[:rows].repeat_interleave(8, 1)[:, :cols]
    spread = torch.randint(-6, 7, (rows, cols), generator=gen).float()
    wide = torch.rand(rows, cols, generator=gen) < 0.02  # a few elements anywhere in 2^+-40
    spread = torch.where(wide, torch.randint(-40, 41, (rows, cols), generator=gen).float() - tile, spread)
    x = x * torch.exp2(tile + spread)
    if not specials:
        return x

    def spots(p):
        return torch.rand(rows, cols, generator=gen) < p

    # all-zero 16x16 tiles (zero blocks in either direction)
    zero_tile = (torch.rand(-(-rows // 16), -(-cols // 16), generator=gen) < 0.1)
    zero_tile = zero_tile.repeat_interleave(16, 0)[:rows].repeat_interleave(16, 1)[:, :cols]
    x = torch.where(zero_tile, torch.zeros_like(x), x)
    x = torch.where(spots(0.02), torch.full_like(x, -0.0), x)
    sub = torch.randint(1, 2**23, (rows, cols), generator=gen, dtype=torch.int32).view(torch.float32)
    x = torch.where(spots(0.02), sub * torch.where(spots(0.5), -1.0, 1.0), x)  # fp32 subnormals
    x = torch.where(spots(0.005), torch.full_like(x, 448.0), x)
    x = torch.where(spots(0.005), torch.full_like(x, -464.0), x)
    mids = torch.tensor(E2M1_MIDPOINTS + [-m for m in E2M1_MIDPOINTS])
    pick = mids[torch.randint(0, len(mids), (rows, cols), generator=gen)]
    x = torch.where(spots(0.01), pick, x)
    x = torch.where(spots(0.001), torch.full_like(x, float("nan")), x)
    x = torch.where(spots(0.001), torch.full_like(x, float("inf")), x)
    x = torch.where(spots(0.001), torch.full_like(x, float("-inf")), x)
    return x


def subnormal_rows(gen, rows, cols):
    """Rows of fp32 subnormals only (NVFP4: a member this small has S capped at the fp32 max)."""
    bits = torch.randint(1, 2**23, (rows, cols), generator=gen, dtype=torch.int32)
    x = bits.view(torch.float32)
    return torch.where(torch.rand(rows, cols, generator=gen) < 0.5, -x, x)


def midpoint_rows(gen, rows, cols, block):
    """Blocks of amax 6 (or 3) and E2M1 midpoints: with S = 448 the codes see exact ties."""
    mids = torch.tensor(E2M1_MIDPOINTS + [0.0, -0.0, 0.5, 1.0, 6.0])
    x = mids[torch.randint(0, len(mids), (rows, cols), generator=gen)]
    x = x * torch.where(torch.rand(rows, cols, generator=gen) < 0.5, -1.0, 1.0)
    x.view(rows, cols // block, block)[..., 0] = 6.0
    half = torch.rand(rows, cols // block, generator=gen) < 0.3  # amax 3: d = 224, r = 2
    x.view(rows, cols // block, block).mul_(torch.where(half, 0.5, 1.0).unsqueeze(-1))
    x[0, 0] = 6.0  # the tensor amax stays 6 (S = 448)
    return x


# ----------------------------------------------------------------------------- helpers


def as_bytes(t):
    return t.contiguous().view(torch.uint8).cpu()


def assert_same_bytes(got, want, what):
    g, w = as_bytes(got), as_bytes(want)
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    diff = (g != w).nonzero()
    if len(diff):
        first = [tuple(i.tolist()) for i in diff[:6]]
        pairs = [(hex(g[i].item()), hex(w[i].item())) for i in first]
        raise AssertionError(f"{what}: {len(diff)} of {g.numel()} bytes differ, first at {first}: (got, want) {pairs}")


def assert_same_quantized(data, scale, ref):
    """The kernel's data and scale bytes equal those of the reference QuantizedTensor."""
    assert_same_bytes(data, ref.data, "data")
    assert_same_bytes(scale, ref.scale, "scale")


def zeroed_outputs(qk, fmt, rows, k):
    """Zeroed CUDA data and scale buffers of fmt for (rows, k) quantized rowwise."""
    data = torch.zeros(rows, k // EPB[fmt], dtype=qk.DATA_DTYPE[fmt], device="cuda")
    scale = torch.zeros(rows, k // BLOCK[fmt], dtype=qk.SCALE_DTYPE[fmt], device="cuda")
    return data, scale


def garbage_like(t):
    """A CUDA tensor like t filled with 0xA5 bytes, so a byte the kernel skips shows up."""
    out = torch.empty(t.shape, dtype=t.dtype, device="cuda")
    out.view(torch.uint8).fill_(0xA5)
    return out


def run_rowwise(qk, x, fmt, row_scale=None):
    r, k = x.shape
    data = torch.empty(r, k // EPB[fmt], dtype=qk.DATA_DTYPE[fmt], device="cuda")
    scale = torch.empty(r, k // BLOCK[fmt], dtype=qk.SCALE_DTYPE[fmt], device="cuda")
    data.view(torch.uint8).fill_(0xA5)
    scale.view(torch.uint8).fill_(0xA5)
    qk.quantize_rowwise(x.cuda(), facts(fmt), data, scale, None if row_scale is None else row_scale.float().cuda())
    return data, scale


def check_columnwise(qk, x, fmt, sizes):
    """quantize_columnwise of x's groups into poisoned buffers (one (K, P) matrix) gives the bytes
    of grouped.quantize(x, fmt, axis=0, split_sizes=sizes)."""
    ref = grouped.quantize(x, fmt, axis=0, split_sizes=sizes)
    data, scale = garbage_like(ref.data), garbage_like(ref.scale)
    splits = torch.tensor(sizes, dtype=torch.int32, device="cuda")
    table = qk.group_table(splits, facts(fmt), data_row_bytes=data.shape[1], scale_row_bytes=scale.shape[1])
    s = None if ref.global_scale is None else ref.global_scale.cuda()
    qk.quantize_columnwise(x.cuda(), facts(fmt), data, scale, table, s)
    assert_same_quantized(data, scale, ref)


def row_scales(ref, sizes, rows):
    """Each row's member S (rows past the groups: 1), as grouped.quantize broadcasts it."""
    s = torch.ones(rows)
    groups = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.int64))
    s[: sum(sizes)] = ref.global_scale[groups]
    return s


# ----------------------------------------------------------------------------- rowwise


@gpu
@fmt_param
@dtype_param
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (129, 96), (300, 512), (64, 2048)])
def test_rowwise_matches_quantize(gen, fmt, dtype, shape):
    qk = _qk()
    x = special(gen, *shape).to(dtype)
    ref = grouped.quantize(x, fmt)
    row_scale = None if ref.global_scale is None else ref.global_scale.expand(shape[0])
    data, scale = run_rowwise(qk, x, fmt, row_scale)
    assert_same_quantized(data, scale, ref)


@gpu
@fmt_param
@dtype_param
@pytest.mark.parametrize("sizes", [s for s in SPLITS if sum(s)], ids=str)
def test_rowwise_grouped_rows(gen, fmt, dtype, sizes):
    """A grouped token tensor: each row quantized with its member's S."""
    qk = _qk()
    rows = sum(sizes) + 3  # rows past the groups are not the kernel's: quantize only the groups
    x = special(gen, rows, 128).to(dtype)
    ref = grouped.quantize(x, fmt, split_sizes=sizes)
    total = sum(sizes)
    s = None if ref.global_scale is None else row_scales(ref, sizes, rows)[:total]
    data, scale = run_rowwise(qk, x[:total], fmt, s)
    assert_same_bytes(data, ref.data[:total], "data")
    assert_same_bytes(scale, ref.scale[:total], "scale")


@gpu
@dtype_param
def test_rowwise_nvfp4_any_row_scale(gen, dtype):
    """S far from the tensor's own: saturating and zero block scales, S / d overflowing to inf."""
    qk = _qk()
    x = special(gen, 256, 256).to(dtype)
    s = torch.exp2(torch.randint(-60, 61, (256,), generator=gen).float()) * (1 + torch.rand(256, generator=gen))
    s[:4] = torch.tensor([torch.finfo(torch.float32).max, 1.0, 2.0**-126, 2.0**-149])
    data, scale = run_rowwise(qk, x, "nvfp4", s)
    want_data, want_scale = NVFP4.quantize_blocks(x.float(), s.unsqueeze(1))
    assert_same_bytes(data, want_data, "data")
    assert_same_bytes(scale, want_scale, "scale")


@gpu
@dtype_param
def test_rowwise_nvfp4_midpoints(gen, dtype):
    qk = _qk()
    x = midpoint_rows(gen, 64, 256, 16).to(dtype)
    ref = grouped.quantize(x, "nvfp4")
    assert float(ref.global_scale) == 448.0
    data, scale = run_rowwise(qk, x, "nvfp4", ref.global_scale.expand(64))
    assert_same_quantized(data, scale, ref)
    assert (ref.scale.float() == 448).any() and (ref.scale.float() == 224).any()


@gpu
@dtype_param
def test_rowwise_mxfp8_at_448(gen, dtype):
    """Blocks whose amax is 448 x 2^k (t lands next to a power of two) and e4m3 ties."""
    qk = _qk()
    rows, cols = 64, 256
    k = torch.randint(-30, 31, (rows, cols // 32, 1), generator=gen).float()
    # e4m3 midpoints around 1..448: (2m+1)/16 x 2^e
    m = torch.randint(8, 16, (rows, cols // 32, 32), generator=gen).float()
    e = torch.randint(-6, 9, (rows, cols // 32, 32), generator=gen).float()
    x = ((2 * m + 1) / 16) * torch.exp2(e)
    x[..., 0] = 448.0
    x[..., 1] = -464.0 * (torch.rand(rows, cols // 32, generator=gen) < 0.3)
    x = (x * torch.exp2(k)).reshape(rows, cols).to(dtype)
    ref = grouped.quantize(x, "mxfp8")
    data, scale = run_rowwise(qk, x, "mxfp8")
    assert_same_quantized(data, scale, ref)


@gpu
@fmt_param
@dtype_param
def test_rowwise_nonfinite_and_zero_blocks(gen, fmt, dtype):
    qk = _qk()
    b = BLOCK[fmt]
    x = special(gen, 8, 8 * b, specials=False)
    x[0, :b] = 0.0
    x[1, :b] = -0.0
    x[2, 3] = float("nan")
    x[3, b + 5] = float("inf")
    x[4, 2 * b] = float("-inf")
    x[5, :] = subnormal_rows(gen, 1, 8 * b)
    x = x.to(dtype)
    ref = grouped.quantize(x, fmt)
    s = None if ref.global_scale is None else ref.global_scale.expand(8)
    data, scale = run_rowwise(qk, x, fmt, s)
    assert_same_quantized(data, scale, ref)
    nan_scale = 0xFF if fmt == "mxfp8" else 0x7F
    assert as_bytes(scale)[2, 0] == nan_scale and as_bytes(scale)[3, 1] == nan_scale
    assert as_bytes(scale)[4, 2] == nan_scale


# ----------------------------------------------------------------------------- columnwise


@gpu
@fmt_param
@dtype_param
@pytest.mark.parametrize("sizes", SPLITS, ids=str)
@pytest.mark.parametrize("cols", [16, 200, 384])
def test_columnwise_matches_quantize(gen, fmt, dtype, sizes, cols):
    qk = _qk()
    rows = sum(sizes) + 5  # rows past the groups are never read
    check_columnwise(qk, special(gen, rows, cols).to(dtype), fmt, sizes)


@gpu
@dtype_param
def test_columnwise_nvfp4_midpoints(gen, dtype):
    qk = _qk()
    sizes = [32, 16, 48]
    x = midpoint_rows(gen, 256, 96, 16).t().contiguous().to(dtype)  # blocks of 16 down each column
    check_columnwise(qk, x, "nvfp4", sizes)


def _region_table(qk, ref, sizes, fmt):
    """The kernels' group table for a GroupedTensor's columnwise member regions."""
    views = ref.split(columnwise=True)
    base_d, base_s = ref.columnwise_data.data_ptr(), ref.columnwise_scale.data_ptr()
    b, epb = BLOCK[fmt], EPB[fmt]
    pad = [-(-m // b) * b for m in sizes]
    return qk.group_table(
        torch.tensor(sizes, device="cuda"), fmt,
        data_offsets=[v.data.data_ptr() - base_d for v in views],
        data_strides=[p // epb for p in pad],
        scale_offsets=[v.scale.data_ptr() - base_s for v in views],
        scale_strides=[p // b for p in pad],
    )


def _regions_case(qk, gen, fmt, dtype, k, rowwise):
    """A GroupedTensor of awkward members (empty, single-row, unaligned) as the reference, its group
    table, zeroed columnwise buffers shaped like its own, and its S on the GPU."""
    sizes = [5, 0, 37, 1, 64]
    x = special(gen, sum(sizes), k).to(dtype)
    ref = grouped.GroupedTensor.from_tensor(x, sizes, fmt, rowwise=rowwise, columnwise=True)
    col = (torch.zeros_like(ref.columnwise_data, device="cuda"), torch.zeros_like(ref.columnwise_scale, device="cuda"))
    s = None if ref.global_scale is None else ref.global_scale.cuda()
    return x, ref, _region_table(qk, ref, sizes, fmt), col, s


@gpu
@fmt_param
@dtype_param
def test_columnwise_grouped_tensor_regions(gen, fmt, dtype):
    """GroupedTensor's columnwise buffers: each member (K, pad(m)) at its own byte offset."""
    qk = _qk()
    x, ref, table, (data, scale), s = _regions_case(qk, gen, fmt, dtype, 96, rowwise=False)
    qk.quantize_columnwise(x.cuda(), facts(fmt), data, scale, table, s)
    assert_same_bytes(data, ref.columnwise_data, "columnwise_data")
    assert_same_bytes(scale, ref.columnwise_scale, "columnwise_scale")


@gpu
@fmt_param
def test_columnwise_graph_replay(gen, fmt):
    """Table and kernel captured in a CUDA graph with the split sizes on the GPU: replays follow new sizes."""
    qk = _qk()
    rows, k, n = 256, 128, 6
    b = BLOCK[fmt]
    p = -(-rows // b) * b + n * b  # room for any split of <= rows rows
    x = torch.zeros(rows, k, device="cuda")
    sizes = torch.zeros(n, dtype=torch.int64, device="cuda")
    s = torch.ones(n, device="cuda")
    data = torch.zeros(k, p // EPB[fmt], dtype=qk.DATA_DTYPE[fmt], device="cuda")
    scale = torch.zeros(k, p // b, dtype=qk.SCALE_DTYPE[fmt], device="cuda")

    def step():
        table = qk.group_table(sizes, facts(fmt), data_row_bytes=data.shape[1], scale_row_bytes=scale.shape[1])
        qk.quantize_columnwise(x, facts(fmt), data, scale, table, s if fmt == "nvfp4" else None)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile / load outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        cuts = torch.sort(torch.randint(0, rows + 1, (n - 1,), generator=gen)).values
        new = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([rows - 7])])).clamp(min=0).tolist()
        values = special(gen, rows, k)
        ref = grouped.quantize(values, fmt, axis=0, split_sizes=new)
        x.copy_(values.cuda())
        sizes.copy_(torch.tensor(new))
        if fmt == "nvfp4":
            s.copy_(ref.global_scale.cuda())
        data.view(torch.uint8).fill_(0xA5)
        scale.view(torch.uint8).fill_(0xA5)
        graph.replay()
        torch.cuda.synchronize()
        used = ref.data.shape[1]
        assert_same_bytes(data[:, :used], ref.data, "data")
        assert_same_bytes(scale[:, : ref.scale.shape[1]], ref.scale, "scale")


@gpu
@fmt_param
def test_bad_arguments_raise_and_touch_nothing(fmt):
    qk = _qk()
    x = torch.randn(4, 64, device="cuda")
    data, scale = zeroed_outputs(qk, fmt, 4, 64)
    s = torch.ones(4, device="cuda") if fmt == "nvfp4" else None
    with pytest.raises(ValueError, match="multiple of the"):
        qk.quantize_rowwise(torch.randn(4, 40, device="cuda"), facts(fmt), data, scale, s)
    with pytest.raises(ValueError, match="data must have shape"):
        qk.quantize_rowwise(x, facts(fmt), data[:3], scale, s)
    with pytest.raises(ValueError, match="bf16 or fp32"):
        qk.quantize_rowwise(x.half(), facts(fmt), data, scale, s)
    with pytest.raises(ValueError, match="contiguous"):
        qk.quantize_rowwise(torch.randn(64, 4, device="cuda").t(), facts(fmt), data, scale, s)
    if fmt == "nvfp4":
        with pytest.raises(ValueError, match="row_scale"):
            qk.quantize_rowwise(x, facts(fmt), data, scale, None)
    else:
        with pytest.raises(ValueError, match="NVFP4 only"):
            qk.quantize_rowwise(x, facts(fmt), data, scale, torch.ones(4, device="cuda"))
    with pytest.raises(ValueError, match="groups must be"):
        qk.quantize_columnwise(x, facts(fmt), data, scale, torch.zeros(2, 7, dtype=torch.int64, device="cuda"), s)
    assert not data.view(torch.uint8).any() and not scale.view(torch.uint8).any()


# ----------------------------------------------------------------------------- fused: both directions


def run_both(qk, x, fmt, sizes, col_ref, col_scale_s=None, row_scale_s=None):
    """quantize_both into poisoned buffers: rowwise (R, K) and columnwise like col_ref (one (K, P) matrix)."""
    r, k = x.shape
    row_data = torch.empty(r, k // EPB[fmt], dtype=qk.DATA_DTYPE[fmt], device="cuda")
    row_scale = torch.empty(r, k // BLOCK[fmt], dtype=qk.SCALE_DTYPE[fmt], device="cuda")
    row_data.view(torch.uint8).fill_(0xA5)
    row_scale.view(torch.uint8).fill_(0xA5)
    col_data, col_scale = garbage_like(col_ref.data), garbage_like(col_ref.scale)
    table = qk.group_table(torch.tensor(sizes, dtype=torch.int64, device="cuda"), facts(fmt),
                           data_row_bytes=col_data.shape[1], scale_row_bytes=col_scale.shape[1])
    qk.quantize_both(x.cuda(), facts(fmt), row_data, row_scale, col_data, col_scale, table,
                     None if row_scale_s is None else row_scale_s.float().cuda(),
                     None if col_scale_s is None else col_scale_s.float().cuda())
    return row_data, row_scale, col_data, col_scale


def check_both(qk, x, fmt, sizes):
    total = sum(sizes)
    row_ref = grouped.quantize(x, fmt, split_sizes=sizes)
    col_ref = grouped.quantize(x, fmt, axis=0, split_sizes=sizes)
    got = run_both(qk, x, fmt, sizes, col_ref, col_ref.global_scale)
    assert_same_bytes(got[0][:total], row_ref.data[:total], "row data")
    assert_same_bytes(got[1][:total], row_ref.scale[:total], "row scale")
    assert (as_bytes(got[0][total:]) == 0xA5).all() and (as_bytes(got[1][total:]) == 0xA5).all(), (
        "rows past the groups were written"
    )
    assert_same_bytes(got[2], col_ref.data, "column data")
    assert_same_bytes(got[3], col_ref.scale, "column scale")


BOTH_COLS = {"mxfp8": [32, 256, 544], "nvfp4": [16, 208, 256, 544]}  # K % 32 == 16 takes the odd path


@gpu
@fmt_param
@dtype_param
@pytest.mark.parametrize("sizes", [s for s in SPLITS if sum(s)], ids=str)
@pytest.mark.parametrize("col_index", [0, 1, 2, 3])
def test_both_matches_quantize(gen, fmt, dtype, sizes, col_index):
    """One pass gives grouped.quantize's rowwise and columnwise (grouped) bytes; rows past the groups untouched."""
    qk = _qk()
    if col_index >= len(BOTH_COLS[fmt]):
        pytest.skip("no such width for this format")
    x = special(gen, sum(sizes) + 5, BOTH_COLS[fmt][col_index]).to(dtype)
    check_both(qk, x, fmt, sizes)


@gpu
@fmt_param
@dtype_param
@pytest.mark.parametrize("one_pass", [False, True], ids=["columnwise", "both"])
@pytest.mark.parametrize("case", ["many_groups", "subnormal_group"])
def test_awkward_groups(gen, fmt, dtype, one_pass, case):
    """quantize_columnwise and quantize_both over 37 groups, some empty; and over a group of
    subnormals only (NVFP4: S capped at the fp32 max, S / d = inf) next to normal ones."""
    qk = _qk()
    if case == "many_groups":
        sizes = torch.randint(0, 100, (37,), generator=gen)
        sizes[torch.randint(0, 37, (6,), generator=gen)] = 0
        sizes = sizes.tolist()
        x = special(gen, sum(sizes) + 3, 288)
    else:
        sizes = [40, 21, 64]
        x = torch.cat([special(gen, 40, 256), subnormal_rows(gen, 21, 256), special(gen, 64, 256)])
    (check_both if one_pass else check_columnwise)(qk, x.to(dtype), fmt, sizes)


@gpu
@fmt_param
@dtype_param
@pytest.mark.parametrize("grid", [None, 3])
def test_both_larger(gen, fmt, dtype, grid, monkeypatch):
    """Groups of all residues; with a grid of 3 CTAs each runs dozens of tiles through its stages."""
    qk = _qk()
    monkeypatch.setattr(qk.launch, "GRID_LIMIT", grid)
    sizes = [1000, 31, 17, 1, 0, 513, 777]
    x = special(gen, sum(sizes), 1088).to(dtype)
    check_both(qk, x, fmt, sizes)


# The bf16 kernels at other widths K (K / 32 a multiple of 4, or not; K % 64) with other tile
# orders (group_rows: 1 column tile fastest, 1 << 20 row tile fastest, else bands) and grids (a
# persistent grid): the same compiled kernel, other run-time arguments.
BF16_RUNS = {
    "mxfp8": [(1024, 16, None), (1088, 16, None), (544, 1, None), (1088, 1 << 20, None), (1024, 3, 132)],
    "nvfp4": [(1024, 16, 396), (1104, 1, 792), (208, 3, 132)],
}


@gpu
@fmt_param
@pytest.mark.parametrize("run", range(5))
def test_both_bf16_widths_and_tile_orders(gen, fmt, run, monkeypatch):
    """The bf16 kernels give the same bytes at every width, tile order and grid."""
    qk = _qk()
    if run >= len(BF16_RUNS[fmt]):
        pytest.skip("no such run for this format")
    k, group_rows, grid = BF16_RUNS[fmt][run]
    monkeypatch.setattr(qk.launch, "REGISTER_TILE_GROUP_ROWS" if fmt == "mxfp8" else "WARP_TILE_GROUP_ROWS", group_rows)
    monkeypatch.setattr(qk.launch, "GRID_LIMIT", grid)
    sizes = [1000, 31, 17, 1, 0, 513, 777]
    x = special(gen, sum(sizes) + 5, k).to(torch.bfloat16)
    check_both(qk, x, fmt, sizes)


@gpu
@dtype_param
def test_both_nvfp4_midpoints(gen, dtype):
    qk = _qk()
    sizes = [32, 16, 48]
    x = midpoint_rows(gen, 96, 256, 16).to(dtype)  # ties along the rows
    check_both(qk, x, "nvfp4", sizes)
    y = midpoint_rows(gen, 256, 96, 16).t().contiguous().to(dtype)  # ties down the columns
    check_both(qk, y, "nvfp4", sizes)


@gpu
@dtype_param
def test_both_nvfp4_any_row_scale(gen, dtype):
    """row_scale_s given per row (far from the groups' own S): the rowwise bytes follow it."""
    qk = _qk()
    sizes = [100, 60, 96]
    x = special(gen, 256, 256).to(dtype)
    s = torch.exp2(torch.randint(-60, 61, (256,), generator=gen).float()) * (1 + torch.rand(256, generator=gen))
    s[:4] = torch.tensor([torch.finfo(torch.float32).max, 1.0, 2.0**-126, 2.0**-149])
    col_ref = grouped.quantize(x, "nvfp4", axis=0, split_sizes=sizes)
    got = run_both(qk, x, "nvfp4", sizes, col_ref, col_ref.global_scale, row_scale_s=s)
    want_data, want_scale = NVFP4.quantize_blocks(x.float(), s.unsqueeze(1))
    assert_same_bytes(got[0], want_data, "row data")
    assert_same_bytes(got[1], want_scale, "row scale")
    assert_same_bytes(got[2], col_ref.data, "column data")
    assert_same_bytes(got[3], col_ref.scale, "column scale")


@gpu
@fmt_param
@dtype_param
def test_both_grouped_tensor_regions(gen, fmt, dtype):
    """GroupedTensor's buffers: rowwise one (R, K) array, columnwise each member at its own offset."""
    qk = _qk()
    k = 512
    x, ref, table, (col_data, col_scale), s = _regions_case(qk, gen, fmt, dtype, k, rowwise=True)
    r, b, epb = x.shape[0], BLOCK[fmt], EPB[fmt]
    data = garbage_like(ref.data)
    scale = garbage_like(ref.scale)
    qk.quantize_both(x.cuda(), facts(fmt), data[: r * k // epb].view(r, -1), scale[: r * k // b].view(r, -1),
                     col_data, col_scale, table, None, s)
    assert_same_quantized(data, scale, ref)
    assert_same_bytes(col_data, ref.columnwise_data, "columnwise_data")
    assert_same_bytes(col_scale, ref.columnwise_scale, "columnwise_scale")


def _group_amax_case(qk, x, sizes):
    """Run group_amax into a NaN-poisoned S; -> (amax, S, expected amax)."""
    table = qk.group_table(torch.tensor(sizes, dtype=torch.int64, device="cuda"), facts("nvfp4"),
                           data_row_bytes=16, scale_row_bytes=16)
    s = torch.full((len(sizes),), float("nan"), device="cuda")
    amax = qk.group_amax(x.cuda(), facts("nvfp4"), table, s)
    want = torch.zeros(len(sizes))
    start = 0
    for g, m in enumerate(sizes):
        finite = x[start:start + m].float().abs().nan_to_num(nan=0.0, posinf=0.0)
        want[g] = finite.max() if m else 0.0
        start += m
    return amax.view(torch.float32), s, want


@gpu
@dtype_param
@pytest.mark.parametrize("sizes", SPLITS + [[300, 0, 1, 77], [1500, 3, 700]], ids=str)
def test_group_amax_matches(gen, dtype, sizes, monkeypatch):
    """The per-group finite amax kernel gives each group's amax and grouped.quantize's NVFP4 S exactly
    (S written by the last of several CTAs)."""
    qk = _qk()
    monkeypatch.setattr(qk.launch, "GRID_LIMIT", 2)  # a CTA's tiles cross groups
    x = special(gen, sum(sizes) + 4, 272).to(dtype)
    x[-4:] = 1e30  # rows past the groups are not read
    amax, s, want = _group_amax_case(qk, x, sizes)
    assert_same_bytes(amax, want, "group amax")
    assert_same_bytes(s, NVFP4.global_scale(want), "S")
    if sum(sizes):
        ref = grouped.quantize(x, "nvfp4", axis=0, split_sizes=sizes)
        assert_same_bytes(s, ref.global_scale, "S against grouped.quantize's reference")


@gpu
@dtype_param
def test_group_amax_global_scale_edges(gen, dtype):
    """S at its edges: 1 for an all-zero (or NaN / Inf only) group, the largest finite fp32 where
    2688 / amax overflows (subnormal amax), exact next to normal values."""
    qk = _qk()
    sizes = [16, 32, 16, 48, 0, 16]
    x = torch.randn(sum(sizes), 64, generator=gen)
    x[:16] = 0.0
    x[16:48] = torch.where(torch.rand(32, 64, generator=gen) < 0.5, 1e-40, -1e-39)  # subnormal amax
    x[48:64] = torch.where(torch.rand(16, 64, generator=gen) < 0.5, float("nan"), float("-inf"))
    x[64:112] *= 1e-35  # a large but finite S
    x = x.to(dtype)
    amax, s, want = _group_amax_case(qk, x, sizes)
    assert_same_bytes(amax, want, "group amax")
    expected = NVFP4.global_scale(want)
    assert expected[0] == 1 and expected[2] == 1 and expected[4] == 1
    assert expected[1] == torch.finfo(torch.float32).max
    assert_same_bytes(s, expected, "S")


@gpu
@fmt_param
def test_both_bad_arguments_raise_and_touch_nothing(fmt):
    qk = _qk()
    x = torch.randn(64, 64, device="cuda")
    (data, scale), (col_data, col_scale) = zeroed_outputs(qk, fmt, 64, 64), zeroed_outputs(qk, fmt, 64, 64)
    table = qk.group_table([64], facts(fmt), device="cuda", data_row_bytes=col_data.shape[1],
                           scale_row_bytes=col_scale.shape[1])
    s = torch.ones(1, device="cuda") if fmt == "nvfp4" else None
    with pytest.raises(ValueError, match="row_data must have shape"):
        qk.quantize_both(x, facts(fmt), data[:3], scale, col_data, col_scale, table, None, s)
    with pytest.raises(ValueError, match="groups must be"):
        qk.quantize_both(x, facts(fmt), data, scale, col_data, col_scale, table[:, :7].contiguous(), None, s)
    with pytest.raises(ValueError, match="bf16 or fp32"):
        qk.quantize_both(x.half(), facts(fmt), data, scale, col_data, col_scale, table, None, s)
    if fmt == "nvfp4":
        with pytest.raises(ValueError, match="col_scale_s"):
            qk.quantize_both(x, facts(fmt), data, scale, col_data, col_scale, table, None, None)
        with pytest.raises(ValueError, match="row_scale_s"):
            qk.quantize_both(x, facts(fmt), data, scale, col_data, col_scale, table, torch.ones(3, device="cuda"), s)
    else:
        with pytest.raises(ValueError, match="NVFP4 only"):
            qk.quantize_both(x, facts(fmt), data, scale, col_data, col_scale, table, None, torch.ones(1, device="cuda"))
    for t in (data, scale, col_data, col_scale):
        assert not t.view(torch.uint8).any()


# ----------------------------------------------------------------------------- no GPU needed


@fmt_param
def test_group_table_layout(fmt):
    from cute_backend import quantize as qk

    b, epb = BLOCK[fmt], EPB[fmt]
    sizes = [5, 0, 37, 1, 64]
    t = qk.group_table(torch.tensor(sizes), facts(fmt), data_row_bytes=320 // epb, scale_row_bytes=320 // b)
    assert t.dtype == torch.int64 and tuple(t.shape) == (5, qk.TABLE_COLS)
    blocks = [-(-m // b) for m in sizes]
    starts = [sum(blocks[:g]) for g in range(5)]
    assert t[:, qk.ROW_START].tolist() == [0, 5, 5, 42, 43]
    assert t[:, qk.ROWS].tolist() == sizes
    assert t[:, qk.BLOCK_START].tolist() == starts
    assert t[:, qk.DATA_OFFSET].tolist() == [s * b // epb for s in starts]
    assert t[:, qk.DATA_STRIDE].tolist() == [320 // epb] * 5
    assert t[:, qk.SCALE_OFFSET].tolist() == starts
    assert t[:, qk.SCALE_STRIDE].tolist() == [320 // b] * 5
    with pytest.raises(ValueError, match="multiples of"):
        qk.group_table(sizes, facts(fmt), data_offsets=[1, 0, 0, 0, 0], data_strides=64, scale_strides=4)


def test_arguments_off_the_gpu_are_refused():
    from cute_backend import quantize as qk

    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="CUDA"):
        qk.quantize_rowwise(x, facts("mxfp8"), torch.zeros(4, 64, dtype=torch.float8_e4m3fn),
                            torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="fmt must be one of"):
        qk.quantize_rowwise(x, facts("bf16"), x, x)
    with pytest.raises(ValueError, match="fmt must be a FormatFacts"):
        qk.quantize_rowwise(x, "mxfp8", x, x)  # grouped hands its format facts, not a name
    reason = qk.can_implement_columnwise(x, facts("nvfp4"), None, None, None)
    assert reason and "CUDA" in reason


def test_fused_arguments_off_the_gpu_are_refused():
    from cute_backend import quantize as qk

    x = torch.randn(4, 64)
    table = qk.group_table([4], facts("mxfp8"), data_row_bytes=32, scale_row_bytes=1)
    data = torch.zeros(4, 64, dtype=torch.float8_e4m3fn)
    scale = torch.zeros(4, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="CUDA"):
        qk.quantize_both(x, facts("mxfp8"), data, scale, data, scale, table)
    assert "CUDA" in qk.can_implement_amax(x, facts("nvfp4"), table, torch.ones(1))
    with pytest.raises(ValueError, match="fmt must be"):
        qk.quantize_both(x, facts("bf16"), data, scale, data, scale, table)
