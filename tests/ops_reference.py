"""Helpers and references shared by the GroupedLinear / GroupedMLP tests (CPU and GPU)."""

import torch
import torch.nn.functional as F


def bounds(sizes):
    """Row slices of the experts, in order."""
    start = 0
    for m in sizes:
        yield slice(start, start + m)
        start += m


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error, in fp64 on the CPU."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def mlp_ref(x, w1, w2, sizes, probs, dy):
    """fp64 autograd on the CPU, per expert h = x W1^T, a = silu(gate) * up * probs, y = a W2^T:
    (y, dx, dW1, dW2, dprobs); rows past the split total are zero."""
    x64 = x.detach().cpu().double().requires_grad_()
    w1 = w1.detach().cpu().double().requires_grad_()
    w2 = w2.detach().cpu().double().requires_grad_()
    p64 = probs.detach().cpu().double().requires_grad_() if probs is not None else None
    parts = []
    for g, r in enumerate(bounds(sizes)):
        gate, up = F.linear(x64[r], w1[g]).chunk(2, dim=-1)
        a = F.silu(gate) * up
        if p64 is not None:
            a = a * p64[r].unsqueeze(1)
        parts.append(F.linear(a, w2[g]))
    y = torch.cat(parts + [x64.new_zeros(x.shape[0] - sum(sizes), w2.shape[1])])
    y.backward(dy.detach().cpu().double())
    return y.detach(), x64.grad, w1.grad, w2.grad, None if p64 is None else p64.grad
