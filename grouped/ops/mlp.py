"""GroupedMLP: the expert MLP of an MoE layer, FC1 -> SwiGLU (-> x probs) -> FC2.

    h = fc1(x)                      (M, 2F): first half gate, second half up
    a = silu(h_gate) * h_up         computed in fp32, stored in the input dtype
    a = a * probs[:, None]          optional per-token routing probabilities
    y = fc2(a)                      (M, hidden)

``out`` is FC2's output buffer (what the expert-parallel combine reads) and
``grad_input`` FC1's input-gradient buffer (what the dispatch's backward
reads). Autograd covers the activation and the probabilities' gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import GroupedLinear

ACTIVATIONS = ("swiglu",)


class GroupedMLP(nn.Module):
    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int, *, activation: str = "swiglu",
                 recipe: str = "bf16", **linear_kwargs):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation, self.ffn_hidden = activation, ffn_hidden
        self.fc1 = GroupedLinear(num_experts, hidden, 2 * ffn_hidden, recipe=recipe, **linear_kwargs)
        self.fc2 = GroupedLinear(num_experts, ffn_hidden, hidden, recipe=recipe, **linear_kwargs)

    def forward(self, x: torch.Tensor, split_sizes, probs: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, grad_input: torch.Tensor | None = None) -> torch.Tensor:
        if probs is not None and (probs.dim() != 1 or probs.shape[0] != x.shape[0]):
            raise ValueError(f"probs must be 1-D with one entry per row of x ({x.shape[0]}), got {tuple(probs.shape)}")
        h = self.fc1(x, split_sizes, grad_input=grad_input)
        gate, up = h.float().chunk(2, dim=1)
        a = F.silu(gate) * up
        if probs is not None:
            a = a * probs.float().unsqueeze(1)
        return self.fc2(a.to(x.dtype), split_sizes, out=out)

    def backward_dw(self) -> None:
        """Deferred wgrad of both layers (delay_wgrad=True)."""
        self.fc2.backward_dw()
        self.fc1.backward_dw()
