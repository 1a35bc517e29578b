"""GroupedLinear: one nn.Linear per expert over ragged token groups, on grouped.gemm.

forward   Y[rows_g]  = X[rows_g] @ W[g]^T (+ b[g])
backward  dX[rows_g] = dY[rows_g] @ W[g]        (dgrad, into ``grad_input`` when given)
          dW[g]      = dY[rows_g]^T @ X[rows_g] (wgrad; into ``weight.main_grad`` when it exists)
          db[g]      = sum of dY[rows_g]

Recipes: "bf16", or "mxfp8" / "nvfp4": every GEMM operand is quantized along
that GEMM's contraction dim (activations rowwise for forward; dY rowwise for
dgrad; dY and X columnwise, blocks restarting at expert boundaries, for
wgrad). The quantized weight lives in one persistent GroupedTensor (rowwise
for forward, columnwise for dgrad), refreshed in place when the weight changed.

Rows past sum(split_sizes) belong to no expert: they get zeros in outputs and
gradients the layer allocates, and are left untouched in caller buffers.
Everything here goes through grouped.gemm, never a backend directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..formats import get_format
from ..gemm import gemm
from ..offsets import splits_to_offsets
from ..quantize import quantize
from ..tensor import GroupedTensor

MAIN_GRAD_MODES = ("accumulate", "overwrite")


def row_groups(split_sizes, rows: int, device: torch.device) -> torch.Tensor:
    """Each row's expert index (G for rows past the split total), without a host sync."""
    ends = splits_to_offsets(split_sizes, strides=[1], include_leading_zero=[False], dtypes=[torch.int64])[0]
    return torch.searchsorted(ends.to(device), torch.arange(rows, device=device), right=True)


def _zero_rows_past_total(t: torch.Tensor, split_sizes, groups: torch.Tensor, num_groups: int) -> None:
    """grouped.gemm zeroes them itself for host split sizes; with GPU split sizes it leaves
    them unspecified, and a layer's outputs and gradients must not carry garbage."""
    if isinstance(split_sizes, torch.Tensor) and split_sizes.is_cuda:
        t.masked_fill_((groups == num_groups).unsqueeze(1), 0)


class _GroupedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, x, grad_input, bias, layer, split_sizes, *weights):
        # ``out`` comes first: when it is a view, autograd's in-place bookkeeping
        # (CopySlices) treats input 0 as the tensor written in place.
        groups = row_groups(split_sizes, x.shape[0], x.device)
        w_operand = layer._forward_weight(weights)
        x_operand = x if layer.fmt.name == "bf16" else quantize(x, layer.fmt, split_sizes=split_sizes)
        y = gemm(x_operand, w_operand, split_sizes, out=out, out_dtype=x.dtype)
        if out is None:
            _zero_rows_past_total(y, split_sizes, groups, layer.num_experts)
        if bias is not None:
            with_bias = y + torch.cat((bias, bias.new_zeros(1, bias.shape[1])))[groups]
            y.copy_(torch.where((groups < layer.num_experts).unsqueeze(1), with_bias, y))
        if out is not None:
            ctx.mark_dirty(out)

        # wgrad contracts over tokens: keep X quantized along them (columnwise, per expert).
        if layer.fmt.name == "bf16":
            x_for_wgrad = x
        else:
            x_for_wgrad = quantize(x, layer.fmt, axis=0, split_sizes=split_sizes)
        ctx.layer, ctx.split_sizes, ctx.grad_input = layer, split_sizes, grad_input
        ctx.x_for_wgrad, ctx.w_operand, ctx.groups = x_for_wgrad, w_operand, groups
        ctx.has_bias = bias is not None
        ctx.save_for_backward(*weights)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        layer, sizes = ctx.layer, ctx.split_sizes
        weights = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = None
        if ctx.needs_input_grad[1]:
            dy = grad_y if layer.fmt.name == "bf16" else quantize(grad_y, layer.fmt, split_sizes=sizes)
            grad_x = gemm(dy, ctx.w_operand, sizes, layout="dgrad", out=ctx.grad_input, out_dtype=grad_y.dtype)
            if ctx.grad_input is None:
                _zero_rows_past_total(grad_x, sizes, ctx.groups, layer.num_experts)

        if not any(ctx.needs_input_grad[3:]):
            return (None, grad_x, *[None] * (4 + len(weights)))
        wgrad = _WeightGradient(layer, grad_y, ctx.x_for_wgrad, sizes, ctx.groups, weights, ctx.has_bias)
        if layer.delay_wgrad:
            layer._pending_wgrad.append(wgrad)
            weight_grads, bias_grad = [None] * len(weights), None
        else:
            weight_grads, bias_grad = wgrad.compute(for_autograd=True)
        return (None, grad_x, None, bias_grad, None, None, *weight_grads)


class _WeightGradient:
    """The wgrad (and bias gradient) of one backward, run now or later (delayed wgrad)."""

    def __init__(self, layer, grad_y, x_for_wgrad, split_sizes, groups, weights, has_bias):
        self.layer, self.grad_y, self.x, self.split_sizes = layer, grad_y, x_for_wgrad, split_sizes
        self.groups, self.weights, self.has_bias = groups, weights, has_bias

    def compute(self, *, for_autograd: bool):
        """-> (per-weight grads, bias grad). Grads that went to main_grad come back as None.

        for_autograd: the grads are returned to autograd (which accumulates them);
        otherwise they are added into ``.grad`` here.
        """
        layer = self.layer
        dy = self.grad_y
        if layer.fmt.name != "bf16":
            dy = quantize(dy, layer.fmt, axis=0, split_sizes=self.split_sizes)
        main_grads = [getattr(w, "main_grad", None) for w in self.weights]
        grads: list = [None] * len(self.weights)
        if len(self.weights) == 1 and main_grads[0] is not None:
            accumulate = layer.main_grad_mode == "accumulate"
            gemm(dy, self.x, self.split_sizes, layout="wgrad", out=main_grads[0], accumulate=accumulate)
        else:
            dtype = torch.float32 if any(m is not None for m in main_grads) else self.weights[0].dtype
            dw = gemm(dy, self.x, self.split_sizes, layout="wgrad", out_dtype=dtype)
            parts = [dw] if len(self.weights) == 1 else list(dw.unbind(0))
            for i, (part, main_grad) in enumerate(zip(parts, main_grads)):
                if main_grad is None:
                    grads[i] = part
                elif layer.main_grad_mode == "accumulate":
                    main_grad.add_(part)
                else:
                    main_grad.copy_(part)
        bias_grad = None
        if self.has_bias:
            sums = torch.zeros(layer.num_experts + 1, layer.out_features, dtype=torch.float32, device=dy.device)
            sums.index_add_(0, self.groups, self.grad_y.float())
            bias_grad = sums[:-1].to(layer.bias.dtype)
        if not for_autograd:
            params = list(self.weights) + ([layer.bias] if self.has_bias else [])
            for p, g in zip(params, grads + [bias_grad]):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        return grads, bias_grad


class GroupedLinear(nn.Module):
    """num_experts linear layers (in_features -> out_features) over ragged token groups.

    single_weight: one (G, out, in) parameter ``weight``; otherwise one (out, in)
    parameter per expert, ``weight0`` .. ``weight{G-1}``. recipe: "bf16",
    "mxfp8" or "nvfp4". When a weight has an fp32 ``main_grad`` attribute,
    wgrad goes there (``main_grad_mode`` "accumulate", Megatron's convention,
    or "overwrite") and the weight's ``.grad`` stays None. delay_wgrad:
    backward computes dgrad only; call ``backward_dw()`` later for wgrad.
    weight_noop_flag: for CUDA graphs with a quantized recipe, a device scalar
    that is nonzero when the weights did not change since the last step; the
    cached quantized weight is then refreshed on every call, skipped on the
    device. Without it the refresh is decided on the host from the weights'
    version counters.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        recipe: str = "bf16",
        single_weight: bool = True,
        main_grad_mode: str = "accumulate",
        delay_wgrad: bool = False,
        device=None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if main_grad_mode not in MAIN_GRAD_MODES:
            raise ValueError(f"main_grad_mode must be one of {MAIN_GRAD_MODES}, got {main_grad_mode!r}")
        self.fmt = get_format(recipe, argument="recipe")
        if self.fmt.quantized:
            for name, n in (("in_features", in_features), ("out_features", out_features)):
                if n % self.fmt.block_size:
                    raise ValueError(
                        f"{name}={n} must be a multiple of the {self.fmt.name} block size {self.fmt.block_size}"
                    )
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.single_weight, self.main_grad_mode, self.delay_wgrad = single_weight, main_grad_mode, delay_wgrad
        factory = {"device": device, "dtype": dtype}
        if single_weight:
            self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **factory))
        else:
            for g in range(num_experts):
                self.register_parameter(f"weight{g}", nn.Parameter(torch.empty(out_features, in_features, **factory)))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features, **factory)) if bias else None
        self.weight_noop_flag: torch.Tensor | None = None
        self._weight_cache: GroupedTensor | None = None
        self._cached_versions: tuple | None = None
        self._pending_wgrad: list[_WeightGradient] = []
        self.reset_parameters()

    def weights(self) -> list[nn.Parameter]:
        if self.single_weight:
            return [self.weight]
        return [getattr(self, f"weight{g}") for g in range(self.num_experts)]

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, per expert."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            for w in self.weights():
                w.uniform_(-bound, bound)

    def _forward_weight(self, weights):
        """The weight operand of the GEMMs: a (G, out, in) tensor, or the cached quantized one."""
        if not self.fmt.quantized:
            return weights[0] if self.single_weight else torch.stack(weights)
        experts = list(weights[0].unbind(0)) if self.single_weight else list(weights)
        if self._weight_cache is None or self._weight_cache.device != weights[0].device:
            self._weight_cache = GroupedTensor(
                [(self.out_features, self.in_features)] * self.num_experts, self.fmt,
                rowwise=True, columnwise=True, device=weights[0].device,
            )
            self._cached_versions = None
        versions = tuple((w._version, w.data_ptr()) for w in weights)
        if self.weight_noop_flag is not None:
            self._weight_cache.quantize_(experts, noop_flag=self.weight_noop_flag)
        elif versions != self._cached_versions:
            self._weight_cache.quantize_(experts)
        self._cached_versions = versions
        return self._weight_cache

    def forward(self, x: torch.Tensor, split_sizes, *, out: torch.Tensor | None = None,
                grad_input: torch.Tensor | None = None) -> torch.Tensor:
        return _GroupedLinearFunction.apply(out, x, grad_input, self.bias, self, split_sizes, *self.weights())

    def backward_dw(self) -> None:
        """Run the wgrad (and bias grad) that backward deferred (delay_wgrad=True), in order."""
        pending, self._pending_wgrad = self._pending_wgrad, []
        with torch.no_grad():  # gradients are leaves, not part of a graph
            for wgrad in pending:
                wgrad.compute(for_autograd=False)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}, recipe={self.fmt.name}")
