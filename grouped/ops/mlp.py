"""GroupedMLP: the expert MLP of an MoE layer, FC1 -> SwiGLU (-> x probs) -> FC2.

    h = fc1(x)                      (M, 2F): first half gate, second half up
    a = silu(h_gate) * h_up         computed in fp32, stored in the input dtype
    a = a * probs[:, None]          optional per-token routing probabilities
    y = fc2(a)                      (M, hidden)

``out`` is FC2's output buffer (what the expert-parallel combine reads) and
``grad_input`` FC1's input-gradient buffer (what the dispatch's backward
reads). Autograd covers the activation and the probabilities' gradient. When no
gradient is needed (inference, torch.no_grad), FC1 + SwiGLU + probs go through
``grouped.gemm_swiglu``, which fuses them where a backend can and otherwise
computes exactly what the training path does (bf16 x; an fp32 x, which
quantized recipes take, keeps the training path). The split sizes are fixed once
per step (``grouped.Splits``) and shared by both layers. Under torch.compile it
compiles as GroupedLinear does (see grouped/ops/linear.py), split sizes from a
bincount included.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import buffers
from ..fused import check_probs, gemm_swiglu, swiglu
from ..quantize import quantize
from .linear import GroupedLinear, host_split_sizes, layer_splits

ACTIVATIONS = ("swiglu",)


class GroupedMLP(nn.Module):
    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int, *, activation: str = "swiglu",
                 recipe: str = "bf16", **linear_kwargs):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if isinstance(ffn_hidden, bool) or not isinstance(ffn_hidden, int) or ffn_hidden < 1:
            raise ValueError(f"ffn_hidden must be a positive int, got {ffn_hidden!r}")
        self.activation, self.ffn_hidden = activation, ffn_hidden
        self.fc1 = GroupedLinear(num_experts, hidden, 2 * ffn_hidden, recipe=recipe, **linear_kwargs)
        self.fc2 = GroupedLinear(num_experts, ffn_hidden, hidden, recipe=recipe, **linear_kwargs)

    def forward(self, x: torch.Tensor, split_sizes, probs: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, grad_input: torch.Tensor | None = None,
                reuse_weight_cache: bool = False) -> torch.Tensor:
        """y = fc2(swiglu(fc1(x)) * probs); see GroupedLinear.forward for out, grad_input and
        reuse_weight_cache (which applies to both layers)."""
        self.fc2.check_compilable(out=out)
        self.fc1.check_call(x, None, grad_input)
        check_probs(probs, rows=x.shape[0], device=x.device, operand="x")
        # FC2's checks would run after FC1 wrote: check everything both layers touch now
        given = [t for t in (x, probs, grad_input, *self.parameters()) if t is not None]
        fc1_main_grads, fc2_main_grads = ([w.main_grad for w in layer.weights() if getattr(w, "main_grad", None)
                                           is not None] for layer in (self.fc1, self.fc2))
        if out is not None:
            buffers.check_buffer(out, name="out", shape=(x.shape[0], self.fc2.out_features), dtype=x.dtype,
                                 device=x.device, inputs=given + fc1_main_grads + fc2_main_grads)
            given.append(out)
        self.fc1.check_main_grads(given + fc2_main_grads)
        self.fc2.check_main_grads(given + fc1_main_grads)
        splits = layer_splits(split_sizes, x, self.fc1.num_experts)
        if self._inference_only(x, probs, grad_input):
            # FC1 + SwiGLU + probs through the fused entry (one kernel where a backend fuses it).
            fc1 = self.fc1
            a = x if not fc1.fmt.quantized else quantize(x, fc1.fmt, split_sizes=host_split_sizes(splits, x.shape[0]))
            weight = fc1._forward_weight(fc1.weights(), reuse_cache=reuse_weight_cache)
            act = gemm_swiglu(a, weight, splits, probs)
            return self.fc2.run(act.to(x.dtype), splits, out=out, reuse_weight_cache=reuse_weight_cache)
        h = self.fc1.run(x, splits, grad_input=grad_input, reuse_weight_cache=reuse_weight_cache)
        a = swiglu(h, probs)
        return self.fc2.run(a.to(x.dtype), splits, out=out, reuse_weight_cache=reuse_weight_cache)

    def _inference_only(self, x, probs, grad_input) -> bool:
        """No gradient will be asked for: the fused FC1 entry (forward only) may serve. Only for bf16
        x: gemm_swiglu's h is bf16, while the training path keeps an fp32 x's h in fp32."""
        if grad_input is not None or self.fc1.bias is not None or x.dtype != torch.bfloat16:
            return False
        if not torch.is_grad_enabled():
            return True
        tensors = [x, probs, *self.fc1.weights(), *self.fc2.weights()]
        return not any(t is not None and t.requires_grad for t in tensors)

    def backward_dw(self) -> None:
        """Deferred wgrad of both layers (delay_wgrad=True)."""
        self.fc2.backward_dw()
        self.fc1.backward_dw()
