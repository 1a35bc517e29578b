"""grouped.gemm on the CPU (reference backend): every layout x format against an
independent fp64 reference, ragged splits, caller buffers, wgrad accumulation,
the forms split sizes can take, and GroupedTensor operands.

The reference here is written from docs/design.md ("The three GEMMs", "Numerics"):
a per-expert loop of fp64 matmuls on the operands' dequantized values
(``QuantizedTensor.dequantize`` is tested bit-exactly elsewhere; BF16 operands
are taken as they are). Tolerances are docs/design.md's "Tolerances in tests" (under "Numerics").
"""

import pytest
import torch
from gemm_operands import layout_operands

import grouped
from grouped import GroupedTensor

FORMATS = ["bf16", "mxfp8", "nvfp4"]
QUANTIZED = ["mxfp8", "nvfp4"]
LAYOUTS = ["forward", "dgrad", "wgrad"]
OUT_DTYPES = [torch.bfloat16, torch.float32]
F64 = torch.float64

# name -> (split sizes, rows of the token tensors M); G = 4 everywhere.
SPLITS = {
    "uniform": ([32, 32, 32, 32], 128),
    "skewed": ([3, 150, 2, 5], 160),
    "empty_experts": ([40, 0, 57, 0], 97),
    "all_empty": ([0, 0, 0, 0], 16),
    "single_rows": ([1, 1, 1, 1], 4),
    "sum_lt_m": ([20, 13, 0, 30], 90),
}
SPLIT_NAMES = list(SPLITS)


# ----------------------------------------------------------------------------- helpers


def _rand(gen, *shape):
    """fp32 normals with per-row magnitudes over a few binades (never all zeros)."""
    rows = shape[:-1]
    scale = torch.exp2(torch.randint(-3, 4, (*rows, 1), generator=gen).float())
    return torch.randn(*shape, generator=gen) * scale


def _data(gen, m, n, k, g=4):
    """x (M, K), dy (M, N), w (G, N, K), fp32."""
    return _rand(gen, m, k), _rand(gen, m, n), _rand(gen, g, n, k)


def _value(op) -> torch.Tensor:
    """The fp64 value an operand stands for."""
    if isinstance(op, torch.Tensor):
        return op.double()
    return op.dequantize().double()


def _reference(layout, a, b, sizes, m_total):
    """Independent fp64 per-expert loop. Rows past the split total are NaN (never compared)."""
    A, B = _value(a), _value(b)
    if layout == "wgrad":
        out = torch.zeros(len(sizes), A.shape[1], B.shape[1], dtype=F64)
    else:
        width = B.shape[1] if layout == "forward" else B.shape[2]
        out = torch.full((m_total, width), float("nan"), dtype=F64)
    start = 0
    for g, m in enumerate(sizes):
        rows = slice(start, start + m)
        start += m
        if layout == "forward":
            out[rows] = torch.matmul(A[rows], B[g].transpose(0, 1))
        elif layout == "dgrad":
            out[rows] = torch.matmul(A[rows], B[g])
        else:
            out[g] = torch.matmul(A[rows].transpose(0, 1), B[rows])
    return out


def _valid(layout, t, sizes):
    """The part of an output the GEMM defines (rows inside the split total)."""
    return t if layout == "wgrad" else t[: sum(sizes)]


def assert_matches(out: torch.Tensor, ref: torch.Tensor, fmt: str):
    """docs/design.md tolerances: normwise for fp32; normwise + per-row ulp bound for bf16."""
    assert out.shape == ref.shape
    got = out.double()
    assert torch.isfinite(got).all(), "non-finite values in the output"
    err, scale = (got - ref).norm().item(), ref.norm().item()
    if out.dtype == torch.float32:
        tol = 1e-5 if fmt == "bf16" else 1e-4
    else:
        assert out.dtype == torch.bfloat16
        tol = 4e-3
    if scale == 0:
        assert err == 0, f"reference is zero, output has norm {got.norm().item()}"
    else:
        assert err <= tol * scale, f"normwise relative error {err / scale:.3g} > {tol}"
    if out.dtype == torch.bfloat16 and ref.numel():
        row_max = ref.abs().amax(dim=-1, keepdim=True)
        ulp = torch.where(
            row_max > 0, torch.exp2(torch.floor(torch.log2(row_max)) - 7), torch.zeros_like(row_max)
        )
        bad = (got - ref).abs() > ulp
        assert not bad.any(), f"{int(bad.sum())} elements further than one bf16 ulp of their row's max"


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A copy of t's bit patterns (so NaN sentinels compare exactly)."""
    return t.view(_INT_VIEW[t.element_size()]).clone()


def _out_shape(layout, m, n, k, g=4):
    return {"forward": (m, n), "dgrad": (m, k), "wgrad": (g, n, k)}[layout]


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["out_bf16", "out_fp32"])
@pytest.mark.parametrize("split", SPLIT_NAMES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_fp64_reference(layout, fmt, split, out_dtype, gen):
    sizes, m = SPLITS[split]
    n, k = 64, 96
    x, dy, w = _data(gen, m, n, k)
    a, b = layout_operands(layout, fmt, x, dy, w, sizes)
    out = grouped.gemm(a, b, sizes, layout=layout, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    assert tuple(out.shape) == _out_shape(layout, m, n, k)
    ref = _reference(layout, a, b, sizes, m)
    assert_matches(_valid(layout, out, sizes), _valid(layout, ref, sizes), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nk", [(32, 32), (32, 96), (96, 64)], ids=lambda nk: f"n{nk[0]}k{nk[1]}")
def test_other_shapes_default_dtype(layout, fmt, nk, gen):
    """Default out_dtype is bf16; the explicit reference backend gives the same bits as auto."""
    sizes, m = [7, 0, 33, 64, 1], 120
    n, k = nk
    x, dy, w = _data(gen, m, n, k, g=5)
    a, b = layout_operands(layout, fmt, x, dy, w, sizes)
    out = grouped.gemm(a, b, sizes, layout=layout)
    assert out.dtype == torch.bfloat16
    ref = _reference(layout, a, b, sizes, m)
    assert_matches(_valid(layout, out, sizes), _valid(layout, ref, sizes), fmt)
    forced = grouped.gemm(a, b, sizes, layout=layout, backend="reference")
    assert torch.equal(_valid(layout, forced, sizes), _valid(layout, out, sizes))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_past_total_are_never_read(layout, fmt, gen):
    """NaN/Inf in token rows past sum(split_sizes) must not reach the output."""
    sizes, m = [9, 0, 21, 2], 64
    n, k = 64, 32
    x, dy, w = _data(gen, m, n, k)
    total = sum(sizes)
    x[total:] = float("nan")
    dy[total:] = float("inf")
    dy[total + 1 :: 2] = float("nan")
    a, b = layout_operands(layout, fmt, x, dy, w, sizes)
    out = grouped.gemm(a, b, sizes, layout=layout, out_dtype=torch.float32)
    ref = _reference(layout, a, b, sizes, m)
    assert_matches(_valid(layout, out, sizes), _valid(layout, ref, sizes), fmt)


# ----------------------------------------------------------------------------- caller buffers


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["out_bf16", "out_fp32"])
@pytest.mark.parametrize("split", ["skewed", "empty_experts", "all_empty", "sum_lt_m"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_poisoned_out_is_written_inside_total_only(layout, fmt, split, out_dtype, gen):
    sizes, m = SPLITS[split]
    n, k = 32, 64
    x, dy, w = _data(gen, m, n, k)
    a, b = layout_operands(layout, fmt, x, dy, w, sizes)
    out = torch.full(_out_shape(layout, m, n, k), float("nan"), dtype=out_dtype)
    before = _bits(out)
    result = grouped.gemm(a, b, sizes, layout=layout, out=out)
    assert result is out
    total = sum(sizes)
    ref = _reference(layout, a, b, sizes, m)
    # Every row inside the split total was written (no NaN left) and is right.
    assert_matches(_valid(layout, out, sizes), _valid(layout, ref, sizes), fmt)
    if layout == "wgrad":
        for g, mg in enumerate(sizes):
            if mg == 0:
                assert torch.equal(out[g], torch.zeros_like(out[g])), f"empty expert {g} is not zero"
    else:
        assert torch.equal(_bits(out)[total:], before[total:]), "rows past the split total were touched"
    # Bit-identical to what the library allocates itself.
    own = grouped.gemm(a, b, sizes, layout=layout, out_dtype=out_dtype)
    assert torch.equal(_valid(layout, out, sizes), _valid(layout, own, sizes))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["out_bf16", "out_fp32"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_caller_buffer(layout, fmt, out_dtype, gen):
    """out = big[..., :width] with a wider, 16-byte-aligned row stride."""
    sizes, m = [17, 0, 40, 6], 70
    n, k = 64, 32
    x, dy, w = _data(gen, m, n, k)
    a, b = layout_operands(layout, fmt, x, dy, w, sizes)
    shape = _out_shape(layout, m, n, k)
    pad = 16 // torch.empty((), dtype=out_dtype).element_size() * 3  # 48 bytes more a row
    big = torch.full((*shape[:-1], shape[-1] + pad), -7.25, dtype=out_dtype)
    out = big[..., : shape[-1]]
    assert out.stride(-2) == shape[-1] + pad and (out.stride(-2) * out.element_size()) % 16 == 0
    before = _bits(big)
    result = grouped.gemm(a, b, sizes, layout=layout, out=out)
    assert result is out
    after = _bits(big)
    assert torch.equal(after[..., shape[-1] :], before[..., shape[-1] :]), "columns past the row were touched"
    if layout != "wgrad":
        assert torch.equal(after[sum(sizes) :], before[sum(sizes) :]), "rows past the total were touched"
    own = grouped.gemm(a, b, sizes, layout=layout, out_dtype=out_dtype)
    assert torch.equal(_valid(layout, out, sizes), _valid(layout, own, sizes))
    ref = _reference(layout, a, b, sizes, m)
    assert_matches(_valid(layout, out, sizes), _valid(layout, ref, sizes), fmt)


# ----------------------------------------------------------------------------- wgrad


@pytest.mark.parametrize("explicit_dtype", [False, True], ids=["out_dtype_none", "out_dtype_fp32"])
@pytest.mark.parametrize("split", ["uniform", "empty_experts", "all_empty", "sum_lt_m"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_wgrad_accumulate_into_main_grad(fmt, split, explicit_dtype, gen):
    sizes, m = SPLITS[split]
    n, k = 32, 64
    x, dy, w = _data(gen, m, n, k)
    a, b = layout_operands("wgrad", fmt, x, dy, w, sizes)
    main_grad = _rand(gen, 4, n, k)
    main_before = main_grad.clone()
    kw = {"out_dtype": torch.float32} if explicit_dtype else {}
    result = grouped.gemm(a, b, sizes, layout="wgrad", out=main_grad, accumulate=True, **kw)
    assert result is main_grad and main_grad.dtype == torch.float32
    ref = main_before.double() + _reference("wgrad", a, b, sizes, m)
    tol = 1e-5 if fmt == "bf16" else 1e-4
    err = (main_grad.double() - ref).norm() / ref.norm()
    assert err <= tol, f"normwise relative error {err:.3g}"
    for g, mg in enumerate(sizes):
        if mg == 0:
            assert torch.equal(_bits(main_grad[g]), _bits(main_before[g])), f"empty expert {g} changed main_grad"
        else:
            assert not torch.equal(main_grad[g], main_before[g])


@pytest.mark.parametrize("fmt", FORMATS)
def test_wgrad_accumulate_twice_adds_twice(fmt, gen):
    sizes, m = [10, 30, 0, 24], 64
    n, k = 32, 32
    x, dy, w = _data(gen, m, n, k)
    a, b = layout_operands("wgrad", fmt, x, dy, w, sizes)
    main_grad = _rand(gen, 4, n, k)
    start = main_grad.double().clone()
    grouped.gemm(a, b, sizes, layout="wgrad", out=main_grad, accumulate=True)
    grouped.gemm(a, b, sizes, layout="wgrad", out=main_grad, accumulate=True)
    ref = start + 2 * _reference("wgrad", a, b, sizes, m)
    tol = 1e-5 if fmt == "bf16" else 1e-4
    assert (main_grad.double() - ref).norm() <= tol * ref.norm()


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["out_bf16", "out_fp32"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_wgrad_empty_expert_gives_zeros_without_accumulate(fmt, out_dtype, gen):
    sizes, m = [0, 25, 0, 39], 64
    n, k = 32, 32
    x, dy, w = _data(gen, m, n, k)
    a, b = layout_operands("wgrad", fmt, x, dy, w, sizes)
    out = _rand(gen, 4, n, k).to(out_dtype)  # stale values, as in a reused buffer
    grouped.gemm(a, b, sizes, layout="wgrad", out=out)
    for g in (0, 2):
        assert torch.equal(out[g], torch.zeros_like(out[g]))
    assert_matches(out, _reference("wgrad", a, b, sizes, m), fmt)
    own = grouped.gemm(a, b, sizes, layout="wgrad", out_dtype=out_dtype)
    assert torch.equal(own, out)


# ----------------------------------------------------------------------------- split forms


def _split_forms(sizes):
    ends = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    return {
        "list": dict(split_sizes=list(sizes)),
        "tuple": dict(split_sizes=tuple(sizes)),
        "int32": dict(split_sizes=torch.tensor(sizes, dtype=torch.int32)),
        "int64": dict(split_sizes=torch.tensor(sizes, dtype=torch.int64)),
        "offsets_int32": dict(offsets=ends.to(torch.int32)),
        "offsets_int64": dict(offsets=ends),
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_size_forms_agree(layout, fmt, gen):
    sizes, m = [12, 0, 31, 5], 60
    n, k = 32, 64
    x, dy, w = _data(gen, m, n, k)
    a, b = layout_operands(layout, fmt, x, dy, w, sizes)
    results = {}
    for name, kw in _split_forms(sizes).items():
        out = torch.full(_out_shape(layout, m, n, k), float("nan"), dtype=torch.float32)
        grouped.gemm(a, b, layout=layout, out=out, **kw)
        results[name] = out
    first = results["list"]
    for name, out in results.items():
        assert torch.equal(_bits(out), _bits(first)), f"split sizes given as {name} differ from the list"
    ref = _reference(layout, a, b, sizes, m)
    assert_matches(_valid(layout, first, sizes), _valid(layout, ref, sizes), fmt)


def test_offsets_with_empty_experts_and_all_empty(gen):
    n, k = 32, 32
    x, dy, w = _data(gen, 40, n, k)
    xb, wb = x.bfloat16(), w.bfloat16()
    for sizes in ([0, 0, 0, 0], [0, 40, 0, 0], [10, 0, 0, 30], [0, 0, 0, 17]):
        via_offsets = torch.full((40, n), float("nan"))
        via_sizes = torch.full((40, n), float("nan"))
        ends = torch.tensor(sizes).cumsum(0)
        grouped.gemm(xb, wb, offsets=ends, out=via_offsets)
        grouped.gemm(xb, wb, sizes, out=via_sizes)
        assert torch.equal(_bits(via_offsets), _bits(via_sizes)), sizes


# ----------------------------------------------------------------------------- GroupedTensor operands


def _grouped_tokens(t, sizes, fmt):
    return GroupedTensor.from_tensor(t, sizes, fmt, columnwise=True)


def _grouped_weights(w, fmt):
    g, n, k = w.shape
    return GroupedTensor([(n, k)] * g, fmt, columnwise=True).quantize_(list(w))


def _quantized_like_grouped(layout, fmt, x, dy, w, sizes):
    """The QuantizedTensor operands with the same values as the GroupedTensor ones.

    Token operands are quantized with split_sizes so NVFP4 gets one per-tensor
    scale per expert, as a GroupedTensor member does.
    """
    q = grouped.quantize
    if layout == "forward":
        return q(x, fmt, split_sizes=sizes), q(w, fmt)
    if layout == "dgrad":
        return q(dy, fmt, split_sizes=sizes), q(w, fmt, axis=1)
    return q(dy, fmt, axis=0, split_sizes=sizes), q(x, fmt, axis=0, split_sizes=sizes)


@pytest.mark.parametrize("split", ["uniform", "skewed", "empty_experts", "all_empty", "single_rows", "sum_lt_m"])
@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_tensor_operands_match_quantized_tensor(layout, fmt, split, gen):
    sizes, m = SPLITS[split]
    n, k = 64, 32
    x, dy, w = _data(gen, m, n, k)
    total = sum(sizes)
    qa, qb = _quantized_like_grouped(layout, fmt, x, dy, w, sizes)
    if layout == "wgrad":
        ga, gb = _grouped_tokens(dy, sizes, fmt), _grouped_tokens(x, sizes, fmt)
    else:
        ga = _grouped_tokens(x if layout == "forward" else dy, sizes, fmt)
        gb = _grouped_weights(w, fmt)
    for out_dtype in OUT_DTYPES:
        want = grouped.gemm(qa, qb, sizes, layout=layout, out_dtype=out_dtype)
        got = grouped.gemm(ga, gb, sizes, layout=layout, out_dtype=out_dtype)
        if layout == "wgrad":
            assert torch.equal(got, want)
        else:
            # A GroupedTensor holds only the grouped rows: the output has sum(sizes) rows.
            assert got.shape[0] == total
            assert torch.equal(got, want[:total])
        ref = _reference(layout, qa, qb, sizes, m)
        assert_matches(_valid(layout, got, sizes), _valid(layout, ref, sizes), fmt)
    # Mixed operand kinds, where the row counts agree (sum(sizes) == M).
    if total == m:
        want = grouped.gemm(qa, qb, sizes, layout=layout, out_dtype=torch.float32)
        for a, b in ((ga, qb), (qa, gb)):
            got = grouped.gemm(a, b, sizes, layout=layout, out_dtype=torch.float32)
            assert torch.equal(got, want)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_grouped_tensor_wgrad_accumulate_and_caller_buffer(fmt, gen):
    sizes, m = [20, 0, 44, 0], 64
    n, k = 32, 64
    x, dy, w = _data(gen, m, n, k)
    ga, gb = _grouped_tokens(dy, sizes, fmt), _grouped_tokens(x, sizes, fmt)
    qa, qb = _quantized_like_grouped("wgrad", fmt, x, dy, w, sizes)
    main_grad = _rand(gen, 4, n, k)
    expect = main_grad.clone()
    grouped.gemm(ga, gb, sizes, layout="wgrad", out=main_grad, accumulate=True)
    grouped.gemm(qa, qb, sizes, layout="wgrad", out=expect, accumulate=True)
    assert torch.equal(main_grad, expect)


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("layout", ["forward", "dgrad"])
def test_grouped_tensor_forward_dgrad_into_caller_buffer(layout, fmt, gen):
    sizes, m = [5, 27, 0, 32], 64
    n, k = 32, 64
    x, dy, w = _data(gen, m, n, k)
    ga = _grouped_tokens(x if layout == "forward" else dy, sizes, fmt)
    gb = _grouped_weights(w, fmt)
    shape = _out_shape(layout, m, n, k)
    big = torch.full((shape[0], shape[1] + 8), float("nan"), dtype=torch.bfloat16)
    out = big[:, : shape[1]]
    before = _bits(big)
    grouped.gemm(ga, gb, sizes, layout=layout, out=out)
    own = grouped.gemm(ga, gb, sizes, layout=layout)
    assert torch.equal(out, own)
    assert torch.equal(_bits(big)[:, shape[1] :], before[:, shape[1] :])


@pytest.mark.parametrize("splits", [[40, 0, 20, 36], [0, 0, 0, 0]], ids=["ragged", "empty"])
def test_weight_only_nvfp4_forward_is_bf16_times_dequantized_weight(splits, gen):
    """A bf16 activation with an NVFP4 weight (serving): no activation quantization; the result is
    the fp64 GEMM of the activation and the dequantized weight, per expert."""
    x = torch.randn(100, 64, generator=gen).to(torch.bfloat16)
    qw = grouped.quantize(torch.randn(4, 48, 64, generator=gen), "nvfp4")
    decision = grouped.explain(x, qw, splits)
    assert decision.problem.weight_only and decision.problem.fmt == "nvfp4"
    out = grouped.gemm(x, qw, splits, out_dtype=torch.float32)
    w = qw.dequantize().double()
    start = 0
    for g, m in enumerate(splits):
        rows = slice(start, start + m)
        start += m
        expected = x[rows].double() @ w[g].T
        assert torch.allclose(out[rows].double(), expected, rtol=1e-6, atol=1e-6)
    assert (out[sum(splits):] == 0).all()
