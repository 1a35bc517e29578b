"""grouped.grouped_mm: torch._grouped_mm's MoE case (2-D tokens x 3-D (G, K, N) weights, int32
end offsets), differentiable, on the CPU reference backend.

Checked against a per-expert fp64 reference within docs/design.md's tolerances, and against
torch._grouped_mm itself, which runs on this CPU build (its rows past offs[-1] are left
uninitialised, so only the grouped rows are compared). Compiled runs: tests/test_compile.py.
"""

import pytest
import torch
from ops_reference import bounds, rel_err

import grouped

G, M, K, N = 4, 64, 64, 32
SIZES = [12, 0, 28, 20]  # an empty expert, and 4 rows past the total
TOTAL = sum(SIZES)
TOLERANCE = {torch.bfloat16: 4e-3, torch.float32: 1e-5}  # docs/design.md, normwise against fp64


def offsets(sizes=SIZES) -> torch.Tensor:
    return torch.tensor(sizes).cumsum(0).to(torch.int32)


def bf16(gen, *shape):
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


def weight(gen, layout: str) -> torch.Tensor:
    """mat_b (G, K, N) as torch._grouped_mm callers pass it: contiguous, or the transpose of an
    nn.Linear-style (G, N, K) weight."""
    return bf16(gen, G, K, N) if layout == "kn" else bf16(gen, G, N, K).transpose(1, 2)


def reference(a, b, dy=None):
    """Per expert a[rows] @ b[g] in fp64 (rows past the total: 0), and with dy the gradients
    (dA, dB) of <y, dy>."""
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y = torch.zeros(a.shape[0], b.shape[2], dtype=torch.float64)
    for g, rows in enumerate(bounds(SIZES)):
        y[rows] = a64[rows] @ b64[g]
    if dy is None:
        return y.detach()
    y.backward(dy.double())
    return y.detach(), a64.grad, b64.grad


def assert_close(got, ref, what):
    err = rel_err(got, ref)
    assert err <= TOLERANCE[got.dtype], f"{what}: normwise relative error {err:.3g}"


@pytest.mark.parametrize("layout", ["kn", "nk^T"])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_forward_backward_against_reference(layout, out_dtype, gen):
    a = bf16(gen, M, K).requires_grad_()
    b = weight(gen, layout).requires_grad_()
    y = grouped.grouped_mm(a, b, offsets(), out_dtype=out_dtype)
    dy = torch.randn(y.shape, generator=gen).to(y.dtype)
    y.backward(dy)
    y_ref, da_ref, db_ref = reference(a, b, dy.to(torch.bfloat16).float())  # backward rounds dy to bf16
    assert y.shape == (M, N) and y.dtype == (out_dtype or torch.bfloat16)
    assert_close(y, y_ref, "output")
    assert_close(a.grad, da_ref, "grad of mat_a")
    assert_close(b.grad, db_ref, "grad of mat_b")
    assert b.grad.stride() == b.stride(), "mat_b's gradient comes in mat_b's layout"
    assert torch.equal(y[TOTAL:], torch.zeros_like(y[TOTAL:]))
    assert torch.equal(a.grad[TOTAL:], torch.zeros_like(a.grad[TOTAL:])), "rows past the total get no gradient"
    assert torch.equal(b.grad[1], torch.zeros_like(b.grad[1])), "an expert with no tokens gets a zero gradient"


@pytest.mark.parametrize("layout", ["kn", "nk^T"])
def test_against_torch_grouped_mm(layout, gen):
    """The line `torch._grouped_mm(a, b, offs=offs)` switches to grouped.grouped_mm unchanged."""
    a, b, dy = bf16(gen, M, K), weight(gen, layout), bf16(gen, M, N)
    results = []
    for mm in (torch._grouped_mm, grouped.grouped_mm):
        a_leaf, b_leaf = a.clone().requires_grad_(), b.clone().requires_grad_()  # clone keeps b's layout
        y = mm(a_leaf, b_leaf, offs=offsets())
        y.backward(dy)
        results.append((y[:TOTAL], a_leaf.grad[:TOTAL], b_leaf.grad))
    for what, theirs, ours in zip(("output", "grad of mat_a", "grad of mat_b"), *results):
        assert_close(ours, theirs.double(), what)


def test_out_buffer(gen):
    a, b = bf16(gen, M, K), weight(gen, "nk^T")
    buf = torch.full((M + 8, N + 8), 5.0, dtype=torch.bfloat16)
    out = buf[4 : 4 + M, :N]  # a strided view into a larger buffer
    result = grouped.grouped_mm(a, b, offsets(), out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out[:TOTAL], grouped.grouped_mm(a, b, offsets())[:TOTAL])
    assert (out[TOTAL:] == 5).all() and (buf[:4] == 5).all(), "rows past the total and outside are untouched"
    with pytest.raises(ValueError, match="out= does not support automatic differentiation"):
        grouped.grouped_mm(a.requires_grad_(), b, offsets(), out=out)


def test_quantized_operands(gen):
    """MXFP8: mat_a quantized rowwise, mat_b (G, K, N) along K (axis 1): the GEMM of the dequantized
    operands."""
    a, b = bf16(gen, M, K), bf16(gen, G, K, N)
    qa, qb = grouped.quantize(a, "mxfp8"), grouped.quantize(b, "mxfp8", axis=1)
    y = grouped.grouped_mm(qa, qb, offsets(), out_dtype=torch.float32)
    assert y.shape == (M, N)
    assert rel_err(y, reference(qa.dequantize(), qb.dequantize())) <= 1e-4
    with pytest.raises(ValueError, match="quantized along K"):
        grouped.grouped_mm(qa, grouped.quantize(b, "mxfp8"), offsets())


def test_weight_only_nvfp4(gen):
    """A bf16 mat_a with an NVFP4 mat_b: the GEMM with the dequantized weight."""
    a, qb = bf16(gen, M, K), grouped.quantize(bf16(gen, G, K, N), "nvfp4", axis=1)
    y = grouped.grouped_mm(a, qb, offsets(), out_dtype=torch.float32)
    assert rel_err(y, reference(a, qb.dequantize())) <= 1e-4
    with pytest.raises(ValueError, match="quantized operands compute forward only, but mat_a requires grad"):
        grouped.grouped_mm(a.requires_grad_(), qb, offsets())
    with torch.no_grad():
        assert torch.equal(grouped.grouped_mm(a, qb, offsets(), out_dtype=torch.float32), y)


@pytest.mark.parametrize("bad", ["bias", "no offs", "3-D mat_a", "strided mat_b", "mixed operands"])
def test_bad_input(bad, gen):
    a, b, offs, kwargs = bf16(gen, M, K), bf16(gen, G, K, N), offsets(), {}
    message = {
        "bias": "bias is not supported",
        "no offs": "offs is required",
        "3-D mat_a": "serves 2-D mat_a",
        "strided mat_b": "mat_b must be contiguous",
        "mixed operands": "must be bf16 tensors, or mat_b a QuantizedTensor",
    }[bad]
    if bad == "bias":
        kwargs["bias"] = torch.zeros(G, N, dtype=torch.bfloat16)
    elif bad == "no offs":
        offs = None
    elif bad == "3-D mat_a":
        a = a.view(G, M // G, K)
    elif bad == "strided mat_b":
        b = bf16(gen, G, K, 2 * N)[:, :, ::2]
    else:
        a = grouped.quantize(a, "mxfp8")
    with pytest.raises(ValueError, match=message):
        grouped.grouped_mm(a, b, offs, **kwargs)
