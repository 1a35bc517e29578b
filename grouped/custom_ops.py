"""grouped's entries as torch.library custom ops, so torch.compile(fullgraph=True) keeps them in its graph.

Under torch.compile (``torch.compiler.is_compiling()``) grouped.gemm, gemm_swiglu, quantize and
splits_to_offsets call the ``*_in_graph`` functions below, which hand the call to one op as
tensors plus constants; eager
calls run their own Python as they always did. The op's real implementation rebuilds the
arguments and runs that same eager function, so a compiled call computes exactly what an eager
one does, with the same checks and messages, raised when the graph runs: that is where tensor
values (split sizes among them) exist. Each op's fake implementation gives the output's shape,
strides and dtype from shapes and constants alone; it never reads split sizes.
grouped.grouped_mm calls its op in eager mode too: its autograd formula is registered there.

    grouped::gemm(a..., b..., splits..., layout, accumulate, out_dtype, backend) -> Tensor
    grouped::gemm_out(..., Tensor(a!) buffer) -> ()           into out= (or main_grad)
    grouped::gemm_swiglu(a..., b..., splits..., probs, backend) -> Tensor
    grouped::gemm_swiglu_out(..., Tensor(a!) buffer) -> ()
    grouped::quantize(x, fmt, axis, split_sizes) -> [data, scale(, global_scale)]
    grouped::splits_to_offsets(split_sizes, strides, include_leading_zero, int64) -> Tensor[]
    grouped::grouped_mm(mat_a, mat_b, offs, out_dtype) -> Tensor    differentiable

The buffer an _out op writes is not called ``out``: torch.compile takes an argument of that name
for an out= variant, and refuses a strided one.

An operand crosses the op boundary as (tensors, spec, dims) (_pack, _unpack):

    bf16 tensor      [t], "tensor", []
    QuantizedTensor  [data, scale, global_scale], "quantized <fmt> <axis> <layout> <splits|->",
                     its shape followed by its split sizes
    GroupedTensor    [data, scale, columnwise_data, columnwise_scale, global_scale],
                     "grouped <fmt> <rowwise 0|1> <columnwise 0|1>", its member shapes flattened

Shapes and split sizes travel as ints (symbolic ones under dynamic shapes), the rest in the
string. Split sizes cross as (split_sizes, split_tensor, splits_are_offsets): a host list or a
tensor (CPU or GPU) of sizes or inclusive end offsets, as grouped.gemm takes them; a
grouped.Splits passes its end offsets on the device and its host sizes when it has them.
"""

import torch
from torch import Tensor

from .buffers import ceil_to
from .formats import get_format
from .fused import run_gemm_swiglu
from .gemm import grouped_mm_weight, run_gemm
from .offsets import splits_to_offsets
from .quantize import QuantizedTensor, _normalize_axis, quantize, split_sizes_to_list
from .splits import Splits
from .tensor import GroupedTensor

# ---- operands -------------------------------------------------------------------------------


def _pack(op, name: str) -> tuple[list[Tensor | None], str, list[int]]:
    """An operand as (tensors, spec, dims) (see the module doc)."""
    if isinstance(op, Tensor):
        return [op], "tensor", []
    if isinstance(op, QuantizedTensor):
        grouped_rows = "-" if op.split_sizes is None else "splits"
        spec = f"quantized {op.fmt.name} {op.axis} {op.layout} {grouped_rows}"
        return [op.data, op.scale, op.global_scale], spec, [*op.shape, *(op.split_sizes or ())]
    if isinstance(op, GroupedTensor):
        spec = f"grouped {op.fmt.name} {int(op.rowwise)} {int(op.columnwise)}"
        tensors = [op.data, op.scale, op.columnwise_data, op.columnwise_scale, op.global_scale]
        return tensors, spec, [d for shape in op.shapes for d in shape]
    raise ValueError(
        f"{name} must be a bf16 torch.Tensor, a QuantizedTensor or a GroupedTensor, got {type(op).__name__}"
    )


def _unpack(tensors: list[Tensor | None], spec: str, dims: list[int]):
    """The operand _pack took apart."""
    kind, *fields = spec.split()
    if kind == "tensor":
        return tensors[0]
    if kind == "quantized":
        fmt, axis, layout, grouped_rows = fields
        data, scale, global_scale = tensors
        ndim = data.dim()
        split_sizes = tuple(dims[ndim:]) if grouped_rows == "splits" else None
        return QuantizedTensor(data, scale, global_scale, get_format(fmt), int(axis), torch.Size(dims[:ndim]),
                               split_sizes, layout)
    fmt, rowwise, columnwise = fields
    shapes = [(dims[i], dims[i + 1]) for i in range(0, len(dims), 2)]
    # GroupedTensor has no constructor from existing buffers: lay one out on the meta device (no
    # memory), then give it the buffers, which have exactly that layout.
    operand = GroupedTensor(shapes, fmt, rowwise=rowwise == "1", columnwise=columnwise == "1", device="meta")
    (operand.data, operand.scale, operand.columnwise_data, operand.columnwise_scale,
     operand.global_scale) = tensors
    operand.device = _device(tensors)
    return operand


def _logical_shape(tensors: list[Tensor | None], spec: str, dims: list[int], *, stacked: bool) -> list[int]:
    """An operand's logical shape from its parts (fake implementations: no values read).
    stacked: a GroupedTensor of expert weights, (G, rows, K); else its members' rows, (sum, K)."""
    kind = spec.split()[0]
    if kind == "tensor":
        return list(tensors[0].shape)
    if kind == "quantized":
        return dims[: tensors[0].dim()]
    rows, k = dims[0::2], dims[1]
    return [len(rows), rows[0], k] if stacked else [sum(rows), k]


def _device(tensors: list[Tensor | None]) -> torch.device:
    return next(t for t in tensors if t is not None).device


# ---- split sizes ----------------------------------------------------------------------------


def _pack_splits(split_sizes, offsets) -> tuple[list[int] | None, Tensor | None, bool]:
    """(split_sizes, split_tensor, splits_are_offsets) for an op, from grouped.gemm's arguments:
    the list or the tensor given, splits_are_offsets saying which it holds. Nothing is read: a
    tensor's values are checked by the op when it runs. A Splits passes its end offsets on the
    device, with its host sizes in split_sizes when it has them (so no op copies them again)."""
    if isinstance(split_sizes, Splits) and offsets is None:
        sizes = None if split_sizes.sizes is None else list(split_sizes.sizes)
        return sizes, split_sizes.end_offsets(torch.int32), True
    if (split_sizes is None) == (offsets is None):
        raise ValueError("give exactly one of split_sizes and offsets")
    given, are_offsets = (split_sizes, False) if offsets is None else (offsets, True)
    if isinstance(given, Tensor):
        return None, given, are_offsets
    # an op's int[] argument: the element types are checked here, as eager checks them (values when it runs)
    return list(split_sizes_to_list(given, rows=2**62, argument="offsets" if are_offsets else "split_sizes")), None, \
        are_offsets


def _unpack_splits(split_sizes, split_tensor, splits_are_offsets) -> tuple:
    """(split_sizes, offsets) arguments for grouped.gemm."""
    if split_sizes is not None and split_tensor is not None:  # a Splits' host sizes and its end offsets
        return Splits(len(split_sizes), split_tensor.device, sizes=tuple(split_sizes), ends=split_tensor), None
    given = split_sizes if split_tensor is None else split_tensor
    return (None, given) if splits_are_offsets else (given, None)


def _num_groups(split_sizes, split_tensor) -> int:
    return len(split_sizes) if split_tensor is None else split_tensor.shape[0]


# ---- grouped::gemm ---------------------------------------------------------------------------


def _run_gemm(a, a_spec, a_dims, b, b_spec, b_dims, split_sizes, split_tensor, splits_are_offsets, layout,
              accumulate, out_dtype, backend, out=None) -> Tensor:
    sizes, offsets = _unpack_splits(split_sizes, split_tensor, splits_are_offsets)
    return run_gemm(
        _unpack(a, a_spec, a_dims), _unpack(b, b_spec, b_dims), sizes, offsets=offsets, layout=layout, out=out,
        accumulate=accumulate, out_dtype=out_dtype, backend=backend,
    )


@torch.library.custom_op("grouped::gemm", mutates_args=())
def _gemm_op(a: list[Tensor | None], a_spec: str, a_dims: list[int], b: list[Tensor | None], b_spec: str,
             b_dims: list[int], split_sizes: list[int] | None, split_tensor: Tensor | None,
             splits_are_offsets: bool, layout: str, accumulate: bool, out_dtype: torch.dtype | None,
             backend: str | None) -> Tensor:
    # contiguous, as the fake says: every backend's new output already is (a no-op)
    return _run_gemm(a, a_spec, a_dims, b, b_spec, b_dims, split_sizes, split_tensor, splits_are_offsets,
                     layout, accumulate, out_dtype, backend).contiguous()


@_gemm_op.register_fake
def _(a, a_spec, a_dims, b, b_spec, b_dims, split_sizes, split_tensor, splits_are_offsets, layout, accumulate,
      out_dtype, backend):
    m, n_a = _logical_shape(a, a_spec, a_dims, stacked=False)
    shape_b = _logical_shape(b, b_spec, b_dims, stacked=layout != "wgrad")
    shapes = {  # grouped.problem's table
        "forward": lambda: (m, shape_b[1]),
        "dgrad": lambda: (m, shape_b[2]),
        "wgrad": lambda: (_num_groups(split_sizes, split_tensor), n_a, shape_b[1]),
    }
    if layout not in shapes:
        raise ValueError(f"layout must be one of {tuple(shapes)}, got {layout!r}")
    dtype = out_dtype or (torch.float32 if accumulate else torch.bfloat16)
    return torch.empty(shapes[layout](), dtype=dtype, device=_device(a))


@torch.library.custom_op("grouped::gemm_out", mutates_args=("buffer",))
def _gemm_out_op(a: list[Tensor | None], a_spec: str, a_dims: list[int], b: list[Tensor | None], b_spec: str,
                 b_dims: list[int], split_sizes: list[int] | None, split_tensor: Tensor | None,
                 splits_are_offsets: bool, layout: str, accumulate: bool, out_dtype: torch.dtype | None,
                 backend: str | None, buffer: Tensor) -> None:
    _run_gemm(a, a_spec, a_dims, b, b_spec, b_dims, split_sizes, split_tensor, splits_are_offsets, layout,
              accumulate, out_dtype, backend, out=buffer)


@_gemm_out_op.register_fake
def _(*args):
    return None


def gemm_in_graph(a, b, split_sizes=None, *, layout="forward", out=None, accumulate=False, out_dtype=None,
                  backend=None, offsets=None) -> Tensor:
    """grouped.gemm under torch.compile: one grouped::gemm (or gemm_out) op."""
    args = (*_pack(a, "a"), *_pack(b, "b"), *_pack_splits(split_sizes, offsets), layout, accumulate, out_dtype,
            backend)
    with torch.no_grad():  # as in eager: the result carries no autograd history
        if out is None:
            return _gemm_op(*args)
        _gemm_out_op(*args, out)
    return out


# ---- grouped::gemm_swiglu --------------------------------------------------------------------


def _run_gemm_swiglu(a, a_spec, a_dims, b, b_spec, b_dims, split_sizes, split_tensor, splits_are_offsets, probs,
                     backend, out=None) -> Tensor:
    sizes, offsets = _unpack_splits(split_sizes, split_tensor, splits_are_offsets)
    return run_gemm_swiglu(_unpack(a, a_spec, a_dims), _unpack(b, b_spec, b_dims), sizes, probs, offsets=offsets,
                           out=out, backend=backend)


@torch.library.custom_op("grouped::gemm_swiglu", mutates_args=())
def _gemm_swiglu_op(a: list[Tensor | None], a_spec: str, a_dims: list[int], b: list[Tensor | None], b_spec: str,
                    b_dims: list[int], split_sizes: list[int] | None, split_tensor: Tensor | None,
                    splits_are_offsets: bool, probs: Tensor | None, backend: str | None) -> Tensor:
    return _run_gemm_swiglu(a, a_spec, a_dims, b, b_spec, b_dims, split_sizes, split_tensor, splits_are_offsets,
                            probs, backend).contiguous()


@_gemm_swiglu_op.register_fake
def _(a, a_spec, a_dims, b, b_spec, b_dims, split_sizes, split_tensor, splits_are_offsets, probs, backend):
    m = _logical_shape(a, a_spec, a_dims, stacked=False)[0]
    n = _logical_shape(b, b_spec, b_dims, stacked=True)[1]
    return torch.empty(m, n // 2, dtype=torch.bfloat16, device=_device(a))


@torch.library.custom_op("grouped::gemm_swiglu_out", mutates_args=("buffer",))
def _gemm_swiglu_out_op(a: list[Tensor | None], a_spec: str, a_dims: list[int], b: list[Tensor | None],
                        b_spec: str, b_dims: list[int], split_sizes: list[int] | None, split_tensor: Tensor | None,
                        splits_are_offsets: bool, probs: Tensor | None, backend: str | None,
                        buffer: Tensor) -> None:
    _run_gemm_swiglu(a, a_spec, a_dims, b, b_spec, b_dims, split_sizes, split_tensor, splits_are_offsets, probs,
                     backend, out=buffer)


@_gemm_swiglu_out_op.register_fake
def _(*args):
    return None


def gemm_swiglu_in_graph(a, b, split_sizes, probs=None, *, out=None, backend=None) -> Tensor:
    """grouped.gemm_swiglu under torch.compile: one grouped::gemm_swiglu (or _out) op."""
    args = (*_pack(a, "a"), *_pack(b, "b"), *_pack_splits(split_sizes, None), probs, backend)
    with torch.no_grad():  # forward only, as in eager
        if out is None:
            return _gemm_swiglu_op(*args)
        _gemm_swiglu_out_op(*args, out)
    return out


# ---- grouped::quantize ------------------------------------------------------------------------


@torch.library.custom_op("grouped::quantize", mutates_args=())
def _quantize_op(x: Tensor, fmt: str, axis: int, split_sizes: list[int] | None) -> list[Tensor]:
    q = quantize(x, fmt, axis=axis, split_sizes=split_sizes)
    return [q.data, q.scale] + ([q.global_scale] if q.global_scale is not None else [])


@_quantize_op.register_fake
def _(x, fmt, axis, split_sizes):
    fmt = get_format(fmt)
    block = fmt.block_size
    if axis == -1:  # grouped.quantize's storage table: the blocked dim last
        stored = list(x.shape)
    elif x.dim() == 3:
        stored = [x.shape[0], x.shape[2], x.shape[1]]
    else:
        rows = x.shape[0] if split_sizes is None else sum(ceil_to(m, block) for m in split_sizes)
        stored = [x.shape[1], rows]
    *lead, blocked = stored
    parts = [x.new_empty(*lead, fmt.packed_len(blocked), dtype=fmt.data_dtype),
             x.new_empty(*lead, blocked // block, dtype=fmt.scale_dtype)]
    if fmt.has_global_scale:  # one S per expert / group, or one for the tensor
        members = x.shape[0] if x.dim() == 3 else None if split_sizes is None else len(split_sizes)
        parts.append(x.new_empty(() if members is None else (members,), dtype=torch.float32))
    return parts


def quantize_in_graph(x: Tensor, fmt, *, axis: int = -1, split_sizes=None) -> QuantizedTensor:
    """grouped.quantize under torch.compile: one grouped::quantize op, which checks its arguments
    as grouped.quantize does when it runs. split_sizes: host ints (the padded columnwise shape
    depends on them)."""
    fmt = get_format(fmt)
    axis = _normalize_axis(axis, x.dim())
    sizes = None if split_sizes is None else list(split_sizes)
    with torch.no_grad():  # quantized values carry no autograd history
        data, scale, *global_scale = _quantize_op(x, fmt.name, axis, sizes)
    return QuantizedTensor(data, scale, global_scale[0] if global_scale else None, fmt, axis, x.shape,
                           None if sizes is None else tuple(sizes))


# ---- grouped::splits_to_offsets ---------------------------------------------------------------


@torch.library.custom_op("grouped::splits_to_offsets", mutates_args=())
def _splits_to_offsets_op(split_sizes: Tensor, strides: list[int], include_leading_zero: list[bool],
                          int64: list[bool]) -> list[Tensor]:
    dtypes = [torch.int64 if wide else torch.int32 for wide in int64]
    return splits_to_offsets(split_sizes, strides=strides, include_leading_zero=include_leading_zero, dtypes=dtypes)


@_splits_to_offsets_op.register_fake
def _(split_sizes, strides, include_leading_zero, int64):
    n = split_sizes.shape[0]
    return [split_sizes.new_empty(n + int(zero), dtype=torch.int64 if wide else torch.int32)
            for zero, wide in zip(include_leading_zero, int64)]


def splits_to_offsets_in_graph(split_sizes: Tensor, *, strides, include_leading_zero, dtypes) -> list[Tensor]:
    """grouped.splits_to_offsets under torch.compile, on arguments it has checked (split_sizes a
    tensor): one grouped::splits_to_offsets op, which checks the values when it runs. There is no
    bulk_allocate in a graph: the compiler owns its allocations, and does not keep outputs as dtype
    views of one buffer."""
    return _splits_to_offsets_op(split_sizes, list(strides), list(include_leading_zero),
                                 [d == torch.int64 for d in dtypes])


# ---- grouped::grouped_mm ----------------------------------------------------------------------


def _bf16_gemm(a: Tensor, b: Tensor, offs: Tensor, layout: str, out_dtype=None) -> Tensor:
    """grouped::gemm on bf16 tensors (what grouped_mm's backward runs: ops only, so it traces)."""
    return _gemm_op([a], "tensor", [], [b], "tensor", [], None, offs, True, layout, False, out_dtype, None)


@torch.library.custom_op("grouped::grouped_mm", mutates_args=())
def _grouped_mm_op(mat_a: Tensor, mat_b: Tensor, offs: Tensor, out_dtype: torch.dtype | None) -> Tensor:
    weight, layout = grouped_mm_weight(mat_b)
    return run_gemm(mat_a, weight, offsets=offs, layout=layout, out_dtype=out_dtype).contiguous()


@_grouped_mm_op.register_fake
def _(mat_a, mat_b, offs, out_dtype):
    grouped_mm_weight(mat_b)  # its layout check, while tracing too
    return mat_a.new_empty(mat_a.shape[0], mat_b.shape[2], dtype=out_dtype or torch.bfloat16)


def _grouped_mm_setup(ctx, inputs, output):
    mat_a, mat_b, offs, _ = inputs
    ctx.save_for_backward(mat_a, mat_b, offs)


def _grouped_mm_backward(ctx, grad):
    """dA = dY B^T and dB = A^T dY per expert, through the two other layouts of W (grouped_mm_weight)."""
    mat_a, mat_b, offs = ctx.saved_tensors
    grad = grad.to(torch.bfloat16).contiguous()  # an fp32 out_dtype's gradient: our GEMMs take bf16 operands
    weight, layout = grouped_mm_weight(mat_b)
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _bf16_gemm(grad, weight, offs, "dgrad" if layout == "forward" else "forward")
        if offs.device.type != "cpu":  # rows past offs[-1]: zero gradient (grouped.gemm zeroes them for host offsets)
            past_total = torch.arange(grad_a.shape[0], device=grad_a.device) >= offs[-1]
            grad_a = grad_a.masked_fill(past_total.unsqueeze(1), 0)
    if ctx.needs_input_grad[1]:
        if layout == "forward":  # dW (G, N, K) = dY^T A, handed back as mat_b's (G, K, N) view
            grad_b = _bf16_gemm(grad, mat_a, offs, "wgrad", mat_b.dtype).transpose(1, 2)
        else:
            grad_b = _bf16_gemm(mat_a, grad, offs, "wgrad", mat_b.dtype)
    return grad_a, grad_b, None, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)
