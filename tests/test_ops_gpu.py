"""GroupedMLP on CUDA: numerics against fp64, CUDA-graph capture and replay, and no host sync.

All tests here are marked ``gpu`` (skipped without CUDA). Run them on the lent GPU with
``python -m pytest -m gpu tests/test_ops_gpu.py -s``: with ``-s`` each test prints the
backend chosen for every GEMM kind it ran, which the closing note of an issue should quote.

Data is drawn on the CPU from the per-test ``gen`` and copied to the GPU, so a run is
reproducible; the fp64 reference runs on the CPU (per-expert ``F.linear``, SwiGLU with the
first half of FC1's output as the gate and the second half as up, times the routing probs).
"""

import importlib

import pytest
import torch
from ops_reference import mlp_ref, rel_err

from grouped import GroupedMLP
from grouped.backends import BACKENDS

pytestmark = pytest.mark.gpu

selector = importlib.import_module("grouped.selector")

G, M, H, FF = 4, 256, 128, 64  # experts, token capacity, hidden, ffn_hidden
SPLITS = {
    "uniform": [64, 64, 64, 64],
    "skewed": [200, 1, 15, 40],
    "empty": [0, 130, 0, 126],
    "partial": [10, 0, 100, 30],  # sums to 140 < M: rows 140.. belong to no expert
}
NORMWISE_VS_FP64 = 2e-2  # bf16 intermediate (FC1 output, activation) and bf16 outputs


# ----------------------------------------------------------------------------- helpers


def make_mlp(gen, device):
    mlp = GroupedMLP(G, H, FF, recipe="bf16", device=device)
    with torch.no_grad():
        mlp.fc1.weight.copy_(torch.randn(G, 2 * FF, H, generator=gen) / H**0.5)
        mlp.fc2.weight.copy_(torch.randn(G, H, FF, generator=gen) / FF**0.5)
    return mlp


def draw(gen, device):
    """x, dY (bf16) and routing probs (fp32), drawn on the CPU."""
    x = torch.randn(M, H, generator=gen).to(torch.bfloat16)
    dy = torch.randn(M, H, generator=gen).to(torch.bfloat16)
    probs = torch.rand(M, generator=gen)
    return x.to(device), dy.to(device), probs.to(device)


def run_eager(mlp, x, sizes, probs, dy):
    """Forward + backward on fresh leaves; parameter grads are replaced (set to None first)."""
    mlp.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    p = probs.detach().clone().requires_grad_() if probs is not None else None
    y = mlp(x, sizes, p)
    y.backward(dy)
    return y.detach(), x.grad, mlp.fc1.weight.grad, mlp.fc2.weight.grad, None if p is None else p.grad


NAMES = ("output", "grad_input", "fc1 weight grad", "fc2 weight grad", "probs grad")


def check_vs_fp64(got, mlp, x, sizes, probs, dy, *, tag=""):
    ref = mlp_ref(x, mlp.fc1.weight, mlp.fc2.weight, sizes, probs, dy)
    for name, a, b in zip(NAMES, got, ref):
        if b is None:
            continue
        assert a is not None, f"{tag}{name}: missing"
        assert torch.isfinite(a).all(), f"{tag}{name}: not finite"
        err = rel_err(a, b)
        assert err <= NORMWISE_VS_FP64, f"{tag}{name}: normwise relative error {err:.3g} vs fp64"
    total = sum(sizes)
    for name, t in (("output", got[0]), ("grad_input", got[1]), ("probs grad", got[4])):
        if t is not None:  # rows past the total belong to no expert: zero in what the layers allocate
            assert torch.count_nonzero(t[total:]).item() == 0, f"{tag}{name}: rows past the split total not zero"


@pytest.fixture
def decisions(monkeypatch):
    """Every selector decision made while the test runs (a list of grouped.selector.Decision)."""
    seen = []
    decide = selector.decide

    def recording(problem, backend=None):
        d = decide(problem, backend)
        seen.append(d)
        return d

    monkeypatch.setattr(selector, "decide", recording)
    return seen


def summary(seen):
    kinds = sorted({(d.problem.describe(), d.backend) for d in seen})
    return "\n".join(f"  {desc} -> {backend}" for desc, backend in kinds)


def assert_graph_safe(seen, *, what):
    assert seen, f"{what}: no GEMM went through grouped.gemm"
    unsafe = [d for d in seen if not BACKENDS[d.backend].graph_safe]
    assert not unsafe, f"{what}: backends that are not graph-safe were chosen:\n{summary(unsafe)}"


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("splits_on", ["host", "device"])
@pytest.mark.parametrize("splits", list(SPLITS))
@pytest.mark.parametrize("with_probs", [True, False], ids=["probs", "noprobs"])
def test_mlp_bf16_cuda_matches_fp64(splits, splits_on, with_probs, gen, decisions):
    dev = torch.device("cuda")
    sizes = SPLITS[splits]
    mlp = make_mlp(gen, dev)
    x, dy, probs = draw(gen, dev)
    probs = probs if with_probs else None
    split_arg = sizes if splits_on == "host" else torch.tensor(sizes, dtype=torch.int32, device=dev)
    got = run_eager(mlp, x, split_arg, probs, dy)
    torch.cuda.synchronize()
    print(f"\n[{splits}, {splits_on} split sizes] backends:\n{summary(decisions)}")
    assert got[0].device.type == "cuda" and got[0].dtype == torch.bfloat16 and got[0].shape == (M, H)
    check_vs_fp64(got, mlp, x, sizes, probs, dy)


# ----------------------------------------------------------------------------- CUDA graph


def _zero_grads_in_place(mlp, *leaves):
    mlp.zero_grad(set_to_none=False)
    for t in leaves:
        if t.grad is not None:
            t.grad.zero_()


def test_mlp_cuda_graph_capture_and_replay(gen, decisions):
    """One forward+backward captured with the split sizes in a CUDA int32 tensor, replayed for
    other splits (same token capacity, some experts empty) and fresh data; matches eager."""
    dev = torch.device("cuda")
    mlp = make_mlp(gen, dev)
    order = ["uniform", "empty", "partial", "skewed"]  # captured with the first, replayed with the rest
    splits_dev = torch.tensor(SPLITS[order[0]], dtype=torch.int32, device=dev)

    # Static inputs: the graph reads these addresses on every replay.
    x0, dy0, p0 = draw(gen, dev)
    x = x0.clone().requires_grad_()
    probs = p0.clone().requires_grad_()
    grad_y = dy0.clone()

    # PyTorch's whole-network recipe: warm up on a side stream, then capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _zero_grads_in_place(mlp, x, probs)
            y = mlp(x, splits_dev, probs)
            y.backward(grad_y)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    # Grads exist now; zero them in place so that capture accumulates into these very tensors.
    _zero_grads_in_place(mlp, x, probs)
    grad_tensors = [mlp.fc1.weight.grad, mlp.fc2.weight.grad, x.grad, probs.grad]
    assert all(t is not None for t in grad_tensors)

    decisions.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = mlp(x, splits_dev, probs)
        static_y.backward(grad_y)
    torch.cuda.synchronize()
    print(f"\n[graph capture] backends:\n{summary(decisions)}")
    assert_graph_safe(decisions, what="graph capture")
    assert all(d.problem.capturing and d.problem.device_splits for d in decisions)
    now = [mlp.fc1.weight.grad, mlp.fc2.weight.grad, x.grad, probs.grad]
    assert all(a is b for a, b in zip(now, grad_tensors)), "capture must accumulate into the existing grad tensors"

    for name in order[1:] + order[:1]:
        sizes = SPLITS[name]
        xn, dyn, pn = draw(gen, dev)
        with torch.no_grad():
            x.copy_(xn)
            probs.copy_(pn)
            grad_y.copy_(dyn)
            splits_dev.copy_(torch.tensor(sizes, dtype=torch.int32))
        _zero_grads_in_place(mlp, x, probs)
        graph.replay()
        torch.cuda.synchronize()
        replayed = tuple(t.detach().clone() for t in
                         (static_y, x.grad, mlp.fc1.weight.grad, mlp.fc2.weight.grad, probs.grad))

        eager = run_eager(mlp, xn, torch.tensor(sizes, dtype=torch.int32, device=dev), pn, dyn)
        torch.cuda.synchronize()
        exact = all(torch.equal(a, b) for a, b in zip(replayed, eager))
        print(f"[replay {name} {sizes}] bit-identical to eager: {exact}")
        for what, a, b in zip(NAMES, replayed, eager):
            err = rel_err(a, b)
            assert err <= 1e-2, f"replay {name}: {what} differs from eager (normwise {err:.3g})"
        check_vs_fp64(replayed, mlp, xn, sizes, pn, dyn, tag=f"replay {name}: ")
        # Restore the graph's grad tensors (run_eager replaced them with new ones).
        for p, t in zip((mlp.fc1.weight, mlp.fc2.weight), grad_tensors[:2]):
            p.grad = t


# ----------------------------------------------------------------------------- no host sync


def test_mlp_eager_forward_backward_is_sync_free(gen, decisions):
    dev = torch.device("cuda")
    sizes = SPLITS["empty"]
    mlp = make_mlp(gen, dev)
    x, dy, probs = draw(gen, dev)
    splits_dev = torch.tensor(sizes, dtype=torch.int32, device=dev)
    # One warm-up step outside the check (lazy initialisation, kernel compilation may sync).
    run_eager(mlp, x, splits_dev, probs, dy)
    mlp.zero_grad(set_to_none=True)
    xl = x.detach().clone().requires_grad_()
    pl = probs.detach().clone().requires_grad_()
    torch.cuda.synchronize()
    decisions.clear()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = mlp(xl, splits_dev, pl)
        y.backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    print(f"\n[eager, GPU split sizes, sync debug mode 'error'] backends:\n{summary(decisions)}")
    assert_graph_safe(decisions, what="eager with GPU split sizes")
    got = (y.detach(), xl.grad, mlp.fc1.weight.grad, mlp.fc2.weight.grad, pl.grad)
    check_vs_fp64(got, mlp, x, sizes, probs, dy)
