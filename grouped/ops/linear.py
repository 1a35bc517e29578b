"""GroupedLinear: one nn.Linear per expert over ragged token groups, on grouped.gemm.

forward   Y[rows_g]  = X[rows_g] @ W[g]^T (+ b[g])
backward  dX[rows_g] = dY[rows_g] @ W[g]        (dgrad, into ``grad_input`` when given)
          dW[g]      = dY[rows_g]^T @ X[rows_g] (wgrad; into ``weight.main_grad`` when it exists)
          db[g]      = sum of dY[rows_g]

Recipes: "bf16", or "mxfp8" / "nvfp4": every GEMM operand is quantized along
that GEMM's contraction dim (activations rowwise for forward; dY rowwise for
dgrad; dY and X columnwise, blocks restarting at expert boundaries, for
wgrad). The quantized weight lives in one persistent GroupedTensor (rowwise
for forward, columnwise for dgrad), written in place.

What backward uses is fixed at forward: the split sizes (a grouped.Splits
built once a step: host sizes copied, GPU sizes turned into new end offsets), X (saved through
autograd, so an in-place change of it before backward raises as it does for
nn.Linear; quantized recipes keep their own quantized copy) and the weights
(saved through autograd). Every caller buffer (out, grad_input, main_grad) is
checked in forward, before the first write.

Rows past sum(split_sizes) belong to no expert: they get zeros in outputs and
gradients the layer allocates, and are left untouched in caller buffers.
Everything here goes through grouped.gemm, never a backend directly.

torch.compile(fullgraph=True): the autograd Function traces, and its GEMMs and quantizations
are grouped:: ops in the graph (grouped/custom_ops.py), giving what eager gives bit for bit on
the same backend. Split sizes may be a host list (a graph constant: other values recompile) or a
tensor: a GPU one stays on the device, and a CPU one is not read while tracing either (each GEMM
checks it when the graph runs). Quantized recipes need host split sizes there (quantizing along
tokens pads every expert, on the host) and quantize the weight in the graph on every forward
instead of keeping the cache (reuse_weight_cache and weight_noop_flag apply to eager calls).
Not in a graph: caller buffers (out, grad_input), main_grad and delay_wgrad (refused with a
ValueError; call the layer eagerly for them).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import buffers
from ..formats import get_format
from ..gemm import gemm
from ..quantize import QuantizedTensor, quantize
from ..splits import OFFSET_DTYPES, Splits
from ..tensor import GroupedTensor

MAIN_GRAD_MODES = ("accumulate", "overwrite")
# Activation dtypes per recipe: the GEMMs take bf16 operands; quantized recipes quantize bf16 or fp32.
INPUT_DTYPES = {False: (torch.bfloat16,), True: (torch.bfloat16, torch.float32)}


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _zero_rows_past_total(t: torch.Tensor, splits: Splits, groups: torch.Tensor) -> None:
    """grouped.gemm zeroes them itself for host split sizes; with GPU split sizes it leaves
    them unspecified, and a layer's outputs and gradients must not carry garbage."""
    if splits.on_device:
        t.masked_fill_((groups == splits.num_groups).unsqueeze(1), 0)


def layer_splits(split_sizes, x: torch.Tensor, num_experts: int) -> Splits:
    """The split sizes of one layer step, fixed now (see grouped.splits)."""
    if isinstance(split_sizes, Splits):
        split_sizes.check(x.shape[0], num_experts, x.device)
        return split_sizes
    if torch.compiler.is_compiling() and isinstance(split_sizes, torch.Tensor):
        if split_sizes.dim() != 1 or split_sizes.dtype not in OFFSET_DTYPES:
            raise ValueError(f"split_sizes must be a 1-D int32/int64 tensor, got {split_sizes.dtype} of shape "
                             f"{tuple(split_sizes.shape)}")
        # In a graph the length of a bincount is data-dependent: it is one per expert, checked when it runs.
        torch._check(split_sizes.shape[0] == num_experts,
                     lambda: f"split_sizes must have one entry per expert ({num_experts})")
        if split_sizes.device.type == "cpu":
            # A graph cannot read a tensor's values on the host: the sizes stay a tensor, held as
            # GPU sizes are (end offsets on x's device), and every GEMM checks them when it runs.
            return Splits(num_experts, x.device, ends=torch.cumsum(split_sizes.to(x.device), 0, dtype=torch.int32))
    return Splits.of(split_sizes, rows=x.shape[0], num_groups=num_experts, device=x.device)


def host_split_sizes(splits: Splits, rows: int) -> tuple[int, ...]:
    """The split sizes quantizing along tokens needs: on the host (a sync for GPU sizes, which a
    graph cannot do)."""
    if splits.on_device and torch.compiler.is_compiling():
        raise ValueError("quantized recipes under torch.compile need host split sizes (a list of ints): "
                         "quantizing along tokens pads every expert, on the host")
    return splits.host_sizes(rows)


class _GroupedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, x, grad_input, bias, layer, splits, groups, weight_operand, *weights):
        # ``out`` comes first: when it is a view, autograd's in-place bookkeeping
        # (CopySlices) treats input 0 as the tensor written in place. groups: each row's expert,
        # made by the caller, as are the end offsets the Splits caches for it (under torch.compile
        # a tensor made in here cannot reach the other layer through that cache).
        # weight_operand None: the weight itself (torch.compile refuses a tensor passed twice).
        weight_operand = weights[0] if weight_operand is None else weight_operand
        quantized = layer.fmt.quantized
        x_operand = quantize(x, layer.fmt, split_sizes=host_split_sizes(splits, x.shape[0])) if quantized else x
        y = gemm(x_operand, weight_operand, splits, out=out, out_dtype=x.dtype)
        if out is None:
            _zero_rows_past_total(y, splits, groups)
        if bias is not None:
            with_bias = y + torch.cat((bias, bias.new_zeros(1, bias.shape[1])))[groups]
            y.copy_(torch.where((groups < layer.num_experts).unsqueeze(1), with_bias, y))
        if out is not None:
            ctx.mark_dirty(out)

        # wgrad contracts over tokens: a quantized recipe keeps X quantized along them (columnwise,
        # per expert), its own copy; bf16 saves X itself, so autograd sees in-place changes to it.
        ctx.x_quantized = None
        if quantized:
            ctx.x_quantized = quantize(x, layer.fmt, axis=0, split_sizes=host_split_sizes(splits, x.shape[0]))
        ctx.layer, ctx.splits, ctx.grad_input = layer, splits, grad_input
        ctx.weight_operand, ctx.groups, ctx.has_bias = weight_operand, groups, bias is not None
        ctx.save_for_backward(None if quantized else x, *weights)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        layer, splits = ctx.layer, ctx.splits
        x, *weights = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = None
        if ctx.needs_input_grad[1]:
            dy = grad_y
            if layer.fmt.quantized:
                dy = quantize(grad_y, layer.fmt, split_sizes=host_split_sizes(splits, grad_y.shape[0]))
            weight = ctx.weight_operand
            if isinstance(weight, QuantizedTensor):  # quantized in a graph (rowwise): dgrad's is along N
                weight = quantize(layer.stacked_weight(weights), layer.fmt, axis=1)
            grad_x = gemm(dy, weight, splits, layout="dgrad", out=ctx.grad_input, out_dtype=grad_y.dtype)
            if ctx.grad_input is None:
                _zero_rows_past_total(grad_x, splits, ctx.groups)

        no_grads = (None, grad_x, None, None, None, None, None, None, *[None] * len(weights))
        if not any(ctx.needs_input_grad[3:]):
            return no_grads
        x_for_wgrad = ctx.x_quantized if layer.fmt.quantized else x
        wgrad = _WeightGradient(layer, grad_y, x_for_wgrad, splits, ctx.groups, weights, ctx.has_bias)
        if layer.delay_wgrad:
            layer._pending_wgrad.append(wgrad)
            return no_grads
        weight_grads, bias_grad = wgrad.compute(for_autograd=True)
        return (None, grad_x, None, bias_grad, None, None, None, None, *weight_grads)


class _WeightGradient:
    """The wgrad (and bias gradient) of one backward, run now or later (delayed wgrad)."""

    def __init__(self, layer, grad_y, x_for_wgrad, splits: Splits, groups, weights, has_bias):
        self.layer, self.grad_y, self.x, self.splits = layer, grad_y, x_for_wgrad, splits
        self.groups, self.weights, self.has_bias = groups, weights, has_bias

    def compute(self, *, for_autograd: bool):
        """-> (per-weight grads, bias grad). Grads that went to main_grad come back as None.

        for_autograd: the grads are returned to autograd (which accumulates them);
        otherwise they are added into ``.grad`` here.
        """
        layer, splits = self.layer, self.splits
        dy = self.grad_y
        if layer.fmt.quantized:
            dy = quantize(dy, layer.fmt, axis=0, split_sizes=host_split_sizes(splits, dy.shape[0]))
        main_grads = [getattr(w, "main_grad", None) for w in self.weights]
        grads: list = [None] * len(self.weights)
        if len(self.weights) == 1 and main_grads[0] is not None:
            accumulate = layer.main_grad_mode == "accumulate"
            gemm(dy, self.x, splits, layout="wgrad", out=main_grads[0], accumulate=accumulate)
        else:
            dtype = torch.float32 if any(m is not None for m in main_grads) else self.weights[0].dtype
            dw = gemm(dy, self.x, splits, layout="wgrad", out_dtype=dtype)
            parts = [dw] if len(self.weights) == 1 else list(dw.unbind(0))
            for i, (part, main_grad) in enumerate(zip(parts, main_grads)):
                if main_grad is None:  # fp32 when a sibling has a main_grad: .grad takes the weight's dtype
                    grads[i] = part.to(self.weights[i].dtype)
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

    Quantized recipes re-quantize the weight into its cached GroupedTensor on
    every forward, so no change of the weight goes unseen (not even a write
    through ``weight.data``). ``forward(..., reuse_weight_cache=True)`` skips
    that for a call whose caller knows the weight has not changed since the
    previous forward (later micro-batches of one step, serving); a change of a
    weight's version counter or storage still refreshes it. weight_noop_flag:
    for CUDA graphs, a device scalar that is nonzero when the weights did not
    change; the refresh then runs every call and is skipped on the device.
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
        num_experts = _positive_int(num_experts, "num_experts")
        in_features = _positive_int(in_features, "in_features")
        out_features = _positive_int(out_features, "out_features")
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

    def weight_names(self) -> list[str]:
        return ["weight"] if self.single_weight else [f"weight{g}" for g in range(self.num_experts)]

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, per expert."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            for w in self.weights():
                w.uniform_(-bound, bound)

    def stacked_weight(self, weights) -> torch.Tensor:
        """The experts' weights as one (G, out, in) tensor (an operand: the grads come from the layer)."""
        if self.single_weight:
            return weights[0]
        with torch.no_grad():
            return torch.stack(weights)

    def _forward_weight(self, weights, *, reuse_cache: bool = False):
        """The weight operand of the GEMMs: a (G, out, in) tensor, or the cached quantized one
        (refreshed as the class doc says). Under torch.compile a quantized weight is quantized in
        the graph on every forward instead (to the same bytes): the cache is state written in
        place and checked by version counters, which a graph cannot hold."""
        if not self.fmt.quantized:
            return self.stacked_weight(weights)
        if torch.compiler.is_compiling():
            return quantize(self.stacked_weight(weights), self.fmt)
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
        elif not (reuse_cache and versions == self._cached_versions):
            self._weight_cache.quantize_(experts)
        self._cached_versions = versions
        return self._weight_cache

    def check_call(self, x, out, grad_input) -> None:
        """Everything forward and backward will write or read, checked before the first write."""
        self.check_compilable(out=out, grad_input=grad_input)
        weights = self.weights()
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.in_features:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a 2-D tensor (tokens, in_features={self.in_features}), got {got}")
        allowed = INPUT_DTYPES[self.fmt.quantized]
        if x.dtype not in allowed:
            names = " or ".join(str(d).removeprefix("torch.") for d in allowed)
            raise ValueError(f"x must be {names} for the {self.fmt.name} recipe, got {x.dtype}")
        if x.device != weights[0].device:
            raise ValueError(f"x is on {x.device}, the layer's weights on {weights[0].device}")
        inputs = [x, *weights, *([self.bias] if self.bias is not None else [])]
        if out is not None:
            buffers.check_buffer(out, name="out", shape=(x.shape[0], self.out_features), dtype=x.dtype,
                                 device=x.device, inputs=inputs)
        if grad_input is not None:
            buffers.check_buffer(grad_input, name="grad_input", shape=tuple(x.shape), dtype=x.dtype,
                                 device=x.device, inputs=[t for t in (*inputs, out) if t is not None])
        self.check_main_grads([t for t in (*inputs, out, grad_input) if t is not None])

    def check_compilable(self, **buffers_given) -> None:
        """Under torch.compile: refuse what a graph cannot do. Caller buffers are checked through
        their addresses, which a graph does not have, and delayed wgrad and main_grad write from
        backward into state outside it."""
        if not torch.compiler.is_compiling():
            return
        refused = [f"{name}=" for name, buf in buffers_given.items() if buf is not None]
        refused += ["delay_wgrad=True"] if self.delay_wgrad else []
        refused += ["main_grad"] if any(getattr(w, "main_grad", None) is not None for w in self.weights()) else []
        if refused:
            raise ValueError(f"GroupedLinear under torch.compile does not support {', '.join(refused)}: caller "
                             "buffers, main_grad and delayed wgrad work in eager calls only")

    def check_main_grads(self, inputs) -> None:
        """Each weight's main_grad (wgrad writes it in backward): fp32, the weight's shape, no overlap."""
        for name, w in zip(self.weight_names(), self.weights()):
            main_grad = getattr(w, "main_grad", None)
            if main_grad is not None:
                buffers.check_buffer(main_grad, name=f"{name}.main_grad", shape=tuple(w.shape), dtype=torch.float32,
                                     device=w.device, inputs=inputs)

    def forward(self, x: torch.Tensor, split_sizes, *, out: torch.Tensor | None = None,
                grad_input: torch.Tensor | None = None, reuse_weight_cache: bool = False) -> torch.Tensor:
        self.check_call(x, out, grad_input)
        splits = layer_splits(split_sizes, x, self.num_experts)
        return self.run(x, splits, out=out, grad_input=grad_input, reuse_weight_cache=reuse_weight_cache)

    def run(self, x, splits: Splits, *, out=None, grad_input=None, reuse_weight_cache=False):
        """forward on checked arguments and this step's splits (GroupedMLP shares one Splits
        between its two layers)."""
        weights = self.weights()
        weight_operand = self._forward_weight(weights, reuse_cache=reuse_weight_cache)
        if weight_operand is weights[0]:
            weight_operand = None  # the Function takes it from weights (see its forward)
        groups = splits.row_groups(x.shape[0])
        return _GroupedLinearFunction.apply(out, x, grad_input, self.bias, self, splits, groups, weight_operand,
                                            *weights)

    def backward_dw(self) -> None:
        """Run the wgrad (and bias grad) that backward deferred (delay_wgrad=True), in order."""
        pending, self._pending_wgrad = self._pending_wgrad, []
        with torch.no_grad():  # gradients are leaves, not part of a graph
            for wgrad in pending:
                wgrad.compute(for_autograd=False)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}, recipe={self.fmt.name}")
