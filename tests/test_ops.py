"""GroupedLinear and GroupedMLP (grouped.ops) on the CPU, i.e. on the reference backend.

Every result is checked against an fp64 reference built here, independently of
the library's GEMM code:

- bf16: fp64 autograd through per-expert ``F.linear`` on the bf16 values upcast;
- mxfp8 / nvfp4: per GEMM, in fp64, from exactly the dequantized operands the
  layer's docstring says it multiplies (forward: rowwise x and rowwise weight;
  dgrad: rowwise dY and the weight blocked along out_features; wgrad: dY and x
  blocked along tokens, per expert). The quantized operands are then identical,
  so the only difference left is the bf16 rounding of the outputs.

The reference backend multiplies in fp64 and rounds once, so GEMM results are checked
element by element to within one bf16 ulp of the reference element itself (not only
normwise). The GroupedLinear data spreads every operand over ~16 binades along each dim
with exponents that cancel in every product a GEMM sums (see ``batch``): many elements
of a quantization block are subnormal or flushed, and every term of a contraction
matters, so an operand blocked along the wrong axis, or blocks that do not restart at
expert boundaries, fail these checks (verified by hand against such wrong references).

Also: ragged and partial splits, per-expert parameters, bias, caller buffers,
main_grad, delayed wgrad, the quantized weight cache and its noop flag, the
MLP's SwiGLU and routing probabilities, and argument validation.
"""

import pytest
import torch
import torch.nn.functional as F
from ops_reference import bounds, mlp_ref, rel_err

import grouped
from grouped import GroupedLinear, GroupedMLP

RECIPES = ["bf16", "mxfp8", "nvfp4"]
QUANTIZED = ["mxfp8", "nvfp4"]

G, M, K, N = 4, 96, 64, 96  # experts, token rows, in_features, out_features
SPLITS = {
    "uniform": [24, 24, 24, 24],
    "skewed": [81, 1, 4, 10],
    "empty": [0, 40, 0, 56],
    "partial": [20, 0, 33, 11],  # sums to 64 < M: rows 64.. belong to no expert
}
split_param = pytest.mark.parametrize("splits", list(SPLITS), ids=list(SPLITS))


# ----------------------------------------------------------------------------- data


def wide(gen, shape, span=4):
    """randn scaled by 2^(an exponent per index of every dim, each in [-span/4, span/4])."""
    x = torch.randn(shape, generator=gen)
    for d, n in enumerate(shape):
        view = [1] * len(shape)
        view[d] = n
        x = x * torch.exp2(exponents(gen, n, span // 4)).reshape(view)
    return x


def exponents(gen, n, half):
    return torch.randint(-half, half + 1, (n,), generator=gen).float()


def bf16(gen, shape, span=4):
    return wide(gen, shape, span).to(torch.bfloat16)


SPREAD = 8  # binades either way per dim of the GroupedLinear data


def make_linear(gen, recipe, *, bias=False, single_weight=True, in_features=K, out_features=N, **kw):
    """A layer with weight W[g, n, k] = randn * 2^(e_g - d_n - c_k); see batch()."""
    layer = GroupedLinear(G, in_features, out_features, bias=bias, recipe=recipe, single_weight=single_weight, **kw)
    c, d, e = exponents(gen, in_features, SPREAD), exponents(gen, out_features, SPREAD), exponents(gen, G, 2)
    w = torch.randn(G, out_features, in_features, generator=gen) * torch.exp2(e[:, None, None] - d[:, None] - c)
    set_weight(layer, w.to(torch.bfloat16))
    layer.test_exponents = (c, d)  # a plain attribute, for batch()
    if bias:
        with torch.no_grad():
            layer.bias.copy_(torch.randn(G, out_features, generator=gen).to(torch.bfloat16))
    return layer


def batch(gen, layer, rows=M):
    """x[m, k] = randn * 2^(r_m + c_k) and dY[m, n] = randn * 2^(d_n - r_m).

    Every operand spans ~2 * SPREAD binades along each dim, so within a quantization block many
    elements are E4M3 / E2M1 subnormals or flush to zero, and the blocking axis shows. The exponents
    cancel in every product a GEMM sums (forward x[m,k] W[n,k] ~ 2^(r_m - d_n), dgrad dY[m,n] W[n,k]
    ~ 2^(-r_m - c_k), wgrad dY[m,n] x[m,k] ~ 2^(d_n + c_k)): every term of every contraction
    matters, so an operand quantized along the wrong axis, or blocks not restarting at an expert
    boundary, change the result visibly even in its small elements.
    """
    c, d = layer.test_exponents
    r = exponents(gen, rows, SPREAD)
    x = torch.randn(rows, len(c), generator=gen) * torch.exp2(r[:, None] + c)
    dy = torch.randn(rows, len(d), generator=gen) * torch.exp2(d - r[:, None])
    return x.to(torch.bfloat16), dy.to(torch.bfloat16)


def set_weight(layer, w):
    with torch.no_grad():
        for g, p in enumerate(layer.weights()):
            p.copy_(w if layer.single_weight else w[g])


def stacked_weight(layer):
    return layer.weight.detach() if layer.single_weight else torch.stack([p.detach() for p in layer.weights()])


# ----------------------------------------------------------------------------- checks


def _bf16_ulp(v):
    """One bf16 ulp of |v| (elementwise; 0 where v is 0)."""
    a = v.abs()
    return torch.where(a > 0, torch.exp2(torch.floor(torch.log2(a.clamp_min(1e-300))) - 7), 0.0)


def assert_bf16_close(out, ref, *, rel=1e-2, exact_rounding=True, what=""):
    """A bf16 result against its fp64 reference: normwise relative error <= rel, and per element

    - exact_rounding: within one bf16 ulp of that element of the reference. On the CPU the
      reference backend multiplies the (dequantized) operands in fp64 and rounds once to bf16,
      so this holds up to fp64 summation order and catches any operand that differs, even in
      elements far smaller than the rest of their row;
    - otherwise (results rounded more than once, e.g. GEMM + bias in bf16): within two bf16 ulps
      of the largest magnitude in its row.
    Rows of zeros in the reference must be exactly zero either way.
    """
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert torch.isfinite(out).all(), what
    err = rel_err(out, ref)
    assert err <= rel, f"{what}: normwise relative error {err:.3g} > {rel}"
    out, ref = out.double(), ref.double()
    if exact_rounding:
        bound = _bf16_ulp(ref)
    else:
        bound = 2 * _bf16_ulp(ref.abs().amax(dim=-1, keepdim=True))
    bad = (out - ref).abs() > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off by more than the bound "
                           f"(exact_rounding={exact_rounding}), e.g. {out[bad][:3].tolist()} "
                           f"vs {ref[bad][:3].tolist()}")


def deq(x, fmt, **kw):
    return grouped.quantize(x, fmt, **kw).dequantize().double()


# ----------------------------------------------------------------------------- references


def linear_ref_autograd(x, w, b, sizes, dy):
    """fp64 autograd through per-expert F.linear: (y, dx, dW, db). Rows past the total are zero."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    parts = [F.linear(x64[r], w64[g], None if b64 is None else b64[g]) for g, r in enumerate(bounds(sizes))]
    total = sum(sizes)
    y = torch.cat(parts + [x64.new_zeros(x.shape[0] - total, w.shape[1])])
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad, None if b64 is None else b64.grad


def linear_ref_quantized(x, w, b, sizes, dy, fmt):
    """Per GEMM, in fp64, from the dequantized operands the layer multiplies (see its docstring)."""
    xq = deq(x, fmt, split_sizes=sizes)  # forward: x rowwise
    wf = deq(w, fmt)  # weight blocked along in_features (axis -1 of (G, out, in))
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    for g, r in enumerate(bounds(sizes)):
        y[r] = xq[r] @ wf[g].T + (0 if b is None else b[g].double())
    if dy is None:
        return y
    dyq = deq(dy, fmt, split_sizes=sizes)  # dgrad: dY rowwise
    wd = deq(w, fmt, axis=1)  # weight blocked along out_features
    dyc = deq(dy, fmt, axis=0, split_sizes=sizes)  # wgrad: dY and x blocked along tokens, per expert
    xc = deq(x, fmt, axis=0, split_sizes=sizes)
    dx = torch.zeros(x.shape, dtype=torch.float64)
    dw = torch.zeros(w.shape, dtype=torch.float64)
    db = torch.zeros(w.shape[0], w.shape[1], dtype=torch.float64)
    for g, r in enumerate(bounds(sizes)):
        dx[r] = dyq[r] @ wd[g]
        dw[g] = dyc[r].T @ xc[r]
        db[g] = dy[r].double().sum(0)
    return y, dx, dw, (db if b is not None else None)


def linear_ref(recipe, x, w, b, sizes, dy):
    if recipe == "bf16":
        return linear_ref_autograd(x, w, b, sizes, dy)
    return linear_ref_quantized(x, w, b, sizes, dy, recipe)


def run_linear(layer, x, sizes, dy, **kw):
    x = x.detach().clone().requires_grad_()
    y = layer(x, sizes, **kw)
    y.backward(dy)
    return y, x


# ----------------------------------------------------------------------------- GroupedLinear numerics


@pytest.mark.parametrize("splits,bias", [("uniform", False), ("skewed", True), ("empty", True), ("partial", False),
                                         ("partial", True)])
@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_matches_fp64_reference(recipe, splits, bias, gen):
    sizes = SPLITS[splits]
    layer = make_linear(gen, recipe, bias=bias)
    x, dy = batch(gen, layer)
    y, xg = run_linear(layer, x, sizes, dy)
    y_ref, dx_ref, dw_ref, db_ref = linear_ref(recipe, x, layer.weight.detach(), layer.bias, sizes, dy)

    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    assert_bf16_close(y, y_ref, exact_rounding=not bias, what="output")  # + bias: rounded twice
    assert_bf16_close(xg.grad, dx_ref, what="grad_input")
    assert layer.weight.grad.shape == (G, N, K) and layer.weight.grad.dtype == torch.bfloat16
    assert_bf16_close(layer.weight.grad, dw_ref, what="weight grad")
    total = sum(sizes)
    # Rows past the total belong to no expert: zero in what the layer allocates.
    assert torch.equal(y[total:], torch.zeros_like(y[total:]))
    assert torch.equal(xg.grad[total:], torch.zeros_like(xg.grad[total:]))
    for g, m in enumerate(sizes):
        if m == 0:  # an empty expert gets a zero weight gradient
            assert torch.equal(layer.weight.grad[g], torch.zeros_like(layer.weight.grad[g]))
    if bias:
        # Bias gradient of an expert = the sum of its rows of dY.
        assert layer.bias.grad.shape == (G, N)
        assert_bf16_close(layer.bias.grad, db_ref, exact_rounding=False, what="bias grad")
        for g, m in enumerate(sizes):
            if m == 0:
                assert torch.equal(layer.bias.grad[g], torch.zeros_like(layer.bias.grad[g]))


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_split_sizes_as_cpu_tensor(recipe, gen):
    sizes = SPLITS["partial"]
    layer = make_linear(gen, recipe, bias=True)
    x, dy = batch(gen, layer)
    y1, x1 = run_linear(layer, x, sizes, dy)
    grads1 = (layer.weight.grad.clone(), layer.bias.grad.clone())
    layer.zero_grad()
    for dtype in (torch.int32, torch.int64):
        layer.zero_grad()
        y2, x2 = run_linear(layer, x, torch.tensor(sizes, dtype=dtype), dy)
        assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
        assert torch.equal(grads1[0], layer.weight.grad) and torch.equal(grads1[1], layer.bias.grad)


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_per_expert_weights_same_as_single(recipe, gen):
    sizes = SPLITS["partial"]
    single = make_linear(gen, recipe, bias=True)
    split = GroupedLinear(G, K, N, bias=True, recipe=recipe, single_weight=False)
    names = [n for n, _ in split.named_parameters()]
    assert names == [f"weight{g}" for g in range(G)] + ["bias"]
    set_weight(split, single.weight.detach())
    with torch.no_grad():
        split.bias.copy_(single.bias)
    x, dy = batch(gen, single)
    y1, x1 = run_linear(single, x, sizes, dy)
    y2, x2 = run_linear(split, x, sizes, dy)
    assert torch.equal(y1, y2)
    assert torch.equal(x1.grad, x2.grad)
    for g in range(G):
        w = getattr(split, f"weight{g}")
        assert w.shape == (N, K) and torch.equal(w.grad, single.weight.grad[g])
    assert torch.equal(split.bias.grad, single.bias.grad)


# ----------------------------------------------------------------------------- caller buffers


def _canvas(rows, cols, fill=3.0):
    """A bigger bf16 buffer, a strided (M, cols) view into it, and a copy of the original contents."""
    big = torch.full((rows + 8, cols + 32), fill, dtype=torch.bfloat16)
    big[:, ::7] = -fill  # not a constant, so any stray write shows
    return big, big[4:4 + rows, 16:16 + cols], big.clone()


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_out_buffer_forward(recipe, bias, gen):
    sizes = SPLITS["partial"]
    total = sum(sizes)
    layer = make_linear(gen, recipe, bias=bias)
    x, _ = batch(gen, layer)
    with torch.no_grad():
        y_self = layer(x, sizes)
    big, buf, before = _canvas(M, N)
    assert buf.stride() == (N + 32, 1) and not buf.is_contiguous()
    with torch.no_grad():
        y = layer(x, sizes, out=buf)
    assert y.data_ptr() == buf.data_ptr() and y.stride() == buf.stride()
    assert torch.equal(y[:total], y_self[:total])
    assert torch.equal(buf[total:], before[4 + total:4 + M, 16:16 + N]), "rows past the total must be untouched"
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[4:4 + total, 16:16 + N] = False
    assert torch.equal(big[outside], before[outside]), "nothing outside the written rows may change"


@pytest.mark.parametrize("recipe, buffer", [(r, "standalone") for r in RECIPES] + [("bf16", "view")])
def test_linear_out_buffer_backward(recipe, buffer, gen):
    """A caller `out`, its own tensor or a strided view of a bigger one: gradients are those of the
    self-allocated run, x's included (autograd treats `out` as written in place)."""
    sizes = SPLITS["empty" if buffer == "standalone" else "uniform"]
    layer = make_linear(gen, recipe, bias=True)
    x, dy = batch(gen, layer)
    y1, x1 = run_linear(layer, x, sizes, dy)
    g1 = (layer.weight.grad.clone(), layer.bias.grad.clone())
    layer.zero_grad()
    buf = torch.full((M, N), 5.0, dtype=torch.bfloat16) if buffer == "standalone" else _canvas(M, N)[1]
    y2, x2 = run_linear(layer, x, sizes, dy, out=buf)
    assert y2.data_ptr() == buf.data_ptr() and torch.equal(y1, y2)
    assert x2.grad is not None, f"x got no gradient through a {buffer} `out` buffer"
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(g1[0], layer.weight.grad) and torch.equal(g1[1], layer.bias.grad)


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_grad_input_buffer(recipe, gen):
    sizes = SPLITS["skewed"]  # all rows grouped
    layer = make_linear(gen, recipe)
    x, dy = batch(gen, layer)
    _, x1 = run_linear(layer, x, sizes, dy)
    w1 = layer.weight.grad.clone()
    layer.zero_grad()
    big, gbuf, before = _canvas(M, K)
    _, x2 = run_linear(layer, x, sizes, dy, grad_input=gbuf)
    assert torch.equal(x2.grad, x1.grad), "x.grad must be bit-identical to the self-allocated run"
    assert torch.equal(layer.weight.grad, w1)
    # The caller's buffer holds dX. x.grad is either that very buffer or a bit-identical copy:
    # autograd's AccumulateGrad copies a gradient that something else still references (today,
    # x.grad is a copy: x.grad.data_ptr() != gbuf.data_ptr()).
    assert x2.grad.data_ptr() == gbuf.data_ptr() or torch.equal(gbuf, x2.grad)
    assert torch.equal(gbuf, x2.grad)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[4:4 + M, 16:16 + K] = False
    assert torch.equal(big[outside], before[outside])


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_grad_input_buffer_partial_splits(recipe, gen):
    sizes = SPLITS["partial"]
    total = sum(sizes)
    layer = make_linear(gen, recipe, bias=True)
    x, dy = batch(gen, layer)
    _, x1 = run_linear(layer, x, sizes, dy)
    big, gbuf, before = _canvas(M, K)
    _, x2 = run_linear(layer, x, sizes, dy, grad_input=gbuf)
    assert torch.equal(x2.grad[:total], x1.grad[:total])
    assert torch.equal(gbuf[:total], x1.grad[:total])
    assert torch.equal(gbuf[total:], before[4 + total:4 + M, 16:16 + K]), "rows past the total must be untouched"
    # The layer's own dX has zero rows past the total (they belong to no expert).
    assert torch.equal(x1.grad[total:], torch.zeros_like(x1.grad[total:]))


# ----------------------------------------------------------------------------- main_grad


@pytest.mark.parametrize("mode", ["accumulate", "overwrite"])
@pytest.mark.parametrize("single_weight", [True, False], ids=["single", "per_expert"])
@pytest.mark.parametrize("recipe", ["bf16", "mxfp8"])
def test_linear_main_grad(recipe, single_weight, mode, gen):
    sizes = SPLITS["empty"]
    layer = make_linear(gen, recipe, bias=True, single_weight=single_weight, main_grad_mode=mode)
    x, dy = batch(gen, layer)
    w = stacked_weight(layer)
    _, _, dw_ref, db_ref = linear_ref(recipe, x, w, layer.bias, sizes, dy)
    initial = torch.randn(G, N, K, generator=gen)
    if single_weight:
        layer.weight.main_grad = initial.clone()
    else:
        for g, p in enumerate(layer.weights()):
            p.main_grad = initial[g].clone()
    pointers = [p.main_grad.data_ptr() for p in layer.weights()]
    run_linear(layer, x, sizes, dy)
    assert [p.main_grad.data_ptr() for p in layer.weights()] == pointers, "main_grad is updated in place"
    main = layer.weight.main_grad if single_weight else torch.stack([p.main_grad for p in layer.weights()])
    assert main.dtype == torch.float32 and not main.requires_grad
    assert all(p.grad is None for p in layer.weights()), "wgrad went to main_grad: .grad stays None"
    delta = main.double() - (initial.double() if mode == "accumulate" else 0)
    err = rel_err(delta, dw_ref)
    assert err <= 1e-4, f"main_grad: normwise relative error {err:.3g}"
    for g, m in enumerate(sizes):
        if m == 0:  # empty expert: unchanged when accumulating, zero when overwriting
            expect = initial[g] if mode == "accumulate" else torch.zeros_like(initial[g])
            assert torch.equal(main[g], expect)
    assert_bf16_close(layer.bias.grad, db_ref, exact_rounding=False, what="bias grad")


# ----------------------------------------------------------------------------- delayed wgrad

def _check_delay_wgrad(recipe, single_weight, main_grad, gen):
    """main_grad: False, True (every weight has one) or "some" (per-expert weights, even experts)."""
    sizes = SPLITS["skewed"]
    now = make_linear(gen, recipe, bias=True, single_weight=single_weight)
    later = GroupedLinear(G, K, N, bias=True, recipe=recipe, single_weight=single_weight, delay_wgrad=True)
    later.load_state_dict(now.state_dict())
    initial = torch.randn(G, N, K, generator=gen)

    def has_main_grad(g):
        return main_grad is True or (main_grad == "some" and g % 2 == 0)

    for layer in (now, later):
        for g, p in enumerate(layer.weights()):
            if has_main_grad(g):
                p.main_grad = (initial if single_weight else initial[g]).clone()
    for _ in range(2):  # two micro-batches: the deferred wgrads accumulate like immediate ones
        x, dy = batch(gen, now)
        _, x_now = run_linear(now, x, sizes, dy)
        _, x_later = run_linear(later, x, sizes, dy)
        assert x_later.grad is not None and torch.equal(x_later.grad, x_now.grad)
    assert all(p.grad is None for p in later.weights()) and later.bias.grad is None
    for g, p in enumerate(later.weights()):
        if has_main_grad(g):
            assert torch.equal(p.main_grad, initial if single_weight else initial[g]), "wgrad ran early"
    later.backward_dw()  # with autograd enabled, as a training loop calls it
    assert later._pending_wgrad == []
    assert torch.equal(later.bias.grad, now.bias.grad)
    for g, (p_now, p_later) in enumerate(zip(now.weights(), later.weights())):
        if has_main_grad(g):
            assert p_later.grad is None and p_now.grad is None
            assert torch.equal(p_later.main_grad, p_now.main_grad)
            assert not p_later.main_grad.requires_grad, "main_grad got autograd history"
        else:
            assert torch.equal(p_later.grad, p_now.grad)
            assert not p_later.grad.requires_grad and p_later.grad.grad_fn is None, "weight.grad got autograd history"
    later.backward_dw()  # nothing pending: a no-op
    assert torch.equal(later.bias.grad, now.bias.grad)


@pytest.mark.parametrize("main_grad", [False, True], ids=["grad", "main_grad"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_delay_wgrad(recipe, main_grad, gen):
    # Also a regression test: backward_dw() once ran the bf16 wgrad with autograd on, so the
    # saved x (requires_grad) gave weight.grad / main_grad autograd history, and the second
    # deferred wgrad into that main_grad raised "out must not require grad".
    _check_delay_wgrad(recipe, True, main_grad, gen)


@pytest.mark.parametrize("recipe,main_grad", [("bf16", True), ("bf16", False), ("mxfp8", True), ("nvfp4", False),
                                              ("bf16", "some"), ("mxfp8", "some")])
def test_linear_delay_wgrad_per_expert(recipe, main_grad, gen):
    _check_delay_wgrad(recipe, False, main_grad, gen)


# ----------------------------------------------------------------------------- quantized weight cache


def _cache_buffers(cache):
    return [b for b in (cache.data, cache.scale, cache.columnwise_data, cache.columnwise_scale, cache.global_scale)
            if b is not None]


@pytest.mark.parametrize("recipe", QUANTIZED)
def test_weight_cache_refreshed_in_place(recipe, gen):
    sizes = SPLITS["uniform"]
    layer = make_linear(gen, recipe)
    x, dy = batch(gen, layer)
    with torch.no_grad():
        y1 = layer(x, sizes)
    cache = layer._weight_cache
    assert cache is not None
    buffers = _cache_buffers(cache)
    pointers = [b.data_ptr() for b in buffers]
    contents = [b.clone() for b in buffers]
    with torch.no_grad():
        y2 = layer(x, sizes)
    assert layer._weight_cache is cache and [b.data_ptr() for b in _cache_buffers(cache)] == pointers
    assert torch.equal(y1, y2)
    assert all(torch.equal(b, c) for b, c in zip(buffers, contents))

    with torch.no_grad():
        layer.weight.add_(1.0)
        y3 = layer(x, sizes)
    assert layer._weight_cache is cache and [b.data_ptr() for b in _cache_buffers(cache)] == pointers
    assert not torch.equal(cache.data, contents[0]), "cache must be refreshed after an in-place update"
    assert_bf16_close(y3, linear_ref_quantized(x, layer.weight.detach(), None, sizes, None, recipe),
                      what="output after weight update")
    # Backward after the update uses the new weight as well.
    _, xg = run_linear(layer, x, sizes, dy)
    _, dx_ref, dw_ref, _ = linear_ref_quantized(x, layer.weight.detach(), None, sizes, dy, recipe)
    assert_bf16_close(xg.grad, dx_ref, what="grad_input after weight update")
    assert_bf16_close(layer.weight.grad, dw_ref, what="weight grad after weight update")


@pytest.mark.parametrize("recipe", QUANTIZED)
def test_weight_cache_noop_flag(recipe, gen):
    sizes = SPLITS["skewed"]
    layer = make_linear(gen, recipe)
    x, _ = batch(gen, layer)
    with torch.no_grad():
        y0 = layer(x, sizes)
    cache = layer._weight_cache
    pointers = [b.data_ptr() for b in _cache_buffers(cache)]

    layer.weight_noop_flag = torch.ones(())
    with torch.no_grad():
        layer.weight.add_(0.5)
        y1 = layer(x, sizes)
    assert torch.equal(y1, y0), "noop flag set: the stale cached weight is used (by design)"

    layer.weight_noop_flag = torch.zeros(())
    with torch.no_grad():
        y2 = layer(x, sizes)
    assert layer._weight_cache is cache and [b.data_ptr() for b in _cache_buffers(cache)] == pointers
    assert_bf16_close(y2, linear_ref_quantized(x, layer.weight.detach(), None, sizes, None, recipe),
                      what="output with the noop flag cleared")
    assert not torch.equal(y2, y0)


# ----------------------------------------------------------------------------- GroupedMLP

H, FF = 64, 32  # hidden, ffn_hidden


def make_mlp(gen, recipe="bf16", **kw):
    mlp = GroupedMLP(G, H, FF, recipe=recipe, **kw)
    set_weight(mlp.fc1, (torch.randn(G, 2 * FF, H, generator=gen) / H**0.5).to(torch.bfloat16))
    set_weight(mlp.fc2, (torch.randn(G, H, FF, generator=gen) / FF**0.5).to(torch.bfloat16))
    return mlp


def run_mlp(mlp, x, sizes, probs, dy, **kw):
    x = x.detach().clone().requires_grad_()
    p = probs.detach().clone().requires_grad_() if probs is not None else None
    y = mlp(x, sizes, p, **kw)
    y.backward(dy)
    return y, x, p


def test_mlp_parameter_shapes():
    mlp = GroupedMLP(G, H, FF)
    assert mlp.fc1.weight.shape == (G, 2 * FF, H)
    assert mlp.fc2.weight.shape == (G, H, FF)
    assert mlp.fc1.weight.dtype == mlp.fc2.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("with_probs", [True, False], ids=["probs", "noprobs"])
@split_param
def test_mlp_bf16_matches_fp64_reference(splits, with_probs, gen):
    sizes = SPLITS[splits]
    mlp = make_mlp(gen)
    x, dy = bf16(gen, (M, H), span=2), bf16(gen, (M, H), span=2)
    probs = torch.rand(M, generator=gen) if with_probs else None
    y, xg, pg = run_mlp(mlp, x, sizes, probs, dy)
    y_ref, dx_ref, dw1_ref, dw2_ref, dp_ref = mlp_ref(x, mlp.fc1.weight, mlp.fc2.weight, sizes, probs, dy)
    tol = 2e-2
    assert y.shape == (M, H) and y.dtype == torch.bfloat16
    for what, got, ref in (("output", y, y_ref), ("grad_input", xg.grad, dx_ref),
                           ("fc1 weight grad", mlp.fc1.weight.grad, dw1_ref),
                           ("fc2 weight grad", mlp.fc2.weight.grad, dw2_ref)):
        assert torch.isfinite(got).all(), what
        err = rel_err(got, ref)
        assert err <= tol, f"{what}: normwise relative error {err:.3g}"
    if with_probs:
        assert pg.grad.shape == (M,) and pg.grad.dtype == torch.float32
        err = rel_err(pg.grad, dp_ref)
        assert err <= tol, f"probs grad: normwise relative error {err:.3g}"
    total = sum(sizes)
    assert torch.equal(y[total:], torch.zeros_like(y[total:]))
    assert torch.equal(xg.grad[total:], torch.zeros_like(xg.grad[total:]))
    if with_probs:
        assert torch.equal(pg.grad[total:], torch.zeros_like(pg.grad[total:]))
    for g, m in enumerate(sizes):
        if m == 0:
            for w in (mlp.fc1.weight, mlp.fc2.weight):
                assert torch.equal(w.grad[g], torch.zeros_like(w.grad[g]))


def test_mlp_probs_none_same_as_ones(gen):
    sizes = SPLITS["partial"]
    mlp = make_mlp(gen)
    x, dy = bf16(gen, (M, H)), bf16(gen, (M, H))
    y1, x1, _ = run_mlp(mlp, x, sizes, None, dy)
    g1 = (mlp.fc1.weight.grad.clone(), mlp.fc2.weight.grad.clone())
    mlp.zero_grad()
    y2, x2, _ = run_mlp(mlp, x, sizes, torch.ones(M), dy)
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
    assert torch.equal(g1[0], mlp.fc1.weight.grad) and torch.equal(g1[1], mlp.fc2.weight.grad)


@pytest.mark.parametrize("recipe", QUANTIZED)
def test_mlp_quantized_is_fc1_swiglu_fc2(recipe, gen):
    """Structural check (the per-GEMM numerics are checked exactly on GroupedLinear above):
    the MLP equals FC1 -> scaled SwiGLU in fp32, stored bf16 -> FC2 through the same layers,
    bit for bit, gradients included; and it is near the unquantized fp64 reference."""
    sizes = SPLITS["empty"]
    mlp = make_mlp(gen, recipe)
    x, dy = bf16(gen, (M, H), span=2), bf16(gen, (M, H), span=2)
    probs = torch.rand(M, generator=gen)
    y, xg, pg = run_mlp(mlp, x, sizes, probs, dy)
    grads = (mlp.fc1.weight.grad.clone(), mlp.fc2.weight.grad.clone())
    mlp.zero_grad()

    x2 = x.clone().requires_grad_()
    p2 = probs.clone().requires_grad_()
    gate, up = mlp.fc1(x2, sizes).float().chunk(2, dim=1)
    a = (F.silu(gate) * up * p2.unsqueeze(1)).to(torch.bfloat16)
    y2 = mlp.fc2(a, sizes)
    y2.backward(dy)
    assert torch.equal(y, y2)
    assert torch.equal(xg.grad, x2.grad) and torch.equal(pg.grad, p2.grad)
    assert torch.equal(grads[0], mlp.fc1.weight.grad) and torch.equal(grads[1], mlp.fc2.weight.grad)

    y_ref, dx_ref, dw1_ref, dw2_ref, dp_ref = mlp_ref(x, mlp.fc1.weight, mlp.fc2.weight, sizes, probs, dy)
    tol = {"mxfp8": 0.1, "nvfp4": 0.4}[recipe]  # quantization error of the unquantized reference
    for what, got, ref in (("output", y, y_ref), ("grad_input", xg.grad, dx_ref), ("fc1", grads[0], dw1_ref),
                           ("fc2", grads[1], dw2_ref), ("probs", pg.grad, dp_ref)):
        err = rel_err(got, ref)
        assert err <= tol, f"{recipe} {what}: normwise relative error {err:.3g} vs the unquantized reference"


@pytest.mark.parametrize("recipe, x_dtype", [*((r, torch.bfloat16) for r in RECIPES),
                                             ("mxfp8", torch.float32), ("nvfp4", torch.float32)])
def test_mlp_inference_equals_training_forward(recipe, x_dtype, gen):
    """torch.no_grad takes the gemm_swiglu entry for bf16 x and the training path otherwise (an fp32
    x, which quantized recipes take); either way the output is the training forward's, bit for bit."""
    sizes = SPLITS["empty"]
    mlp = make_mlp(gen, recipe)
    x, probs = bf16(gen, (M, H)).to(x_dtype), torch.rand(M, generator=gen)
    with torch.no_grad():
        y_infer = mlp(x, sizes, probs)
    y_train = mlp(x.clone().requires_grad_(), sizes, probs.clone().requires_grad_())
    assert torch.equal(y_infer, y_train.detach())


@pytest.mark.parametrize("recipe", RECIPES)
def test_mlp_out_buffer_forward(recipe, gen):
    sizes = SPLITS["partial"]
    total = sum(sizes)
    mlp = make_mlp(gen, recipe)
    x, probs = bf16(gen, (M, H)), torch.rand(M, generator=gen)
    with torch.no_grad():
        y_self = mlp(x, sizes, probs)
    big, buf, before = _canvas(M, H)
    with torch.no_grad():
        y = mlp(x, sizes, probs, out=buf)
    assert y.data_ptr() == buf.data_ptr()
    assert torch.equal(y[:total], y_self[:total])
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[4:4 + total, 16:16 + H] = False
    assert torch.equal(big[outside], before[outside]), "rows past the total / outside the view must be untouched"


@pytest.mark.parametrize("recipe", RECIPES)
def test_mlp_grad_input_buffer(recipe, gen):
    sizes = SPLITS["empty"]  # all rows grouped, two experts empty
    mlp = make_mlp(gen, recipe)
    x, dy, probs = bf16(gen, (M, H)), bf16(gen, (M, H)), torch.rand(M, generator=gen)
    y1, x1, p1 = run_mlp(mlp, x, sizes, probs, dy)
    g1 = (mlp.fc1.weight.grad.clone(), mlp.fc2.weight.grad.clone())
    mlp.zero_grad()
    big, gbuf, before = _canvas(M, H)
    y2, x2, p2 = run_mlp(mlp, x, sizes, probs, dy, grad_input=gbuf)
    assert torch.equal(y1, y2)
    assert torch.equal(x2.grad, x1.grad) and torch.equal(gbuf, x1.grad)
    assert torch.equal(p2.grad, p1.grad)
    assert torch.equal(g1[0], mlp.fc1.weight.grad) and torch.equal(g1[1], mlp.fc2.weight.grad)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[4:4 + M, 16:16 + H] = False
    assert torch.equal(big[outside], before[outside])


@pytest.mark.parametrize("recipe", RECIPES)
def test_mlp_standalone_out_and_grad_input_buffers(recipe, gen):
    """Both caller buffers, `out` being its own tensor: bit-identical values and gradients."""
    sizes = SPLITS["uniform"]
    mlp = make_mlp(gen, recipe)
    x, dy, probs = bf16(gen, (M, H)), bf16(gen, (M, H)), torch.rand(M, generator=gen)
    y1, x1, p1 = run_mlp(mlp, x, sizes, probs, dy)
    g1 = (mlp.fc1.weight.grad.clone(), mlp.fc2.weight.grad.clone())
    mlp.zero_grad()
    buf = torch.empty(M, H, dtype=torch.bfloat16)
    gbuf = torch.empty(M, H, dtype=torch.bfloat16)
    y2, x2, p2 = run_mlp(mlp, x, sizes, probs, dy, out=buf, grad_input=gbuf)
    assert y2.data_ptr() == buf.data_ptr() and torch.equal(y1, y2)
    assert x2.grad is not None and p2.grad is not None
    assert torch.equal(x2.grad, x1.grad) and torch.equal(gbuf, x1.grad) and torch.equal(p2.grad, p1.grad)
    assert torch.equal(g1[0], mlp.fc1.weight.grad) and torch.equal(g1[1], mlp.fc2.weight.grad)


def test_mlp_out_buffer_view_backward(gen):
    sizes = SPLITS["uniform"]
    mlp = make_mlp(gen)
    x, dy, probs = bf16(gen, (M, H)), bf16(gen, (M, H)), torch.rand(M, generator=gen)
    _, x1, p1 = run_mlp(mlp, x, sizes, probs, dy)
    g1 = mlp.fc1.weight.grad.clone()
    mlp.zero_grad()
    _, buf, _ = _canvas(M, H)
    _, x2, p2 = run_mlp(mlp, x, sizes, probs, dy, out=buf)
    assert x2.grad is not None and p2.grad is not None and mlp.fc1.weight.grad is not None
    assert torch.equal(x2.grad, x1.grad) and torch.equal(p2.grad, p1.grad)
    assert torch.equal(g1, mlp.fc1.weight.grad)


@pytest.mark.parametrize("recipe", ["bf16", "mxfp8"])
def test_mlp_delay_wgrad(recipe, gen):
    sizes = SPLITS["skewed"]
    now = make_mlp(gen, recipe)
    later = GroupedMLP(G, H, FF, recipe=recipe, delay_wgrad=True)
    later.load_state_dict(now.state_dict())
    x, dy, probs = bf16(gen, (M, H)), bf16(gen, (M, H)), torch.rand(M, generator=gen)
    _, x1, p1 = run_mlp(now, x, sizes, probs, dy)
    _, x2, p2 = run_mlp(later, x, sizes, probs, dy)
    assert torch.equal(x1.grad, x2.grad) and torch.equal(p1.grad, p2.grad)
    assert later.fc1.weight.grad is None and later.fc2.weight.grad is None
    later.backward_dw()
    for lin_now, lin_later in ((now.fc1, later.fc1), (now.fc2, later.fc2)):
        assert torch.equal(lin_later.weight.grad, lin_now.weight.grad)
        assert not lin_later.weight.grad.requires_grad, "weight.grad got autograd history"


# ----------------------------------------------------------------------------- bad input


def test_bad_recipe_raises():
    with pytest.raises(ValueError, match="recipe"):
        GroupedLinear(G, K, N, recipe="fp8")
    with pytest.raises(ValueError, match="recipe"):
        GroupedMLP(G, H, FF, recipe="fp8")


@pytest.mark.parametrize("recipe,in_f,out_f", [("mxfp8", 48, 64), ("mxfp8", 64, 80), ("nvfp4", 40, 64),
                                               ("nvfp4", 64, 24)])
def test_features_not_multiple_of_block_raise(recipe, in_f, out_f):
    with pytest.raises(ValueError, match="block size"):
        GroupedLinear(G, in_f, out_f, recipe=recipe)


def test_mlp_ffn_not_multiple_of_block_raises():
    with pytest.raises(ValueError, match="block size"):
        GroupedMLP(G, 64, 48, recipe="mxfp8")


def test_bad_main_grad_mode_raises():
    with pytest.raises(ValueError, match="main_grad_mode"):
        GroupedLinear(G, K, N, main_grad_mode="sum")


def test_bad_num_experts_and_activation_raise():
    with pytest.raises(ValueError):
        GroupedLinear(0, K, N)
    with pytest.raises(ValueError, match="activation"):
        GroupedMLP(G, H, FF, activation="gelu")


@pytest.mark.parametrize("shape", [(M + 1,), (M - 1,), (M, 1), ()], ids=["long", "short", "2d", "scalar"])
def test_mlp_bad_probs_shape_raises(shape, gen):
    mlp = make_mlp(gen)
    x = bf16(gen, (M, H))
    with pytest.raises(ValueError, match="probs"):
        mlp(x, SPLITS["uniform"], torch.rand(shape, generator=gen))


def test_bad_split_sizes_raise(gen):
    layer = make_linear(gen, "bf16")
    x, _ = batch(gen, layer)
    for sizes in ([M, 1, 0, 0], [M // 2, M // 2], [10, -1, 5, 0]):
        with pytest.raises(ValueError):
            layer(x, sizes)
