"""GPU tests for the sm90 block-scaled grouped GEMMs (the cute backend's MXFP8 and NVFP4 paths,
and bf16 activations with NVFP4 weights).

Against fp64 on the dequantized operands (docs/design.md: fp32 output within 1e-4 normwise, bf16
output within 4e-3 and one bf16 ulp of its row's largest element). The operands are built to
stress the decode: block scales that differ by up to 2^+-20 within a row, all-zero blocks,
group sizes that are not block multiples (wgrad: blocks restart at each expert), empty experts,
contraction lengths that end inside a 64-wide k tile, MXFP8 blocks whose scale is past bf16's
largest power of two (a second multiply) or near the bottom of its range, NVFP4's per-group and
per-tensor scales S. Outputs go into NaN-poisoned strided caller buffers: every element inside
the split total is written, nothing past it changes. Every schedule runs (static with clusters
of one and two CTAs, dynamic).
"""

from __future__ import annotations

import pytest
import torch
from conftest import kernels_unavailable
from test_gemm_gpu import gemm_into_poisoned_buffer, out_shape, reference, valid, wgrad_accumulate

import grouped

G, M = 9, 12000
SIZES = [1, 0, 127, 4000, 129, 128, 0, 3500, 2000]  # sum 9885 < M; 1, 127, 129 not block multiples
WIDTHS = [(1056, 1056), (1000, 1024)]  # (N, K): contractions ending mid k-tile, a partial last column tile
MX_FP32_TOL, BF16_TOL = 1e-4, 4e-3  # docs/design.md, for MXFP8 and NVFP4
BLOCK = 32  # the data's scale pattern (both formats' blocks divide it)
FORMATS = ["mxfp8", "nvfp4"]


@pytest.fixture(params=[(1, False), (2, False), (1, True)], ids=["cluster1", "cluster2", "dynamic"])
def schedule(request, monkeypatch):
    from cute_backend.sm90 import grouped_gemm as sm90

    monkeypatch.setattr(sm90, "schedule_for", lambda *args: request.param)
    return request.param


def blocky(gen, rows, cols, *, blocks_along: int, spread: int = 20, zero_blocks: float = 0.05) -> torch.Tensor:
    """randn whose blocks of 32 along dim ``blocks_along`` are scaled by 2^e, e in [-spread, spread],
    with a share of all-zero blocks: neighbouring blocks' E8M0 scales differ by up to 2^(2 spread)."""
    x = torch.randn(rows, cols, generator=gen)
    shape = (rows, -(-cols // BLOCK)) if blocks_along == 1 else (-(-rows // BLOCK), cols)
    e = torch.randint(-spread, spread + 1, shape, generator=gen).float()
    e[torch.rand(shape, generator=gen) < zero_blocks] = float("-inf")  # 2^-inf = 0: an all-zero block
    factor = torch.exp2(e).repeat_interleave(BLOCK, dim=blocks_along)
    factor = factor[:rows, :cols]
    return x * factor


def operands(layout, n, k, gen, sizes=SIZES, fmt="mxfp8", **kw):
    """Quantized (a, b) on the GPU for a layout; token rows past the split total are NaN. NVFP4
    activations get one S a group (split_sizes), weights one an expert."""
    total = sum(sizes)

    def tokens(cols, along):
        t = blocky(gen, M, cols, blocks_along=along, **kw)
        t[total:] = float("nan")  # never to be read
        return t.cuda()

    rowwise = {"split_sizes": sizes} if fmt == "nvfp4" else {}
    if layout == "forward":
        x, w = tokens(k, 1), torch.stack([blocky(gen, n, k, blocks_along=1, **kw) for _ in range(G)]).cuda()
        return grouped.quantize(x, fmt, **rowwise), grouped.quantize(w, fmt)
    if layout == "dgrad":
        dy, w = tokens(n, 1), torch.stack([blocky(gen, n, k, blocks_along=0, **kw) for _ in range(G)]).cuda()
        return grouped.quantize(dy, fmt, **rowwise), grouped.quantize(w, fmt, axis=1)
    dy, x = tokens(n, 0), tokens(k, 0)
    return (grouped.quantize(dy, fmt, axis=0, split_sizes=sizes),
            grouped.quantize(x, fmt, axis=0, split_sizes=sizes))


def dequantized(layout, qa, qb):
    return qa.dequantize().double(), qb.dequantize().double()


def assert_mx_close(out, ref, out_dtype, what):
    assert torch.isfinite(out).all(), f"{what}: {int((~torch.isfinite(out)).sum())} non-finite elements"
    diff = out.double() - ref
    rel = float(diff.norm() / ref.norm())
    tol = MX_FP32_TOL if out_dtype == torch.float32 else BF16_TOL
    assert rel <= tol, f"{what}: normwise relative error {rel:.3e} > {tol:.0e}"
    if out_dtype == torch.bfloat16:
        bound = torch.exp2(torch.floor(torch.log2(ref.abs().amax(dim=1, keepdim=True))) - 7)
        over = diff.abs() > bound
        assert not over.any(), f"{what}: {int(over.sum())} elements further than one bf16 ulp of their row's max"


def require_cute(qa, qb, sizes=SIZES, **kwargs):
    decision = grouped.explain(qa, qb, sizes, backend="cute", **kwargs)
    if decision.backend != "cute":
        kernels_unavailable(f"cute cannot run this MXFP8 call: {decision.reasons['cute']}")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("split_source", ["host", "cuda"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16out", "fp32out"])
@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
@pytest.mark.parametrize("n, k", WIDTHS, ids=[f"N{n}K{k}" for n, k in WIDTHS])
def test_into_poisoned_caller_buffer(n, k, layout, out_dtype, split_source, fmt, schedule, gen):
    if layout == "dgrad" and n % BLOCK:
        pytest.skip("dgrad contracts over N: it must be a block multiple")
    total = sum(SIZES)
    qa, qb = operands(layout, n, k, gen, fmt=fmt)
    shape = out_shape(layout, M, n, k, G)
    require_cute(qa, qb, layout=layout, out_dtype=out_dtype)
    splits = SIZES if split_source == "host" else torch.tensor(SIZES, dtype=torch.int32, device="cuda")
    out = gemm_into_poisoned_buffer(qa, qb, splits, layout, shape, out_dtype, total, backend="cute")
    ref = reference(layout, *dequantized(layout, qa, qb), SIZES, shape)
    assert_mx_close(valid(layout, out, total), valid(layout, ref, total), out_dtype, f"{fmt} {layout}")
    if layout == "wgrad":
        for g, m in enumerate(SIZES):
            if m == 0:
                assert torch.equal(out[g], torch.zeros_like(out[g])), f"empty expert {g} not zero"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_wgrad_accumulate_leaves_empty_experts(fmt, schedule, gen):
    n, k = WIDTHS[0]
    qa, qb = operands("wgrad", n, k, gen, fmt=fmt)
    require_cute(qa, qb, layout="wgrad", out_dtype=torch.float32)
    main_grad, before = wgrad_accumulate(qa, qb, SIZES, (G, n, k), gen, backend="cute")
    expected = before.double() + reference("wgrad", *dequantized("wgrad", qa, qb), SIZES, (G, n, k))
    assert_mx_close(valid("wgrad", main_grad, 0), valid("wgrad", expected, 0), torch.float32, f"{fmt} accumulate")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
@pytest.mark.parametrize("extreme", ["large", "tiny"])
def test_mxfp8_scale_range_ends(layout, extreme, gen):
    """Blocks with E8M0 scales past bf16's largest power of two (2^8 and up: the decode's second
    multiply) or near the bottom of the range (2^-118), paired with the inverse on the other
    operand so products stay in fp32's range."""
    sizes = [96, 0, 33, 200]
    n, k = 256, 320
    big_e, small_e = (60, -60) if extreme == "large" else (-110, 90)
    qa, qb = operands_with_offsets(layout, n, k, sizes, gen, big_e, small_e)
    shape = out_shape(layout, 512, n, k, len(sizes))
    require_cute(qa, qb, sizes, layout=layout, out_dtype=torch.float32)
    out = grouped.gemm(qa, qb, sizes, layout=layout, out_dtype=torch.float32, backend="cute")
    ref = reference(layout, *dequantized(layout, qa, qb), sizes, shape)
    total = sum(sizes)
    assert_mx_close(valid(layout, out, total), valid(layout, ref, total), torch.float32, f"{extreme} scales {layout}")


def operands_with_offsets(layout, n, k, sizes, gen, a_exp, b_exp):
    rows = 512
    x = lambda r, c, along: blocky(gen, r, c, blocks_along=along, spread=4) * 2.0**a_exp  # noqa: E731
    w = lambda r, c, along: blocky(gen, r, c, blocks_along=along, spread=4) * 2.0**b_exp  # noqa: E731
    groups = len(sizes)
    if layout == "forward":
        return (grouped.quantize(x(rows, k, 1).cuda(), "mxfp8"),
                grouped.quantize(torch.stack([w(n, k, 1) for _ in range(groups)]).cuda(), "mxfp8"))
    if layout == "dgrad":
        return (grouped.quantize(x(rows, n, 1).cuda(), "mxfp8"),
                grouped.quantize(torch.stack([w(n, k, 0) for _ in range(groups)]).cuda(), "mxfp8", axis=1))
    return (grouped.quantize(x(rows, n, 0).cuda(), "mxfp8", axis=0, split_sizes=sizes),
            grouped.quantize(w(rows, k, 0).cuda(), "mxfp8", axis=0, split_sizes=sizes))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["forward", "wgrad"])
def test_nan_and_inf_blocks_propagate(layout, fmt, gen):
    """A block holding NaN or Inf has a NaN scale: every output it contributes to is NaN, as in the
    reference; the rest is unaffected."""
    sizes = [64, 100, 0, 92]
    n, k = 128, 256
    total = sum(sizes)
    x = torch.randn(256, k if layout == "forward" else n, generator=gen)
    x[5, 40] = float("nan")
    x[150, 7] = float("inf")
    if layout == "forward":
        qa = grouped.quantize(x.cuda(), fmt)
        qb = grouped.quantize(torch.randn(len(sizes), n, k, generator=gen).cuda(), fmt)
    else:
        qa = grouped.quantize(x.cuda(), fmt, axis=0, split_sizes=sizes)
        qb = grouped.quantize(torch.randn(256, k, generator=gen).cuda(), fmt, axis=0, split_sizes=sizes)
    require_cute(qa, qb, sizes, layout=layout, out_dtype=torch.float32)
    out = grouped.gemm(qa, qb, sizes, layout=layout, out_dtype=torch.float32, backend="cute")
    ref = reference(layout, *dequantized(layout, qa, qb), sizes, out_shape(layout, 256, n, k, len(sizes)))
    got, want = valid(layout, out, total), valid(layout, ref, total)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN positions differ from the reference"
    finite = ~torch.isnan(want)
    assert want[~finite].numel() > 0
    rel = float((got[finite].double() - want[finite]).norm() / want[finite].norm())
    assert rel <= MX_FP32_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["forward", "dgrad"])
def test_grouped_tensor_weight(layout, fmt, gen):
    """The weight as GroupedLinear caches it: a GroupedTensor with rowwise and columnwise storage."""
    n, k = 1024, 1056
    weights = [blocky(gen, n, k, blocks_along=1).cuda().to(torch.bfloat16) for _ in range(G)]
    cache = grouped.GroupedTensor([(n, k)] * G, fmt, rowwise=True, columnwise=True, device="cuda")
    cache.quantize_(weights)
    cols = k if layout == "forward" else n
    tokens = blocky(gen, M, cols, blocks_along=1).cuda()
    qa = grouped.quantize(tokens, fmt)
    require_cute(qa, cache, layout=layout, out_dtype=torch.float32)
    out = grouped.gemm(qa, cache, SIZES, layout=layout, out_dtype=torch.float32, backend="cute")
    quantized_w = grouped.quantize(torch.stack(weights), fmt, axis=-1 if layout == "forward" else 1)
    ref = reference(layout, qa.dequantize().double(), quantized_w.dequantize().double(), SIZES,
                    out_shape(layout, M, n, k, G))
    total = sum(SIZES)
    assert_mx_close(valid(layout, out, total), valid(layout, ref, total), torch.float32, f"grouped weight {layout}")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["forward", "dgrad"])
def test_cuda_graph_replay_with_new_split_sizes(layout, fmt, gen):
    """Captured once with GPU split sizes, replayed with others: every replay equals its reference."""
    n, k = 512, 384
    rows = 1024
    splits = [[128] * 8, [0, 300, 1, 0, 90, 77, 0, 12], [10, 20, 0, 5, 0, 0, 1, 700]]
    x = torch.randn(rows, k if layout == "forward" else n, generator=gen).cuda()
    w = torch.randn(8, n, k, generator=gen).cuda()
    qa = grouped.quantize(x, fmt)
    qb = grouped.quantize(w, fmt, axis=-1 if layout == "forward" else 1)
    require_cute(qa, qb, splits[0], layout=layout)
    sizes = torch.tensor(splits[0], dtype=torch.int32, device="cuda")
    out = torch.full(out_shape(layout, rows, n, k, 8), float("nan"), dtype=torch.bfloat16, device="cuda")
    grouped.gemm(qa, qb, sizes, layout=layout, out=out, backend="cute")  # compile and warm outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped.gemm(qa, qb, sizes, layout=layout, out=out, backend="cute")
    a64, b64 = qa.dequantize().double(), qb.dequantize().double()
    for s in splits:
        out.fill_(float("nan"))
        sizes.copy_(torch.tensor(s, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        total = sum(s)
        assert out[total:].isnan().all(), "rows past the split total were written"
        ref = reference(layout, a64, b64, s, out.shape)
        assert_mx_close(out[:total], ref[:total], torch.bfloat16, f"replay {s}")


@pytest.mark.gpu
@pytest.mark.parametrize("split_source", ["host", "cuda"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16out", "fp32out"])
def test_weight_only_nvfp4_forward(out_dtype, split_source, schedule, gen):
    """bf16 activations times NVFP4 weights (serving): the activation as it is, the weight decoded."""
    n, k = WIDTHS[1]
    total = sum(SIZES)
    x = blocky(gen, M, k, blocks_along=1).cuda().to(torch.bfloat16)
    x[total:] = float("nan")
    qw = grouped.quantize(torch.stack([blocky(gen, n, k, blocks_along=1) for _ in range(G)]).cuda(), "nvfp4")
    decision = grouped.explain(x, qw, SIZES, backend="cute", out_dtype=out_dtype)
    assert decision.problem.weight_only
    require_cute(x, qw, out_dtype=out_dtype)
    splits = SIZES if split_source == "host" else torch.tensor(SIZES, dtype=torch.int32, device="cuda")
    shape = out_shape("forward", M, n, k, G)
    out = gemm_into_poisoned_buffer(x, qw, splits, "forward", shape, out_dtype, total, backend="cute")
    ref = reference("forward", x.double(), qw.dequantize().double(), SIZES, shape)
    assert_mx_close(out[:total], ref[:total], out_dtype, "weight-only forward")
