"""``python -m grouped demo``: one MoE expert layer, forward and backward, checked.

Runs a GroupedMLP (FC1 -> SwiGLU -> routing probabilities -> FC2) on the best
device here, compares the output and every gradient against an fp64 autograd
reference built from per-expert F.linear, prints which backend served each
GEMM and how long a training step took. Without a GPU it runs on the CPU
reference backend at a small size.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from . import explain
from .info import device_of_this_machine
from .ops import GroupedMLP

# (experts, tokens, hidden, ffn_hidden) per device type
_SIZES = {"cuda": (8, 8192, 1024, 2048), "cpu": (4, 512, 128, 256)}
# Normwise relative error allowed against the unquantized fp64 reference: bf16
# activations between the GEMMs; for MXFP8/NVFP4 also the quantization noise of
# every GEMM operand (E4M3: ~2^-4 per element, E2M1: ~2^-2). The exact,
# per-GEMM checks against dequantized operands live in the test suite.
_TOLERANCE = {"bf16": 2e-2, "mxfp8": 0.1, "nvfp4": 0.4}


def _reference(mlp: GroupedMLP, x, sizes, probs):
    """fp64 autograd on per-expert F.linear over the weights the layer actually used."""
    w1 = mlp.fc1._forward_weight(mlp.fc1.weights())
    w2 = mlp.fc2._forward_weight(mlp.fc2.weights())
    dense = [w if isinstance(w, torch.Tensor) else torch.stack(w.dequantize()) for w in (w1, w2)]
    w1, w2 = (w.detach().double().requires_grad_() for w in dense)
    x = x.detach().double().requires_grad_()
    probs = probs.detach().double().requires_grad_()
    outs, start = [], 0
    for g, m in enumerate(sizes):
        rows = slice(start, start + m)
        start += m
        gate, up = F.linear(x[rows], w1[g]).chunk(2, dim=1)
        outs.append(F.linear(F.silu(gate) * up * probs[rows, None], w2[g]))
    return torch.cat(outs), x, probs, w1, w2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _splits(tokens: int, experts: int, gen: torch.Generator) -> list[int]:
    """Skewed routing: expert loads from a random distribution, one expert left empty."""
    weights = torch.rand(experts, generator=gen) + 0.2
    weights[-1] = 0
    sizes = (weights / weights.sum() * tokens).floor().long()
    sizes[0] += tokens - int(sizes.sum())
    return sizes.tolist()


def run_demo(device: str | None = None, recipes=("bf16", "mxfp8", "nvfp4")) -> int:
    device_type, _, gpu = device_of_this_machine()
    try:
        device = torch.device(device or device_type)
    except RuntimeError:
        print(f"demo: --device must be cpu or cuda, got {device!r}", file=sys.stderr)
        return 2
    if device.type not in _SIZES:
        print(f"demo: --device must be cpu or cuda, got {device}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("demo: --device cuda was asked for, but torch sees no CUDA GPU here "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); run without --device "
              "for the CPU demo", file=sys.stderr)
        return 2
    experts, tokens, hidden, ffn = _SIZES[device.type]
    gen = torch.Generator().manual_seed(0)
    sizes = _splits(tokens, experts, gen)
    print(f"GroupedMLP demo on {device} ({gpu}): {experts} experts, {tokens} tokens, "
          f"hidden {hidden}, ffn {ffn}, split sizes {sizes}")
    failures = 0
    for recipe in recipes:
        torch.manual_seed(0)
        mlp = GroupedMLP(experts, hidden, ffn, recipe=recipe).to(device)
        x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16).requires_grad_()
        probs = torch.rand(tokens, generator=gen).to(device).requires_grad_()
        grad_y = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)

        y = mlp(x, sizes, probs)  # the step we check (and the warm-up)
        y.backward(grad_y)
        ref_y, rx, rp, rw1, rw2 = _reference(mlp, x, sizes, probs)
        ref_y.backward(grad_y.double())
        errors = {
            "y": _rel(y, ref_y), "dx": _rel(x.grad, rx.grad), "dprobs": _rel(probs.grad, rp.grad),
            "dW1": _rel(mlp.fc1.weight.grad, rw1.grad), "dW2": _rel(mlp.fc2.weight.grad, rw2.grad),
        }

        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        mlp(x.detach().requires_grad_(), sizes, probs.detach().requires_grad_()).backward(grad_y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_ms = (time.perf_counter() - start) * 1e3
        ok = all(e <= _TOLERANCE[recipe] for e in errors.values())
        failures += not ok
        served = _backends(mlp, x, sizes)
        print(f"\n[{recipe}] step (forward + backward) {step_ms:.2f} ms; "
              f"{'OK' if ok else 'MISMATCH'} vs fp64 reference (normwise rel. error <= {_TOLERANCE[recipe]}):")
        print("  " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
        print("  backends: " + ", ".join(f"{k} -> {v}" for k, v in served.items()))
    return 1 if failures else 0


def _backends(mlp: GroupedMLP, x, sizes) -> dict[str, str]:
    """Which backend serves each GEMM of FC1 (FC2's are the same kinds)."""
    from .quantize import quantize

    fc1 = mlp.fc1
    w = fc1._forward_weight(fc1.weights())
    x = x.detach()
    dy = torch.zeros(x.shape[0], fc1.out_features, dtype=x.dtype, device=x.device)
    if fc1.fmt.quantized:
        ops = {
            "forward": (quantize(x, fc1.fmt), w),
            "dgrad": (quantize(dy, fc1.fmt), w),
            "wgrad": (quantize(dy, fc1.fmt, axis=0, split_sizes=sizes),
                      quantize(x, fc1.fmt, axis=0, split_sizes=sizes)),
        }
    else:
        ops = {"forward": (x, w), "dgrad": (dy, w), "wgrad": (dy, x)}
    return {layout: explain(a, b, sizes, layout=layout).backend for layout, (a, b) in ops.items()}
