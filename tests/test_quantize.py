"""Tests for grouped.quantize: shapes, geometry, grouping, layouts, policy (CPU).

Hand-computed bit-exact vectors live in test_quantize_vectors.py. Here the
quantizer is checked against itself under transformations that must not change
the stored bytes (transpose, per-expert slicing, per-group padding, dtype,
strides), against an independent decode of the stored bytes, and for its
validation errors.
"""

import math

import pytest
import torch

import grouped

FMTS = ["mxfp8", "nvfp4", grouped.MXFP8, grouped.NVFP4]
FMT_IDS = ["mxfp8", "nvfp4", "MXFP8-desc", "NVFP4-desc"]
fmt_param = pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)

E2M1_TABLE = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


# ----------------------------------------------------------------------------- helpers


def _f(fmt):
    return grouped.get_format(fmt)


def _ceil_to(n, m):
    return -(-n // m) * m


def wide(gen, shape, span=30):
    """randn scaled by 2^(row exp + col exp [+ expert exp]): block amaxes span many binades
    whichever dim the blocks run along."""
    x = torch.randn(shape, generator=gen)
    half = span // 2
    for d, n in enumerate(shape):
        e = torch.randint(-half, half + 1, (n,), generator=gen).float()
        view = [1] * len(shape)
        view[d] = n
        x = x * torch.exp2(e).reshape(view)
    return x


def _bytes(t):
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t


def assert_bytes_equal(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert torch.equal(_bytes(a), _bytes(b))


def assert_q_equal(q1, q2):
    assert_bytes_equal(q1.data, q2.data)
    assert_bytes_equal(q1.scale, q2.scale)
    if q1.global_scale is None:
        assert q2.global_scale is None
    else:
        assert torch.equal(q1.global_scale, q2.global_scale)


def decode_stored(data, scale, fmt):
    """Independent decode of stored bytes (blocked dim last, compact scales) -> fp32,
    before dividing by any NVFP4 per-tensor scale."""
    fmt = _f(fmt)
    if fmt.name == "mxfp8":
        values = data.view(torch.float8_e4m3fn).float()
        b = scale.to(torch.int64)
        s = torch.exp2((b - 127).double()).float()
        s = torch.where(b == 255, torch.full_like(s, float("nan")), s)
        return values * s.repeat_interleave(32, dim=-1)
    d = data.to(torch.int64)
    nibbles = torch.stack((d & 0xF, d >> 4), dim=-1).reshape(*d.shape[:-1], d.shape[-1] * 2)
    mag = E2M1_TABLE[nibbles & 7]
    q = torch.where((nibbles & 8) != 0, -mag, mag)
    return q * scale.float().repeat_interleave(16, dim=-1)


def reference_dequantize(q):
    """Rebuild x's values from q's bytes with simple ops and explicit group loops."""
    fmt = _f(q.fmt)
    nv = fmt.name == "nvfp4"
    stored = decode_stored(q.data, q.compact_scale(), fmt)
    shape = tuple(q.shape)
    if len(shape) == 3:
        if nv:
            stored = stored / q.global_scale.reshape(-1, 1, 1)
        return stored if q.axis == -1 else stored.transpose(1, 2)
    if q.split_sizes is None:
        if nv:
            stored = stored / q.global_scale
        return stored if q.axis == -1 else stored.t()
    out = torch.zeros(shape)
    row, col = 0, 0
    for g, m in enumerate(q.split_sizes):
        s = q.global_scale[g] if nv else torch.tensor(1.0)
        if q.axis == -1:
            out[row : row + m] = stored[row : row + m] / s
        else:
            p = _ceil_to(m, fmt.block_size)
            out[row : row + m] = (stored[:, col : col + m] / s).t()
            # The padding rows of a group hold zero codes.
            assert torch.all(stored[:, col + m : col + p] == 0)
            col += p
        row += m
    if q.axis == -1:
        assert torch.all(stored[row:] == 0)  # rows past the groups are stored as zeros
    return out


def expected_shapes(fmt, shape, axis, split_sizes):
    """(data shape, compact scale shape, global_scale shape or None) from the module table."""
    fmt = _f(fmt)
    b, epb = fmt.block_size, fmt.elements_per_byte
    if len(shape) == 3:
        G, N, K = shape
        rows, n = (N, K) if axis == -1 else (K, N)
        lead = (G,)
        gs = (G,)
    else:
        M, K = shape
        if axis == -1:
            rows, n = M, K
        elif split_sizes is None:
            rows, n = K, M
        else:
            rows, n = K, sum(_ceil_to(m, b) for m in split_sizes)
        lead = ()
        gs = () if split_sizes is None else (len(split_sizes),)
    data = (*lead, rows, n // epb)
    scale = (*lead, rows, n // b)
    return data, scale, (gs if fmt.has_global_scale else None)


CASES = [
    # (shape, axis, split_sizes)
    ((64, 128), -1, None),
    ((64, 128), 0, None),
    ((96, 64), 0, [5, 0, 37, 1, 20]),
    ((96, 64), -1, [5, 0, 37, 1, 20]),
    ((3, 32, 64), -1, None),
    ((3, 64, 32), 1, None),
]
CASE_IDS = ["2d-row", "2d-col", "split-col", "split-row", "3d-row", "3d-col"]
case_param = pytest.mark.parametrize("shape, axis, split_sizes", CASES, ids=CASE_IDS)


# ----------------------------------------------------------------------------- shapes


@fmt_param
@case_param
def test_shapes_and_dtypes(gen, fmt, shape, axis, split_sizes):
    desc = _f(fmt)
    x = wide(gen, shape)
    q = grouped.quantize(x, fmt, axis=axis, split_sizes=split_sizes)
    data_shape, scale_shape, gs_shape = expected_shapes(fmt, shape, axis, split_sizes)
    assert tuple(q.data.shape) == data_shape
    assert tuple(q.scale.shape) == scale_shape
    assert q.compact_scale_shape == scale_shape
    assert q.data.dtype == desc.data_dtype
    assert q.scale.dtype == desc.scale_dtype
    if desc.name == "mxfp8":
        assert q.data.dtype == torch.float8_e4m3fn and q.scale.dtype == torch.uint8
        assert q.global_scale is None
    else:
        assert q.data.dtype == torch.uint8 and q.scale.dtype == torch.float8_e4m3fn
        assert q.global_scale.dtype == torch.float32
        assert tuple(q.global_scale.shape) == gs_shape
    assert q.fmt is desc
    assert q.axis == axis
    assert q.columnwise == (axis != -1)
    assert q.shape == x.shape
    assert q.layout == "compact"
    assert q.split_sizes == (None if split_sizes is None else tuple(split_sizes))
    assert q.device == x.device
    assert q.data.is_contiguous() and q.scale.is_contiguous()
    deq = q.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == x.shape


@fmt_param
@pytest.mark.parametrize(
    "ndim, alias, canonical", [(2, 1, -1), (2, -2, 0), (3, 2, -1), (3, -2, 1)], ids=["2d:1", "2d:-2", "3d:2", "3d:-2"]
)
def test_axis_aliases(gen, fmt, ndim, alias, canonical):
    x = wide(gen, (64, 64) if ndim == 2 else (2, 64, 64))
    qa = grouped.quantize(x, fmt, axis=alias)
    qc = grouped.quantize(x, fmt, axis=canonical)
    assert qa.axis == canonical
    assert_q_equal(qa, qc)


# ----------------------------------------------------------------------------- geometry


@fmt_param
@pytest.mark.parametrize("shape", [(64, 96), (32, 32), (160, 64)])
def test_columnwise_equals_rowwise_of_transpose(gen, fmt, shape):
    x = wide(gen, shape)
    qc = grouped.quantize(x, fmt, axis=0)
    qr = grouped.quantize(x.t().contiguous(), fmt, axis=-1)
    assert_q_equal(qc, qr)
    torch.testing.assert_close(qc.dequantize(), qr.dequantize().t(), rtol=0, atol=0)


@fmt_param
def test_3d_columnwise_equals_rowwise_of_transpose(gen, fmt):
    w = wide(gen, (3, 64, 96))
    qc = grouped.quantize(w, fmt, axis=1)
    qr = grouped.quantize(w.transpose(1, 2).contiguous(), fmt, axis=-1)
    assert_q_equal(qc, qr)


@fmt_param
@pytest.mark.parametrize("axis", [-1, 1])
def test_3d_per_expert(gen, fmt, axis):
    G = 4
    w = wide(gen, (G, 32, 64))
    q = grouped.quantize(w, fmt, axis=axis)
    if _f(fmt).has_global_scale:
        assert q.global_scale.shape == (G,)
    deq = q.dequantize()
    for g in range(G):
        qg = grouped.quantize(w[g], fmt, axis=-1 if axis == -1 else 0)
        assert_bytes_equal(q.data[g], qg.data)
        assert_bytes_equal(q.scale[g], qg.scale)
        if _f(fmt).has_global_scale:
            assert qg.global_scale.shape == ()
            assert torch.equal(q.global_scale[g], qg.global_scale)
        torch.testing.assert_close(deq[g], qg.dequantize(), rtol=0, atol=0)
    if _f(fmt).has_global_scale:
        # Experts with very different magnitudes really get different S.
        assert len(set(q.global_scale.tolist())) == G


# ----------------------------------------------------------------------------- split_sizes


def _group_rows(split_sizes):
    out, row = [], 0
    for m in split_sizes:
        out.append((row, row + m))
        row += m
    return out


@fmt_param
@pytest.mark.parametrize("split_sizes", [[5, 0, 37, 1, 64], [32, 31, 33], [0, 3], [100]], ids=str)
def test_split_columnwise_per_group(gen, fmt, split_sizes):
    desc = _f(fmt)
    B, epb = desc.block_size, desc.elements_per_byte
    K = 64
    M = sum(split_sizes) + 7
    x = wide(gen, (M, K))
    q = grouped.quantize(x, fmt, axis=0, split_sizes=split_sizes)
    P = sum(_ceil_to(m, B) for m in split_sizes)
    assert q.data.shape == (K, P // epb)
    col = 0
    for g, (lo, hi) in enumerate(_group_rows(split_sizes)):
        m = hi - lo
        p = _ceil_to(m, B)
        data_g = q.data[:, col // epb : (col + p) // epb]
        scale_g = q.scale[:, col // B : (col + p) // B]
        if m == 0:
            assert data_g.numel() == 0 and scale_g.numel() == 0
            if desc.has_global_scale:
                assert q.global_scale[g].item() == 1.0
            col += p
            continue
        x_pad = torch.zeros((p, K))
        x_pad[:m] = x[lo:hi]
        ref = grouped.quantize(x_pad, fmt, axis=0)
        assert_bytes_equal(data_g, ref.data)
        assert_bytes_equal(scale_g, ref.scale)
        if desc.has_global_scale:
            alone = grouped.quantize(x[lo:hi], fmt, axis=0, split_sizes=[m])
            assert torch.equal(q.global_scale[g], alone.global_scale[0])
            # zero padding rows do not change the tensor amax
            assert torch.equal(q.global_scale[g], ref.global_scale)
            assert_bytes_equal(data_g, alone.data)
            assert_bytes_equal(scale_g, alone.scale)
        col += p
    assert col == P


@fmt_param
@pytest.mark.parametrize("axis", [0, -1])
def test_split_trailing_rows_ignored(gen, fmt, axis):
    split_sizes = [5, 0, 37, 1, 20]
    total = sum(split_sizes)
    x = wide(gen, (total + 11, 64))
    q = grouped.quantize(x, fmt, axis=axis, split_sizes=split_sizes)
    y = x.clone()
    y[total:] = wide(gen, (11, 64)) * 1e6
    y[total, 3] = float("nan")
    y[total + 1, 0] = float("inf")
    y[total + 2, 5] = -float("inf")
    qy = grouped.quantize(y, fmt, axis=axis, split_sizes=split_sizes)
    assert_q_equal(q, qy)
    for deq in (q.dequantize(), qy.dequantize()):
        assert torch.equal(deq[total:], torch.zeros(11, 64))
        assert torch.isfinite(deq).all()
    if axis == -1:
        # stored as zeros
        assert torch.all(_bytes(q.data)[total:] == 0)
        assert torch.all(_bytes(q.scale)[total:] == 0)


@fmt_param
@pytest.mark.parametrize("split_sizes", [[5, 0, 37, 1, 64], [40, 0], [1, 1, 1]], ids=str)
def test_split_rowwise(gen, fmt, split_sizes):
    desc = _f(fmt)
    total = sum(split_sizes)
    x = wide(gen, (total + 9, 64))
    q = grouped.quantize(x, fmt, axis=-1, split_sizes=split_sizes)
    if not desc.has_global_scale:
        plain = grouped.quantize(x, fmt)
        assert_bytes_equal(q.data[:total], plain.data[:total])
        assert_bytes_equal(q.scale[:total], plain.scale[:total])
    else:
        assert q.global_scale.shape == (len(split_sizes),)
        for g, (lo, hi) in enumerate(_group_rows(split_sizes)):
            if hi == lo:
                assert q.global_scale[g].item() == 1.0
                continue
            ref = grouped.quantize(x[lo:hi], fmt)
            assert torch.equal(q.global_scale[g], ref.global_scale)
            assert_bytes_equal(q.data[lo:hi], ref.data)
            assert_bytes_equal(q.scale[lo:hi], ref.scale)
    assert torch.all(_bytes(q.data)[total:] == 0)
    assert torch.all(_bytes(q.scale)[total:] == 0)
    deq = q.dequantize()
    assert torch.equal(deq[total:], torch.zeros(9, 64))


@fmt_param
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_split_sizes_tensor_same_as_list(gen, fmt, axis, dtype):
    split_sizes = [7, 0, 33, 2]
    x = wide(gen, (50, 32))
    ql = grouped.quantize(x, fmt, axis=axis, split_sizes=split_sizes)
    qt = grouped.quantize(x, fmt, axis=axis, split_sizes=torch.tensor(split_sizes, dtype=dtype))
    assert_q_equal(ql, qt)
    assert qt.split_sizes == tuple(split_sizes)
    assert all(type(m) is int for m in qt.split_sizes)


@fmt_param
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("split_sizes", [[0], [0, 0], [0, 17, 0], [16, 0, 0, 16]], ids=str)
def test_empty_groups(gen, fmt, axis, split_sizes):
    desc = _f(fmt)
    total = sum(split_sizes)
    x = wide(gen, (total + 5, 32))
    q = grouped.quantize(x, fmt, axis=axis, split_sizes=split_sizes)
    data_shape, scale_shape, gs_shape = expected_shapes(fmt, x.shape, axis, split_sizes)
    assert tuple(q.data.shape) == data_shape and tuple(q.scale.shape) == scale_shape
    if desc.has_global_scale:
        assert tuple(q.global_scale.shape) == gs_shape
        for g, m in enumerate(split_sizes):
            if m == 0:
                assert q.global_scale[g].item() == 1.0
            else:
                assert q.global_scale[g].item() != 1.0
    deq = q.dequantize()
    assert deq.shape == x.shape
    assert torch.equal(deq[total:], torch.zeros(5, 32))
    torch.testing.assert_close(deq, reference_dequantize(q), rtol=0, atol=0)


@fmt_param
@pytest.mark.parametrize("axis", [0, -1])
def test_all_zero_group_gets_unit_global_scale(gen, fmt, axis):
    x = wide(gen, (48, 32))
    x[16:32] = 0.0  # group 1 present but all zero
    q = grouped.quantize(x, fmt, axis=axis, split_sizes=[16, 16, 16])
    if _f(fmt).has_global_scale:
        assert q.global_scale[1].item() == 1.0
    assert torch.equal(q.dequantize()[16:32], torch.zeros(16, 32))


@fmt_param
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("split_sizes", [[0], [0, 0]], ids=str)
def test_zero_row_tensor_with_empty_splits(fmt, axis, split_sizes):
    """x with no rows at all and only empty groups."""
    x = torch.empty((0, 32))
    q = grouped.quantize(x, fmt, axis=axis, split_sizes=split_sizes)
    data_shape, scale_shape, gs_shape = expected_shapes(fmt, x.shape, axis, split_sizes)
    assert tuple(q.data.shape) == data_shape and tuple(q.scale.shape) == scale_shape
    if _f(fmt).has_global_scale:
        assert tuple(q.global_scale.shape) == gs_shape
        assert q.global_scale.tolist() == [1.0] * len(split_sizes)
    assert q.dequantize().shape == (0, 32)
    assert q.with_layout("blocked").dequantize().shape == (0, 32)


@fmt_param
@pytest.mark.parametrize(
    "shape, axis",
    [((0, 32), -1), ((0, 32), 0), ((32, 0), -1), ((32, 0), 0), ((2, 0, 32), -1), ((2, 32, 0), 1), ((0, 32, 32), -1)],
    ids=["0xK-row", "0xK-col", "Mx0-row", "Mx0-col", "G0K-row", "GN0-col", "0NK-row"],
)
def test_zero_size_tensor_without_splits(fmt, shape, axis):
    """Zero-size tensors quantize to zero-size data; NVFP4 S = 1 (amax = 0)."""
    q = grouped.quantize(torch.empty(shape), fmt, axis=axis)
    data_shape, scale_shape, gs_shape = expected_shapes(fmt, shape, axis, None)
    assert tuple(q.data.shape) == data_shape and tuple(q.scale.shape) == scale_shape
    if _f(fmt).has_global_scale:
        assert tuple(q.global_scale.shape) == gs_shape
        assert torch.all(q.global_scale == 1.0)
    deq = q.dequantize()
    assert deq.shape == shape and deq.dtype == torch.float32


# ----------------------------------------------------------------------------- dequantize


@fmt_param
@case_param
def test_dequantize_matches_independent_decode(gen, fmt, shape, axis, split_sizes):
    x = wide(gen, shape)
    if split_sizes is not None:
        x[sum(split_sizes) :] = 123.0  # rows past the groups: must decode to zero
    q = grouped.quantize(x, fmt, axis=axis, split_sizes=split_sizes)
    deq = q.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == x.shape
    ref = reference_dequantize(q)
    torch.testing.assert_close(deq, ref, rtol=0, atol=0)
    # The blocks really have different scales.
    assert len(torch.unique(_bytes(q.scale))) > 4


@fmt_param
@case_param
def test_round_trip_error_sanity(gen, fmt, shape, axis, split_sizes):
    x = torch.randn(shape, generator=gen)
    total = x.shape[0] if split_sizes is None or len(shape) == 3 else sum(split_sizes)
    q = grouped.quantize(x, fmt, axis=axis, split_sizes=split_sizes)
    deq = q.dequantize()
    xs = x[:total]
    err = (deq[:total] - xs).norm() / xs.norm()
    bound = 0.07 if _f(fmt).name == "mxfp8" else 0.2
    assert err < bound, float(err)
    assert err > 0  # it did quantize


@pytest.mark.parametrize("axis", [0, -1])
def test_mxfp8_element_error_bound(gen, axis):
    """Per element: |deq - x| <= half an E4M3 ulp at the element's binade, times the block
    scale, or the subnormal step 2^-10 * scale; the scale is the smallest power of two
    with amax / scale <= 448."""
    x = wide(gen, (64, 128))
    q = grouped.quantize(x, "mxfp8", axis=axis)
    deq = q.dequantize()
    stored_x = x if axis == -1 else x.t()
    s = torch.exp2(q.scale.to(torch.int64).double() - 127).repeat_interleave(32, dim=-1)
    stored_deq = deq if axis == -1 else deq.t()
    xd = stored_x.double()
    amax = xd.abs().reshape(*xd.shape[:-1], -1, 32).amax(-1).repeat_interleave(32, dim=-1)
    assert torch.all(amax / s <= 448)
    assert torch.all(amax / (s / 2) > 448 * (1 - 2**-20))  # s is not larger than needed
    scaled = xd.abs() / s
    exp = torch.floor(torch.log2(scaled.clamp(min=2**-6)))
    half_ulp = torch.exp2(exp - 4)  # 3 mantissa bits: ulp = 2^(e-3)
    assert torch.all((stored_deq.double() - xd).abs() <= half_ulp * s)


# ----------------------------------------------------------------------------- dtypes and strides


@fmt_param
@case_param
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_input_dtype_same_bytes_as_fp32(gen, fmt, shape, axis, split_sizes, dtype):
    if dtype == torch.bfloat16:
        x = wide(gen, shape).bfloat16().float()
    else:
        # 8 significant bits, exponents well inside the fp16 normal range
        mant = 1 + torch.randint(0, 128, shape, generator=gen).float() / 128
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
        e = torch.randint(-12, 14, shape, generator=gen).float()
        x = sign * mant * torch.exp2(e)
    xl = x.to(dtype)
    assert torch.equal(xl.float(), x)
    q32 = grouped.quantize(x, fmt, axis=axis, split_sizes=split_sizes)
    ql = grouped.quantize(xl, fmt, axis=axis, split_sizes=split_sizes)
    assert_q_equal(q32, ql)
    assert ql.dequantize().dtype == torch.float32


@fmt_param
@pytest.mark.parametrize("axis", [0, -1])
def test_noncontiguous_2d(gen, fmt, axis):
    base = wide(gen, (128, 64))
    views = {
        "transposed": base.t(),  # (64, 128)
        "row-strided": wide(gen, (128, 128))[::2],  # (64, 128)
        "col-strided": wide(gen, (64, 256))[:, 1::2],  # (64, 128)
        "bf16-transposed": base.bfloat16().t(),
    }
    for name, v in views.items():
        assert not v.is_contiguous(), name
        assert_q_equal(grouped.quantize(v, fmt, axis=axis), grouped.quantize(v.contiguous(), fmt, axis=axis))
        split = [10, 0, 50]
        assert_q_equal(
            grouped.quantize(v, fmt, axis=axis, split_sizes=split),
            grouped.quantize(v.contiguous(), fmt, axis=axis, split_sizes=split),
        )


@fmt_param
@pytest.mark.parametrize("axis", [1, -1])
def test_noncontiguous_3d(gen, fmt, axis):
    w = wide(gen, (3, 64, 32)).transpose(1, 2)  # (3, 32, 64)
    assert not w.is_contiguous()
    assert_q_equal(grouped.quantize(w, fmt, axis=axis), grouped.quantize(w.contiguous(), fmt, axis=axis))
    w2 = wide(gen, (6, 32, 64))[::2]
    assert_q_equal(grouped.quantize(w2, fmt, axis=axis), grouped.quantize(w2.contiguous(), fmt, axis=axis))


@fmt_param
def test_input_not_modified(gen, fmt):
    x = wide(gen, (64, 64))
    x[3, 3] = float("nan")
    keep = x.clone()
    grouped.quantize(x, fmt, axis=0, split_sizes=[10, 20])
    grouped.quantize(x, fmt)
    assert torch.equal(x.view(torch.int32), keep.view(torch.int32))


# ----------------------------------------------------------------------------- scale layouts


@fmt_param
@case_param
def test_with_layout(gen, fmt, shape, axis, split_sizes):
    x = wide(gen, shape)
    q = grouped.quantize(x, fmt, axis=axis, split_sizes=split_sizes)
    qb = q.with_layout("blocked")
    assert qb.layout == "blocked"
    assert q.layout == "compact"  # the original is untouched
    assert_bytes_equal(qb.scale, grouped.to_blocked(q.scale))
    assert qb.scale.dtype == q.scale.dtype
    *lead, rows, cols = q.scale.shape
    assert tuple(qb.scale.shape) == (*lead, grouped.scale_layout.blocked_numel(rows, cols))
    assert qb.data is q.data
    assert qb.global_scale is q.global_scale
    assert_bytes_equal(qb.compact_scale(), q.scale)
    torch.testing.assert_close(qb.dequantize(), q.dequantize(), rtol=0, atol=0)
    assert qb.with_layout("blocked") is qb
    qc = qb.with_layout("compact")
    assert qc.layout == "compact"
    assert_q_equal(qc, q)
    assert q.with_layout("compact") is q


@fmt_param
@pytest.mark.parametrize("bad", ["Blocked", "swizzled", "", None, 1])
def test_with_layout_bad_name(gen, fmt, bad):
    q = grouped.quantize(wide(gen, (32, 64)), fmt)
    with pytest.raises(ValueError, match="layout"):
        q.with_layout(bad)


# ----------------------------------------------------------------------------- non-finite input


@fmt_param
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_blocks(gen, fmt, axis, bad_value):
    desc = _f(fmt)
    B = desc.block_size
    x = wide(gen, (64, 64), span=10)
    bad_at = [(0, 0), (37, 21), (63, 63)]
    for i, j in bad_at:
        x[i, j] = bad_value
    q = grouped.quantize(x, fmt, axis=axis)
    deq = q.dequantize()

    # stored coordinates: (row, block) with blocks along the last stored dim
    bad_blocks = {(i, j // B) if axis == -1 else (j, i // B) for i, j in bad_at}
    block_mask = torch.zeros(q.scale.shape, dtype=torch.bool)
    for r, b in bad_blocks:
        block_mask[r, b] = True
    elem_mask = block_mask.repeat_interleave(B, dim=-1)
    if axis == 0:
        elem_mask = elem_mask.t()
    assert torch.isnan(deq[elem_mask]).all()
    assert torch.isfinite(deq[~elem_mask]).all()

    # scale and data bytes of bad blocks, per the formats.py policy
    if desc.name == "mxfp8":
        assert torch.all(q.scale[block_mask] == 255)
        stored_mask = block_mask.repeat_interleave(B, dim=-1)
        assert torch.isnan(q.data.float()[stored_mask]).all()
    else:
        assert torch.isnan(q.scale.float()[block_mask]).all()
        stored_mask = block_mask.repeat_interleave(B // 2, dim=-1)
        assert torch.all(q.data[stored_mask] == 0)

    # other blocks unaffected: same bytes as with the bad values replaced by 0
    # (for NVFP4 S too: the per-tensor amax ignores non-finite values)
    clean = x.clone()
    for i, j in bad_at:
        clean[i, j] = 0.0
    qc = grouped.quantize(clean, fmt, axis=axis)
    if desc.has_global_scale:
        assert torch.equal(q.global_scale, qc.global_scale)
        assert torch.isfinite(q.global_scale).all()
    assert torch.equal(_bytes(q.scale)[~block_mask], _bytes(qc.scale)[~block_mask])
    keep = ~block_mask.repeat_interleave(B // desc.elements_per_byte, dim=-1)
    assert torch.equal(_bytes(q.data)[keep], _bytes(qc.data)[keep])
    torch.testing.assert_close(deq[~elem_mask], qc.dequantize()[~elem_mask], rtol=0, atol=0)
    torch.testing.assert_close(deq, reference_dequantize(q), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("axis", [0, -1])
def test_nvfp4_nonfinite_group_global_scale(gen, axis):
    """Per-group S ignores non-finite values too; a group of only non-finite values gets S = 1."""
    x = wide(gen, (48, 32), span=10)
    x[0, 0] = float("inf")
    x[16:32] = float("nan")
    q = grouped.quantize(x, "nvfp4", axis=axis, split_sizes=[16, 16, 16])
    clean = x.clone()
    clean[0, 0] = 0.0
    clean[16:32] = 0.0
    qc = grouped.quantize(clean, "nvfp4", axis=axis, split_sizes=[16, 16, 16])
    assert torch.equal(q.global_scale, qc.global_scale)
    assert q.global_scale[1].item() == 1.0
    deq = q.dequantize()
    assert torch.isnan(deq[16:32]).all()
    assert torch.isfinite(deq[32:]).all()


# ----------------------------------------------------------------------------- validation


def _x(shape=(64, 64), dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


BAD_CALLS = [
    ("unknown-format", lambda: grouped.quantize(_x(), "fp8"), r"fmt"),
    ("format-int", lambda: grouped.quantize(_x(), 8), r"fmt"),
    ("bf16-format", lambda: grouped.quantize(_x(), "bf16"), r"fmt"),
    ("bf16-descriptor", lambda: grouped.quantize(_x(), grouped.BF16), r"fmt"),
    ("x-list", lambda: grouped.quantize([[1.0] * 32] * 32, "mxfp8"), r"\bx\b"),
    ("x-numpy-like", lambda: grouped.quantize(_x().numpy(), "nvfp4"), r"\bx\b"),
    ("x-int32", lambda: grouped.quantize(_x(dtype=torch.int32), "mxfp8"), r"\bx\b"),
    ("x-uint8", lambda: grouped.quantize(_x(dtype=torch.uint8), "nvfp4"), r"\bx\b"),
    ("x-fp64", lambda: grouped.quantize(_x(dtype=torch.float64), "mxfp8"), r"\bx\b"),
    ("x-fp8", lambda: grouped.quantize(_x(dtype=torch.float8_e4m3fn), "mxfp8"), r"\bx\b"),
    ("x-1d", lambda: grouped.quantize(_x((64,)), "mxfp8"), r"\bx\b"),
    ("x-0d", lambda: grouped.quantize(torch.tensor(1.0), "nvfp4"), r"\bx\b"),
    ("x-4d", lambda: grouped.quantize(_x((2, 2, 32, 32)), "nvfp4"), r"\bx\b"),
    ("axis-0-3d", lambda: grouped.quantize(_x((2, 32, 32)), "mxfp8", axis=0), r"axis"),
    ("axis-2-2d", lambda: grouped.quantize(_x(), "mxfp8", axis=2), r"axis"),
    ("axis-minus3-3d", lambda: grouped.quantize(_x((2, 32, 32)), "nvfp4", axis=-3), r"axis"),
    ("axis-none", lambda: grouped.quantize(_x(), "nvfp4", axis=None), r"axis"),
    ("mxfp8-K48", lambda: grouped.quantize(_x((32, 48)), "mxfp8"), r"block size"),
    ("nvfp4-K24", lambda: grouped.quantize(_x((32, 24)), "nvfp4"), r"block size"),
    ("mxfp8-M40-axis0", lambda: grouped.quantize(_x((40, 64)), "mxfp8", axis=0), r"split_sizes"),
    ("nvfp4-M40-axis0", lambda: grouped.quantize(_x((40, 64)), "nvfp4", axis=0), r"split_sizes"),
    ("3d-N48-axis1", lambda: grouped.quantize(_x((2, 48, 64)), "mxfp8", axis=1), r"block size"),
    ("split-K48-rowwise", lambda: grouped.quantize(_x((64, 48)), "mxfp8", split_sizes=[10]), r"block size"),
    ("split-negative", lambda: grouped.quantize(_x(), "mxfp8", axis=0, split_sizes=[5, -1, 3]), r"split_sizes"),
    ("split-past-rows", lambda: grouped.quantize(_x(), "nvfp4", axis=0, split_sizes=[60, 5]), r"split_sizes"),
    ("split-past-rows-row", lambda: grouped.quantize(_x(), "mxfp8", split_sizes=[65]), r"split_sizes"),
    ("split-3d", lambda: grouped.quantize(_x((2, 32, 32)), "nvfp4", split_sizes=[1, 1]), r"split_sizes"),
    ("split-float-tensor", lambda: grouped.quantize(_x(), "mxfp8", split_sizes=torch.tensor([3.0, 4.0])),
     r"split_sizes"),
    ("split-2d-tensor", lambda: grouped.quantize(_x(), "mxfp8", split_sizes=torch.tensor([[3, 4]])), r"split_sizes"),
    ("split-float-list", lambda: grouped.quantize(_x(), "nvfp4", split_sizes=[3.0, 4.0]), r"split_sizes"),
    ("split-int", lambda: grouped.quantize(_x(), "nvfp4", split_sizes=5), r"split_sizes"),
    ("split-bool-list", lambda: grouped.quantize(_x(), "nvfp4", split_sizes=[True, False]), r"split_sizes"),
]


@pytest.mark.parametrize("call, match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_format_names_case_insensitive(gen):
    x = wide(gen, (32, 64))
    assert_q_equal(grouped.quantize(x, "MXFP8"), grouped.quantize(x, grouped.MXFP8))
    assert_q_equal(grouped.quantize(x, "NvFp4"), grouped.quantize(x, grouped.NVFP4))


def test_mxfp8_scale_bytes_vary_over_many_binades(gen):
    """Sanity check of the test data: block amaxes span many binades, so do scales."""
    x = wide(gen, (64, 256))
    q = grouped.quantize(x, "mxfp8")
    sb = q.scale.to(torch.int64)
    assert int(sb.max() - sb.min()) > 20
    assert math.isfinite(float(q.dequantize().abs().max()))
