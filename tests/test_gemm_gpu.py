"""GPU tests for grouped.gemm: the three BF16 GEMMs on CUDA, checked against fp64.

Every test is marked ``gpu`` and skips cleanly without CUDA (tests/conftest.py).
Data is drawn on the CPU with the per-test ``gen`` generator, then moved to the GPU.

What is checked (docs/design.md, "Numerics", "Backends", "Caller buffers"):

1. forward / dgrad / wgrad x out dtype x split shapes x G, on the cute, cublas
   and torch backends and the automatic choice, against a per-expert fp64 reference
   computed on the GPU from the same bf16 inputs:
   - fp32 output: normwise relative error <= 1e-5;
   - bf16 output: normwise relative error <= 4e-3, and every element within one
     bf16 ulp of the largest magnitude in its reference row,
     ulp(v) = 2 ** (floor(log2 |v|) - 7).
   Input rows past the split total are NaN: they must never be read.
2. caller buffers (a strided view into a wider NaN-poisoned buffer): rows inside
   the split total written, rows past it and columns past the row length left
   byte-for-byte unchanged, result bit-identical to the library-allocated one.
3. cublas and torch agree (each against the fp64 reference).
4. wgrad into an fp32 main_grad: accumulate adds, an empty expert is left
   unchanged (accumulate) or gets exact zeros (overwrite / allocate).
5. split sizes as a list, CPU tensors, CUDA int32/int64 tensors, or end offsets:
   the same result.
6. CUDA graph capture with split sizes on the GPU, replayed for new split sizes;
   and the selector keeps cuBLAS out of a capture with GPU split sizes.
7. mixed devices raise ValueError before anything runs.
8. an MXFP8 GEMM on CUDA (reference backend until the CuTe kernels land) matches
   the CPU result.
9. backend decisions are cached per problem kind.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import kernels_unavailable

import grouped
from grouped import selector
from grouped.backends import BACKENDS

# ----------------------------------------------------------------------------- parameters

LAYOUTS = ["forward", "dgrad", "wgrad"]

# backend= values: a forced backend, or None for the automatic choice (id "auto").
BACKEND_PARAMS = [
    pytest.param("cute", id="cute"),
    pytest.param("cublas", id="cublas"),
    pytest.param("torch", id="torch"),
    pytest.param(None, id="auto"),
]

OUT_DTYPES = [
    pytest.param(torch.bfloat16, id="bf16out"),
    pytest.param(torch.float32, id="fp32out"),
]

SPLIT_KINDS = ["uniform", "skewed", "empty", "single", "short"]

# G -> (M, N, K). N != K everywhere, so a transposed operand cannot pass by accident;
# N and K are multiples of 8 (16-byte rows), as torch._grouped_mm needs. G = 256 has
# small experts (8 rows each when uniform).
SHAPES = {1: (768, 256, 384), 8: (1024, 192, 320), 256: (2048, 64, 128)}

FP32_TOL = 1e-5  # normwise, bf16 inputs with fp32 accumulation and fp32 output
BF16_TOL = 4e-3  # normwise, bf16 output
PAD = 8  # extra elements per row of a caller buffer: keeps rows 16-byte aligned for bf16 and fp32

# ----------------------------------------------------------------------------- split sizes


def _spread(weights: torch.Tensor, total: int) -> list[int]:
    """Non-negative ints proportional to weights, summing exactly to total."""
    raw = weights.double() / weights.double().sum() * total
    sizes = raw.floor().long()
    sizes[int(torch.argmax(weights))] += total - int(sizes.sum())
    return [int(m) for m in sizes]


def make_splits(kind: str, G: int, M: int, gen: torch.Generator) -> list[int]:
    """Split sizes of one kind for G experts over M rows (sum <= M)."""
    if kind == "uniform":  # M // G rows each, summing to M
        assert M % G == 0
        return [M // G] * G
    if kind == "skewed":  # a few experts get most rows; sum == M
        weights = torch.rand(G, generator=gen, dtype=torch.float64) ** 4 + 1e-3
        return _spread(weights, M)
    if kind == "empty":  # first, middle, last and ~1/4 of the others get no rows
        if G == 1:
            return [0]
        empty = torch.rand(G, generator=gen) < 0.25
        empty[[0, G // 2, G - 1]] = True
        weights = torch.rand(G, generator=gen, dtype=torch.float64) + 0.5
        weights[empty] = 0
        sizes = _spread(weights, M)
        assert all(sizes[g] == 0 for g in range(G) if empty[g])
        return sizes
    if kind == "single":  # one row per expert; sum = G <= M
        return [1] * G
    if kind == "short":  # random sizes summing to less than M: a tail of rows in no group
        total = M - M // 4 - 3
        weights = torch.rand(G, generator=gen, dtype=torch.float64) + 0.2
        return _spread(weights, total)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------- operands and reference


def _randn(gen, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _bf16_cuda(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).cuda()


def make_operands(layout, M, N, K, G, total, gen):
    """(a, b) for a layout, bf16 on CUDA; token rows past the split total are NaN."""

    def tokens(cols):
        t = _randn(gen, M, cols)
        t[total:] = float("nan")  # never to be read
        return _bf16_cuda(t)

    if layout == "forward":
        return tokens(K), _bf16_cuda(_randn(gen, G, N, K))
    if layout == "dgrad":
        return tokens(N), _bf16_cuda(_randn(gen, G, N, K))
    return tokens(N), tokens(K)  # wgrad: dY (M, N), X (M, K)


def out_shape(layout, M, N, K, G):
    return {"forward": (M, N), "dgrad": (M, K), "wgrad": (G, N, K)}[layout]


def reference(layout, a, b, sizes, shape) -> torch.Tensor:
    """The GEMM per expert in float64 on a's device; rows past the split total are 0."""
    ref = torch.zeros(shape, dtype=torch.float64, device=a.device)
    start = 0
    for g, m in enumerate(sizes):
        rows = slice(start, start + m)
        start += m
        if layout == "forward":
            ref[rows] = a[rows].double() @ b[g].double().T
        elif layout == "dgrad":
            ref[rows] = a[rows].double() @ b[g].double()
        else:
            ref[g] = a[rows].double().T @ b[rows].double()
    return ref


def valid(layout, t: torch.Tensor, total: int) -> torch.Tensor:
    """The part of an output the call defines, as a 2-D (rows, row length) tensor."""
    if layout == "wgrad":
        return t.reshape(-1, t.shape[-1])
    return t[:total]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers, so NaN compares equal to itself, bit for bit."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """ulp(v) = 2 ** (floor(log2 |v|) - 7), in float64; 0 for v == 0."""
    return torch.exp2(torch.floor(torch.log2(v.double().abs())) - 7)


def assert_close(out: torch.Tensor, ref: torch.Tensor, out_dtype: torch.dtype, what: str = "") -> None:
    """docs/design.md tolerances for bf16 inputs: out (rows, cols) in out_dtype vs the fp64 ref."""
    assert out.dtype == out_dtype, f"{what}: dtype {out.dtype}, expected {out_dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: {int((~torch.isfinite(out)).sum())} non-finite elements"
    diff = out.double() - ref
    ref_norm = float(ref.norm())
    err_norm = float(diff.norm())
    if ref_norm == 0:
        assert err_norm == 0, f"{what}: reference is all zeros, output has norm {err_norm}"
        return
    rel = err_norm / ref_norm
    tol = FP32_TOL if out_dtype == torch.float32 else BF16_TOL
    assert rel <= tol, f"{what}: normwise relative error {rel:.3e} > {tol:.0e}"
    if out_dtype == torch.bfloat16:
        bound = bf16_ulp(ref.abs().amax(dim=1, keepdim=True))
        over = diff.abs() > bound
        if over.any():
            r, c = (int(i) for i in over.nonzero()[0])
            reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
            raise AssertionError(
                f"{what}: {int(over.sum())} elements further than one bf16 ulp of their row's max "
                f"from the fp64 reference; first at ({r}, {c}): out {float(out[r, c])!r}, "
                f"ref {float(ref[r, c])!r}, bound {float(bound[r, 0])!r} "
                f"(torch allow_bf16_reduced_precision_reduction={reduced})"
            )


def assert_empty_experts_zero(layout, out, sizes, what=""):
    """wgrad: an expert with no rows gets dW = 0 exactly (not garbage, not NaN)."""
    if layout != "wgrad":
        return
    for g, m in enumerate(sizes):
        if m == 0:
            assert (out[g] == 0).all(), f"{what}: expert {g} has no rows but dW[{g}] is not all zeros"


def caller_buffer(shape, dtype):
    """A NaN-filled buffer PAD elements wider than shape, and the (shape) view into it."""
    big = torch.full((*shape[:-1], shape[-1] + PAD), float("nan"), dtype=dtype, device="cuda")
    return big, big[..., : shape[-1]]


def gemm_into_poisoned_buffer(a, b, splits, layout: str, shape, out_dtype, total: int, **kwargs) -> torch.Tensor:
    """grouped.gemm into a NaN-poisoned strided caller buffer; checks that nothing past the row
    length or (forward, dgrad) the split total changed, and returns the output view."""
    big, out = caller_buffer(shape, out_dtype)
    before = big.clone()
    grouped.gemm(a, b, splits, layout=layout, out=out, **kwargs)
    torch.cuda.synchronize()
    width = shape[-1]
    assert torch.equal(bits(big[..., width:]), bits(before[..., width:])), "columns past the row length were written"
    if layout != "wgrad":
        assert torch.equal(bits(big[total:]), bits(before[total:])), "rows past the split total were written"
    return out


def wgrad_accumulate(a, b, sizes, shape, gen, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(main_grad after, before) of a wgrad that adds into a random fp32 main_grad; checks that
    experts with no tokens were left as they were."""
    main_grad = torch.randn(*shape, generator=gen).cuda()
    before = main_grad.clone()
    grouped.gemm(a, b, sizes, layout="wgrad", out=main_grad, accumulate=True, **kwargs)
    torch.cuda.synchronize()
    for g, m in enumerate(sizes):
        if m == 0:
            assert torch.equal(bits(main_grad[g]), bits(before[g])), f"accumulate changed empty expert {g}"
    return main_grad, before


def to_cuda_splits(sizes, dtype=torch.int32):
    return torch.tensor(sizes, dtype=dtype).cuda()


def gemm_on(backend, a, b, *args, **kwargs):
    """grouped.gemm forced to ``backend`` (None: automatic); skips when that backend refuses the
    call, so a forced-backend test never silently checks the fallback instead."""
    if backend is not None:
        decision = grouped.explain(a, b, *args, backend=backend, **kwargs)
        if decision.backend != backend:
            cap = torch.cuda.get_device_capability()
            missing = BACKENDS[backend].unavailable("cuda", cap)
            if backend == "cute" and missing is not None:
                kernels_unavailable(f"cute cannot run here: {missing}")
            pytest.skip(f"{backend} refuses this call: {decision.reasons[backend]}")
    return grouped.gemm(a, b, *args, backend=backend, **kwargs)


# ----------------------------------------------------------------------------- 1. against fp64


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("G", [1, 8, 256], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("splits", SPLIT_KINDS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gemm_matches_fp64_reference(layout, out_dtype, splits, G, backend, gen):
    M, N, K = SHAPES[G]
    sizes = make_splits(splits, G, M, gen)
    total = sum(sizes)
    assert len(sizes) == G and total <= M and min(sizes) >= 0
    a, b = make_operands(layout, M, N, K, G, total, gen)
    shape = out_shape(layout, M, N, K, G)

    out = gemm_on(backend, a, b, sizes, layout=layout, out_dtype=out_dtype)

    assert tuple(out.shape) == shape and out.device == a.device
    ref = reference(layout, a, b, sizes, shape)
    assert_close(valid(layout, out, total), valid(layout, ref, total), out_dtype, f"{layout} sizes={sizes[:16]}")
    assert_empty_experts_zero(layout, out, sizes, layout)


# ----------------------------------------------------------------------------- 2. caller buffers

CALLER_G, CALLER_M, CALLER_N, CALLER_K = 8, 640, 136, 200
CALLER_SIZES = [96, 0, 131, 1, 0, 200, 17, 0]  # empty first-half/middle/last experts; sum 445 < 640


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("split_source", ["host-list", "cuda-int32"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_caller_buffer_strided_view(layout, out_dtype, split_source, backend, gen):
    G, M, N, K, sizes = CALLER_G, CALLER_M, CALLER_N, CALLER_K, CALLER_SIZES
    total = sum(sizes)
    a, b = make_operands(layout, M, N, K, G, total, gen)
    shape = out_shape(layout, M, N, K, G)
    splits = sizes if split_source == "host-list" else to_cuda_splits(sizes)

    big, out = caller_buffer(shape, out_dtype)
    assert not out.is_contiguous() and out.stride(-1) == 1
    before = big.clone()

    result = gemm_on(backend, a, b, splits, layout=layout, out=out)
    torch.cuda.synchronize()

    assert result is out, "gemm must return the caller's buffer itself"
    width = shape[-1]
    assert torch.equal(bits(big[..., width:]), bits(before[..., width:])), "columns past the row length were written"
    if layout != "wgrad":
        assert torch.equal(bits(big[total:]), bits(before[total:])), "rows past the split total were written"
    written = valid(layout, out, total)
    assert torch.isfinite(written).all(), "rows inside the split total were not all written"

    ref = reference(layout, a, b, sizes, shape)
    assert_close(written, valid(layout, ref, total), out_dtype, f"{layout} into a caller buffer")
    assert_empty_experts_zero(layout, out, sizes, "caller buffer")

    allocated = gemm_on(backend, a, b, splits, layout=layout, out_dtype=out_dtype)
    torch.cuda.synchronize()
    assert torch.equal(bits(written), bits(valid(layout, allocated, total))), (
        "the result in a caller buffer differs (bitwise) from the library-allocated result of the same backend"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("layout", ["forward", "dgrad"])
def test_caller_buffer_rows_past_total_keep_values(layout, backend, gen):
    """GPU split sizes + caller buffer: rows past the total keep their (finite, random) values.

    The torch backend rewrites every row (a masked copy), so this checks that the
    rows past the total get their own values back, bit for bit.
    """
    G, M, N, K, sizes = CALLER_G, CALLER_M, CALLER_N, CALLER_K, CALLER_SIZES
    total = sum(sizes)
    a, b = make_operands(layout, M, N, K, G, total, gen)
    shape = out_shape(layout, M, N, K, G)
    big = _randn(gen, shape[0], shape[1] + PAD).to(torch.bfloat16).cuda()
    out = big[:, : shape[1]]
    before = big.clone()

    gemm_on(backend, a, b, to_cuda_splits(sizes), layout=layout, out=out)
    torch.cuda.synchronize()

    assert torch.equal(bits(big[total:]), bits(before[total:])), "rows past the split total changed"
    assert torch.equal(bits(big[:, shape[1]:]), bits(before[:, shape[1]:])), "columns past the row length changed"
    ref = reference(layout, a, b, sizes, shape)
    assert_close(out[:total], ref[:total], torch.bfloat16, layout)


# ----------------------------------------------------------------------------- 3. cublas vs torch


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cublas_and_torch_agree(layout, out_dtype, gen):
    G, M, N, K = 16, 1536, 256, 512
    sizes = make_splits("empty", G, M - 100, gen)  # empty experts and a tail of 100 rows in no group
    total = sum(sizes)
    a, b = make_operands(layout, M, N, K, G, total, gen)
    shape = out_shape(layout, M, N, K, G)
    ref = valid(layout, reference(layout, a, b, sizes, shape), total)

    results = {}
    for name in ("cublas", "torch"):
        decision = grouped.explain(a, b, sizes, layout=layout, out_dtype=out_dtype, backend=name)
        if decision.backend != name:
            pytest.skip(f"{name} cannot serve this call here: {decision.reasons[name]}")
        out = grouped.gemm(a, b, sizes, layout=layout, out_dtype=out_dtype, backend=name)
        results[name] = valid(layout, out, total)
        assert_close(results[name], ref, out_dtype, f"{name} {layout}")
    if out_dtype == torch.float32:
        rel = float((results["cublas"].double() - results["torch"].double()).norm() / ref.norm())
        assert rel <= 2 * FP32_TOL, f"cublas and torch differ by {rel:.3e} (normwise, fp32 out)"


# ----------------------------------------------------------------------------- 4. wgrad into main_grad

WGRAD_G, WGRAD_M, WGRAD_N, WGRAD_K = 8, 512, 128, 192
WGRAD_SIZES = [0, 70, 0, 1, 130, 0, 90, 0]  # empty first, last and middle experts; sum 291 < 512


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("split_source", ["host-list", "cuda-int32"])
@pytest.mark.parametrize("dest", ["accumulate", "overwrite", "allocate"])
def test_wgrad_main_grad_and_empty_experts(dest, split_source, backend, gen):
    G, M, N, K, sizes = WGRAD_G, WGRAD_M, WGRAD_N, WGRAD_K, WGRAD_SIZES
    total = sum(sizes)
    dy, x = make_operands("wgrad", M, N, K, G, total, gen)
    splits = sizes if split_source == "host-list" else to_cuda_splits(sizes)
    ref = reference("wgrad", dy, x, sizes, (G, N, K))

    if dest == "allocate":
        out = gemm_on(backend, dy, x, splits, layout="wgrad", out_dtype=torch.float32)
        torch.cuda.synchronize()
        assert tuple(out.shape) == (G, N, K)
        assert_empty_experts_zero("wgrad", out, sizes, "allocated")
        assert_close(out.reshape(-1, K), ref.reshape(-1, K), torch.float32, "allocated wgrad")
        return

    if dest == "accumulate":
        main_grad = _randn(gen, G, N, K).cuda()
    else:
        main_grad = torch.full((G, N, K), float("nan"), dtype=torch.float32, device="cuda")
    before = main_grad.clone()

    result = gemm_on(backend, dy, x, splits, layout="wgrad", out=main_grad, accumulate=dest == "accumulate")
    torch.cuda.synchronize()

    assert result is main_grad
    for g, m in enumerate(sizes):
        if m != 0:
            continue
        if dest == "accumulate":
            assert torch.equal(bits(main_grad[g]), bits(before[g])), (
                f"accumulate changed main_grad[{g}] of an empty expert")
        else:
            assert (main_grad[g] == 0).all(), f"expert {g} has no rows but dW[{g}] is not all zeros"
    expected = before.double() + ref if dest == "accumulate" else ref
    assert_close(main_grad.reshape(-1, K), expected.reshape(-1, K), torch.float32, f"wgrad {dest}")


# ----------------------------------------------------------------------------- 5. forms of split sizes


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_size_forms_agree(layout, backend, gen):
    G, M, N, K = 8, 768, 128, 256
    sizes = [100, 0, 37, 1, 250, 0, 64, 8]  # sum 460 < 768
    total = sum(sizes)
    ends = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    a, b = make_operands(layout, M, N, K, G, total, gen)
    shape = out_shape(layout, M, N, K, G)
    forms = {
        "list": dict(split_sizes=sizes),
        "cpu-int64": dict(split_sizes=torch.tensor(sizes, dtype=torch.int64)),
        "cpu-int32": dict(split_sizes=torch.tensor(sizes, dtype=torch.int32)),
        "cuda-int32": dict(split_sizes=to_cuda_splits(sizes, torch.int32)),
        "cuda-int64": dict(split_sizes=to_cuda_splits(sizes, torch.int64)),
        "offsets-list": dict(offsets=[int(e) for e in ends]),
        "offsets-cuda-int32": dict(offsets=ends.to(torch.int32).cuda()),
    }
    ref = valid(layout, reference(layout, a, b, sizes, shape), total)
    first_of_backend = {}
    for name, kwargs in forms.items():
        chosen = grouped.explain(a, b, layout=layout, out_dtype=torch.bfloat16, backend=backend, **kwargs).backend
        out = gemm_on(backend, a, b, layout=layout, out_dtype=torch.bfloat16, **kwargs)
        got = valid(layout, out, total)
        assert_close(got, ref, torch.bfloat16, f"split sizes as {name}")
        assert_empty_experts_zero(layout, out, sizes, name)
        if chosen in first_of_backend:  # the same backend must give the same bits
            other, other_out = first_of_backend[chosen]
            assert torch.equal(bits(got), bits(other_out)), f"{name} and {other} differ on backend {chosen}"
        else:
            first_of_backend[chosen] = (name, got)


# ----------------------------------------------------------------------------- 6. CUDA graphs


@pytest.mark.gpu
def test_selector_keeps_cublas_out_of_capture_with_gpu_splits(monkeypatch, gen):
    G, M, N, K = 8, 256, 64, 128
    why_not = BACKENDS["torch"].unavailable("cuda", torch.cuda.get_device_capability())
    if why_not is not None:
        pytest.skip(f"no graph-safe BF16 backend on this GPU: {why_not}")
    x, w = make_operands("forward", M, N, K, G, M, gen)
    sizes = [32] * G
    eager = grouped.explain(x, w, to_cuda_splits(sizes)).problem
    assert eager.device_splits and not eager.capturing
    capturing = dataclasses.replace(eager, capturing=True)

    reason = BACKENDS["cublas"].supports(capturing)
    assert reason is not None and "graph" in reason
    auto = selector.decide(capturing)
    assert auto.backend != "cublas" and BACKENDS[auto.backend].graph_safe, str(auto)
    assert auto.reasons["cublas"] is not None
    forced = selector.decide(capturing, "cublas")  # not strict: falls back, and says why
    assert forced.backend != "cublas" and BACKENDS[forced.backend].graph_safe, str(forced)
    assert "cublas" in forced.why
    # With split sizes known on the host at capture, cuBLAS may serve a capture.
    assert selector.decide(dataclasses.replace(capturing, device_splits=False), "cublas").backend == "cublas"

    monkeypatch.setenv("GROUPED_STRICT", "1")
    with pytest.raises(ValueError, match="cublas"):
        selector.decide(capturing, "cublas")


GRAPH_SPLITS = [
    [64, 64, 64, 64, 64, 64, 64, 64],  # uniform, sum == M
    [0, 300, 1, 0, 90, 77, 0, 12],  # skewed, empty experts (first, last), sum 480 < M
    [10, 20, 0, 5, 0, 0, 1, 400],  # very skewed, sum 436 < M
]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graph_replay_with_new_gpu_split_sizes(layout, gen):
    G, M, N, K = 8, 512, 128, 256
    cap = torch.cuda.get_device_capability()
    if BACKENDS["torch"].unavailable("cuda", cap) is not None:
        pytest.skip(f"no graph-safe BF16 backend here: {BACKENDS['torch'].unavailable('cuda', cap)}")
    a, b = make_operands(layout, M, N, K, G, M, gen)  # no NaN rows: every split vector reads its own rows
    shape = out_shape(layout, M, N, K, G)
    splits_dev = to_cuda_splits(GRAPH_SPLITS[0])
    out = torch.full(shape, float("nan"), dtype=torch.bfloat16, device="cuda")

    decision = grouped.explain(a, b, splits_dev, layout=layout, out=out)
    assert BACKENDS[decision.backend].graph_safe, (
        f"automatic choice with GPU split sizes is not graph-safe:\n{decision}")
    chosen = decision.backend

    # Warm up on a side stream (torch.cuda.graphs docs), then capture once.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            grouped.gemm(a, b, splits_dev, layout=layout, out=out)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped.gemm(a, b, splits_dev, layout=layout, out=out)
    torch.cuda.synchronize()

    for sizes in GRAPH_SPLITS:
        assert len(sizes) == G and sum(sizes) <= M
        total = sum(sizes)
        splits_dev.copy_(torch.tensor(sizes, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()

        eager = torch.full(shape, float("nan"), dtype=torch.bfloat16, device="cuda")
        grouped.gemm(a, b, to_cuda_splits(sizes), layout=layout, out=eager, backend=chosen)
        torch.cuda.synchronize()

        assert torch.equal(bits(out), bits(eager)), f"graph replay differs from the eager call for sizes {sizes}"
        if layout != "wgrad":
            assert torch.isnan(out[total:]).all(), f"replay wrote rows past the split total for sizes {sizes}"
        ref = reference(layout, a, b, sizes, shape)
        assert_close(valid(layout, out, total), valid(layout, ref, total), torch.bfloat16, f"replay {sizes}")
        assert_empty_experts_zero(layout, out, sizes, f"replay {sizes}")


# ----------------------------------------------------------------------------- 7. mixed devices


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_devices_raise(layout, backend, gen):
    G, M, N, K = 4, 64, 32, 48
    sizes = [16, 0, 30, 10]
    a, b = make_operands(layout, M, N, K, G, sum(sizes), gen)
    shape = out_shape(layout, M, N, K, G)

    with pytest.raises(ValueError, match="same device"):
        gemm_on(backend, a, b.cpu(), sizes, layout=layout)
    with pytest.raises(ValueError, match="same device"):
        gemm_on(backend, a.cpu(), b, sizes, layout=layout)

    out_cpu = torch.full(shape, 7.0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="must be on"):
        gemm_on(backend, a, b, sizes, layout=layout, out=out_cpu)
    assert (out_cpu == 7.0).all(), "a refused buffer must be left unchanged"

    with pytest.raises(ValueError, match="split_sizes is on"):
        gemm_on(backend, a.cpu(), b.cpu(), to_cuda_splits(sizes), layout=layout)


# ----------------------------------------------------------------------------- 8. MXFP8 on CUDA


def _q_to_cuda(q: grouped.QuantizedTensor) -> grouped.QuantizedTensor:
    return dataclasses.replace(
        q,
        data=q.data.cuda(),
        scale=q.scale.cuda(),
        global_scale=None if q.global_scale is None else q.global_scale.cuda(),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mxfp8_on_cuda_matches_cpu(layout, gen):
    G, M, N, K = 4, 256, 128, 96  # N, K multiples of the MXFP8 block (32)
    sizes = [70, 0, 33, 100]  # sum 203 < 256
    total = sum(sizes)
    x, w, dy = _randn(gen, M, K), _randn(gen, G, N, K), _randn(gen, M, N)
    if layout == "forward":
        qa, qb = grouped.quantize(x, "mxfp8"), grouped.quantize(w, "mxfp8", axis=-1)
    elif layout == "dgrad":
        qa, qb = grouped.quantize(dy, "mxfp8"), grouped.quantize(w, "mxfp8", axis=1)
    else:
        qa = grouped.quantize(dy, "mxfp8", axis=0, split_sizes=sizes)
        qb = grouped.quantize(x, "mxfp8", axis=0, split_sizes=sizes)
    qa_cuda, qb_cuda = _q_to_cuda(qa), _q_to_cuda(qb)
    shape = out_shape(layout, M, N, K, G)

    decision = grouped.explain(qa_cuda, qb_cuda, sizes, layout=layout, out_dtype=torch.float32)
    assert decision.problem.fmt == "mxfp8" and decision.problem.device_type == "cuda"
    if decision.reasons["cute"] is not None and decision.reasons["cudnn"] is not None:
        assert decision.backend == "reference", str(decision)

    on_gpu = grouped.gemm(qa_cuda, qb_cuda, sizes, layout=layout, out_dtype=torch.float32)
    on_cpu = grouped.gemm(qa, qb, sizes, layout=layout, out_dtype=torch.float32)
    assert on_gpu.is_cuda and tuple(on_gpu.shape) == shape and on_gpu.dtype == torch.float32

    got = valid(layout, on_gpu, total)
    want = valid(layout, on_cpu, total).cuda()
    assert torch.isfinite(got).all()
    rel = float((got.double() - want.double()).norm() / want.double().norm())
    assert rel <= 1e-4, f"MXFP8 {layout} on CUDA differs from the CPU result by {rel:.3e} (normwise)"

    # And against fp64 on the dequantized operands (docs/design.md: <= 1e-4 for MXFP8).
    a64, b64 = qa_cuda.dequantize().double(), qb_cuda.dequantize().double()
    ref = valid(layout, reference(layout, a64, b64, sizes, shape), total)
    rel = float((got.double() - ref).norm() / ref.norm())
    assert rel <= 1e-4, f"MXFP8 {layout} on CUDA vs fp64 of the dequantized operands: {rel:.3e}"
    assert_empty_experts_zero(layout, on_gpu, sizes, "mxfp8")


# ----------------------------------------------------------------------------- 9. decision cache


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_decisions_are_cached_per_problem_kind(monkeypatch, backend, gen):
    G, N, K = 8, 64, 128
    calls = []
    real_decide = selector._decide

    def counting_decide(*args, **kwargs):
        calls.append(args[0])
        return real_decide(*args, **kwargs)

    monkeypatch.setattr(selector, "_decide", counting_decide)

    def run(M, sizes):
        x, w = make_operands("forward", M, N, K, G, sum(sizes), gen)
        grouped.gemm(x, w, sizes, backend=backend)
        return grouped.explain(x, w, sizes, backend=backend)

    first = run(256, [32] * G)  # may or may not be a new kind: other tests ran before
    size_after_first = len(selector._decisions)
    calls.clear()
    # The same problem kind (bf16 forward, this GPU, bf16 out, host split sizes) with
    # other shapes and split sizes: no new decision, the same decision object.
    second = run(512, [0, 100, 3, 200, 0, 9, 50, 100])
    third = run(64, [1] * G)
    assert calls == [], f"a decision was recomputed for a known problem kind: {calls}"
    assert len(selector._decisions) == size_after_first
    assert second is first and third is first
    torch.cuda.synchronize()
