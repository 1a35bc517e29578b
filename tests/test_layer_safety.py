"""Nothing wrong without an error, above the GEMM: what backward uses is what forward used, a
weight change is never missed, buffers are checked before the first write, and bad arguments
get messages that name what the caller passed. CPU (reference backend)."""

import subprocess
import sys

import pytest
import torch
from ops_reference import bounds, rel_err

import grouped
from grouped import GroupedLinear, GroupedMLP, GroupedTensor

RECIPES = ["bf16", "mxfp8", "nvfp4"]
G, M, K, N = 4, 64, 64, 32
SIZES = [20, 0, 30, 14]


def _layer(recipe, **kw):
    torch.manual_seed(0)
    return GroupedLinear(G, K, N, recipe=recipe, **kw)


def _x(gen, rows=M, cols=K):
    return torch.randn(rows, cols, generator=gen).to(torch.bfloat16)


def _dw_ref(layer, x, dy, sizes):
    """fp64 dW of the values the layer's recipe multiplies (dequantized along tokens)."""
    if layer.fmt.quantized:
        dyd = grouped.quantize(dy, layer.fmt, axis=0, split_sizes=sizes).dequantize().double()
        xd = grouped.quantize(x, layer.fmt, axis=0, split_sizes=sizes).dequantize().double()
    else:
        dyd, xd = dy.double(), x.double()
    return torch.stack([dyd[r].T @ xd[r] for r in bounds(sizes)])


def test_bf16_x_changed_in_place_before_backward_raises(gen):
    layer = _layer("bf16")
    x = _x(gen).requires_grad_()
    xin = x * 1  # a non-leaf the caller may modify, as nn.Linear's input
    y = layer(xin, SIZES)
    with torch.no_grad():
        xin.mul_(3)  # nn.Linear's backward raises on this too
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(torch.ones_like(y))


@pytest.mark.parametrize("recipe", ["mxfp8", "nvfp4"])
def test_quantized_wgrad_uses_forward_x(recipe, gen):
    """A quantized recipe keeps its own quantized X: a later change of x cannot reach dW."""
    layer = _layer(recipe)
    x = _x(gen)
    x_forward = x.clone()
    y = layer(x, SIZES)
    with torch.no_grad():
        x.mul_(3)
    dy = _x(gen, M, N)
    y.backward(dy)
    assert rel_err(layer.weight.grad, _dw_ref(layer, x_forward, dy, SIZES)) < 1e-2


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "cpu_tensor"])
def test_split_sizes_changed_before_backward_do_not_reach_it(recipe, as_tensor, gen):
    layer = _layer(recipe)
    x = _x(gen)
    sizes = torch.tensor(SIZES) if as_tensor else list(SIZES)
    y = layer(x, sizes)
    if as_tensor:
        sizes.copy_(torch.tensor([64, 0, 0, 0]))
    else:
        sizes[:] = [64, 0, 0, 0]
    dy = _x(gen, M, N)
    y.backward(dy)
    assert rel_err(layer.weight.grad, _dw_ref(layer, x, dy, SIZES)) < 1e-2


@pytest.mark.parametrize("recipe", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("how", ["weight.data", "in place"])
def test_weight_change_is_seen(recipe, how, gen):
    """A write through weight.data (no version change) reaches the next forward; with
    reuse_weight_cache=True a version change still does, and an unchanged weight is reused."""
    layer = _layer(recipe)
    x = _x(gen)
    with torch.no_grad():
        y0 = layer(x, SIZES)
        (layer.weight.data if how == "weight.data" else layer.weight).mul_(-1)
        y1 = layer(x, SIZES, reuse_weight_cache=how == "in place")
        y_reused = layer(x, SIZES, reuse_weight_cache=True)  # the caller's promise: unchanged since
    rows = sum(SIZES)
    assert torch.equal(y1[:rows], -y0[:rows]), f"a change through {how} must reach the next forward"
    assert torch.equal(y_reused, y1)


@pytest.mark.parametrize("layout", ["forward", "wgrad"])
def test_gemm_result_has_no_autograd_history_and_out_reusable(layout, gen):
    a = _x(gen).requires_grad_()
    b = (torch.randn(G, N, K, generator=gen).to(torch.bfloat16) if layout == "forward" else _x(gen)).requires_grad_()
    out = grouped.gemm(a, b, SIZES, layout=layout, backend="reference")
    assert out.grad_fn is None and not out.requires_grad
    again = grouped.gemm(a, b, SIZES, layout=layout, backend="reference", out=out)
    assert again is out and out.grad_fn is None


def test_grouped_tensor_quantize_checks_every_member_before_writing(gen):
    gt = GroupedTensor([(32, 64)] * 3, "mxfp8", device="cpu")
    gt.quantize_([torch.randn(32, 64, generator=gen) for _ in range(3)])
    before = [t.clone() for t in (gt.data, gt.scale)]
    members = [torch.randn(32, 64, generator=gen) for _ in range(2)] + [torch.ones(32, 64, dtype=torch.int32)]
    with pytest.raises(ValueError, match=r"tensors\[2\]"):
        gt.quantize_(members)
    assert all(torch.equal(t, b) for t, b in zip((gt.data, gt.scale), before))


@pytest.mark.parametrize("bad", ["grad_input", "main_grad"])
def test_linear_checks_backward_buffers_before_forward_writes(bad, gen):
    layer = _layer("bf16")
    x = _x(gen).requires_grad_()
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    kwargs = {"out": out}
    if bad == "grad_input":
        kwargs["grad_input"] = torch.empty(M, K + 1, dtype=torch.bfloat16)
        match = "grad_input"
    else:
        layer.weight.main_grad = torch.zeros(G, N, K, dtype=torch.bfloat16)  # must be fp32
        match = "weight.main_grad"
    with pytest.raises(ValueError, match=match):
        layer(x, SIZES, **kwargs)
    assert out.isnan().all(), "out was written before a bad buffer was found"


@pytest.mark.parametrize("recipe,dtype", [("mxfp8", torch.float16), ("bf16", torch.float32),
                                          ("bf16", torch.float16)])
def test_wrong_x_dtype_names_x(recipe, dtype, gen):
    layer = _layer(recipe)
    with pytest.raises(ValueError, match=r"^x must be"):
        layer(_x(gen).to(dtype), SIZES)


@pytest.mark.parametrize("kwargs", [dict(num_experts=2.5), dict(num_experts=True), dict(in_features=64.0),
                                    dict(out_features=-32)])
def test_bad_layer_sizes_raise_value_error(kwargs):
    args = dict(num_experts=G, in_features=K, out_features=N) | kwargs
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        GroupedLinear(args.pop("num_experts"), args.pop("in_features"), args.pop("out_features"))


@pytest.mark.parametrize("shapes", [[(2.9, 64)], [(True, 64)], [(32, "64")]])
def test_grouped_tensor_refuses_non_int_shapes(shapes):
    with pytest.raises(ValueError, match="int"):
        GroupedTensor(shapes, "mxfp8")


def test_grouped_tensor_refuses_integer_bf16_storage():
    with pytest.raises(ValueError, match="dtype"):
        GroupedTensor([(4, 8)], "bf16", dtype=torch.int32)


@pytest.mark.parametrize("alias", ["fc1 bias", "fc2 bias", "fc1 main_grad", "fc2 main_grad vs fc1's"])
def test_mlp_buffers_aliasing_anything_either_layer_touches_refused(alias, gen):
    """GroupedMLP checks FC2's buffers before FC1 writes: against everything of both layers."""
    mlp = GroupedMLP(G, K, N, bias=True).to(torch.bfloat16)
    x = _x(gen).requires_grad_()
    out = torch.full((M, K), float("nan"), dtype=torch.bfloat16)
    storage = torch.zeros(2 * G * 2 * N * K + M * K)  # fp32, room for any of the tensors below
    if alias == "fc1 bias":
        mlp.fc1.bias.data = out.view(-1)[: mlp.fc1.bias.numel()].view_as(mlp.fc1.bias)
        match = "out overlaps"
    elif alias == "fc2 bias":
        mlp.fc2.bias.data = out.view(-1)[: mlp.fc2.bias.numel()].view_as(mlp.fc2.bias)
        match = "out overlaps"
    elif alias == "fc1 main_grad":
        out = storage[: M * K].view(torch.bfloat16)[: M * K].view(M, K).fill_(float("nan"))
        mlp.fc1.weight.main_grad = storage[: G * 2 * N * K].view(G, 2 * N, K)
        match = "out overlaps|main_grad overlaps"
    else:
        mlp.fc1.weight.main_grad = storage[: G * 2 * N * K].view(G, 2 * N, K)
        mlp.fc2.weight.main_grad = storage[G * N * K: G * N * K + G * K * N].view(G, K, N)
        match = "main_grad overlaps"
    before = out.clone()
    with pytest.raises(ValueError, match=match):
        mlp(x, SIZES, out=out)
    assert torch.equal(out.view(torch.int16), before.view(torch.int16)), "out was written before the error"


@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
def test_mlp_integer_probs_refused_in_both_modes(grad, gen):
    mlp = GroupedMLP(G, K, N)
    x = _x(gen).requires_grad_(grad)
    probs = torch.ones(M, dtype=torch.int64)
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="probs"):
        mlp(x, SIZES, probs)


def test_split_sizes_on_meta_device_raise_value_error(gen):
    a, b = _x(gen), torch.randn(G, N, K, generator=gen).to(torch.bfloat16)
    with pytest.raises(ValueError, match="split_sizes"):
        grouped.gemm(a, b, torch.tensor(SIZES, device="meta"))


def test_demo_without_cuda_explains_instead_of_traceback():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "grouped", "demo", "--device", "cuda"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no CUDA GPU" in proc.stderr
