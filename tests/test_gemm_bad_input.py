"""grouped.gemm refuses bad input with a ValueError that names the argument and
what was expected, before anything is written: a caller buffer passed along is
left byte-for-byte unchanged. Empty groups are not errors (last class)."""

import pytest
import torch
from gemm_operands import layout_operands

import grouped
from grouped import GroupedTensor

G, N, K = 4, 32, 64
SIZES = [10, 0, 25, 13]  # total 48
M = 56  # rows past the total exist


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    return t.view(_INT_VIEW[t.element_size()]).clone()


def _rand(gen, *shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=gen).to(dtype)


def _poisoned(shape, dtype=torch.bfloat16):
    out = torch.full(shape, float("nan"), dtype=dtype)
    out.view(-1)[::3] = -1.5
    return out


def _out_shape(layout, m=M, n=N, k=K, g=G):
    return {"forward": (m, n), "dgrad": (m, k), "wgrad": (g, n, k)}[layout]


def _bf16_operands(gen, layout, m=M, n=N, k=K, g=G):
    x, dy, w = _rand(gen, m, k), _rand(gen, m, n), _rand(gen, g, n, k)
    return {"forward": (x, w), "dgrad": (dy, w), "wgrad": (dy, x)}[layout]


def _q_operands(gen, layout, fmt, sizes=SIZES, m=M, n=N, k=K, g=G):
    x, dy, w = _rand(gen, m, k, dtype=torch.float32), _rand(gen, m, n, dtype=torch.float32), _rand(
        gen, g, n, k, dtype=torch.float32
    )
    return layout_operands(layout, fmt, x, dy, w, sizes)


def _refuses(match, a, b, split_sizes=SIZES, *, out=None, keep=None, **kw):
    """gemm and explain raise ValueError(match); ``keep`` (default: out) is left unchanged."""
    keep = out if keep is None else keep
    before = None if keep is None else _bits(keep)
    with pytest.raises(ValueError, match=match) as info:
        grouped.gemm(a, b, split_sizes, out=out, **kw)
    if keep is not None:
        assert torch.equal(_bits(keep), before), "the caller buffer was written before the error"
    with pytest.raises(ValueError, match=match):
        grouped.explain(a, b, split_sizes, out=out, **kw)
    return info.value


# ----------------------------------------------------------------------------- shapes


def test_forward_k_mismatch(gen):
    x, w = _rand(gen, M, K), _rand(gen, G, N, K + 32)
    _refuses(r"forward: a has 64 columns, b's K is 96", x, w, out=_poisoned((M, N)))


def test_forward_k_mismatch_quantized(gen):
    x = grouped.quantize(_rand(gen, M, K, dtype=torch.float32), "mxfp8")
    w = grouped.quantize(_rand(gen, G, N, 96, dtype=torch.float32), "mxfp8")
    _refuses(r"a has 64 columns, b's K is 96", x, w, out=_poisoned((M, N)))


def test_dgrad_n_mismatch(gen):
    dy, w = _rand(gen, M, N + 32), _rand(gen, G, N, K)
    _refuses(r"dgrad: a has 64 columns, b's N is 32", dy, w, layout="dgrad", out=_poisoned((M, K)))


def test_wgrad_row_mismatch(gen):
    dy, x = _rand(gen, M, N), _rand(gen, M + 1, K)
    _refuses(r"wgrad: b must be 2-D \(56, K\)", dy, x, layout="wgrad", out=_poisoned((G, N, K), torch.float32))


def test_wgrad_row_mismatch_quantized(gen):
    dy = grouped.quantize(_rand(gen, M, N, dtype=torch.float32), "nvfp4", axis=0, split_sizes=SIZES)
    x = grouped.quantize(_rand(gen, M + 16, K, dtype=torch.float32), "nvfp4", axis=0, split_sizes=SIZES)
    _refuses(r"wgrad: b must be 2-D", dy, x, layout="wgrad", out=_poisoned((G, N, K), torch.float32))


def test_a_not_2d(gen):
    _refuses(r"a must be 2-D", _rand(gen, 2, M, K), _rand(gen, G, N, K))


def test_weight_not_3d(gen):
    _refuses(r"b must be the 3-D expert weight \(G, N, K\)", _rand(gen, M, K), _rand(gen, N, K),
             out=_poisoned((M, N)))


def test_wgrad_out_groups_disagree_with_split_sizes(gen):
    dy, x = _bf16_operands(gen, "wgrad")
    out = _poisoned((G + 1, N, K), torch.float32)
    _refuses(r"split_sizes has 4 entries, expected one per expert \(5\)", dy, x, layout="wgrad", out=out)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("which", ["a", "b"])
def test_operand_dtype(gen, dtype, which):
    x, w = _rand(gen, M, K), _rand(gen, G, N, K)
    if which == "a":
        x = x.to(dtype)
    else:
        w = w.to(dtype)
    _refuses(rf"{which} must be a bf16 tensor.*got a {dtype} tensor", x, w, out=_poisoned((M, N)))


def test_operand_not_a_tensor(gen):
    w = _rand(gen, G, N, K)
    _refuses(r"a must be a bf16 torch.Tensor, a QuantizedTensor or a GroupedTensor, got list",
             [[1.0] * K] * M, w, out=_poisoned((M, N)))


@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_out_with_wrong_dtype(gen, layout, out_dtype):
    a, b = _bf16_operands(gen, layout)
    out = _poisoned(_out_shape(layout), out_dtype)
    _refuses(r"out must have dtype torch.bfloat16 .*got " + str(out_dtype), a, b, layout=layout, out=out)


def test_out_dtype_disagrees_with_out(gen):
    x, w = _bf16_operands(gen, "forward")
    _refuses(r"out must have dtype torch.float32 .*got torch.bfloat16", x, w, out=_poisoned((M, N)),
             out_dtype=torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float64, torch.int32, "bf16"])
def test_out_dtype_argument(gen, out_dtype):
    x, w = _bf16_operands(gen, "forward")
    _refuses(r"out_dtype must be torch.bfloat16 or torch.float32", x, w, out_dtype=out_dtype,
             out=_poisoned((M, N)), keep=None)


# ----------------------------------------------------------------------------- formats and axes


@pytest.mark.parametrize("layout", ["forward", "dgrad"])
def test_mixed_quantized_formats(gen, layout):
    a, _ = _q_operands(gen, layout, "mxfp8")
    _, b = _q_operands(gen, layout, "nvfp4")
    _refuses(r"a and b must have the same format .*, got mxfp8 and nvfp4", a, b, layout=layout,
             out=_poisoned(_out_shape(layout)))


def test_mixed_wgrad_formats(gen):
    a, _ = _q_operands(gen, "wgrad", "nvfp4")
    _, b = _q_operands(gen, "wgrad", "mxfp8")
    _refuses(r"same format .*, got nvfp4 and mxfp8", a, b, layout="wgrad",
             out=_poisoned((G, N, K), torch.float32))


def test_bf16_with_mxfp8(gen):
    x = _rand(gen, M, K)
    _, w = _q_operands(gen, "forward", "mxfp8")
    _refuses(r"same format \(or, forward, a bf16 activation with an nvfp4 weight\), got bf16 and mxfp8", x, w,
             out=_poisoned((M, N)))


def test_bf16_with_nvfp4_only_forward(gen):
    _, w = _q_operands(gen, "dgrad", "nvfp4")
    dy = _rand(gen, M, N)
    _refuses(r"same format .* got bf16 and nvfp4", dy, w, layout="dgrad", out=_poisoned((M, K)))


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_forward_a_quantized_columnwise(gen, fmt):
    x = _rand(gen, M, K, dtype=torch.float32)
    a = grouped.quantize(x, fmt, axis=0, split_sizes=SIZES)
    _, w = _q_operands(gen, "forward", fmt)
    _refuses(r"a must be quantized along the forward contraction dim: rowwise \(axis -1\); got axis 0",
             a, w, out=_poisoned((M, N)))


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_forward_w_quantized_along_n(gen, fmt):
    a, _ = _q_operands(gen, "forward", fmt)
    w = grouped.quantize(_rand(gen, G, N, K, dtype=torch.float32), fmt, axis=1)
    _refuses(r"b must be quantized along the forward contraction dim.*got axis 1", a, w, out=_poisoned((M, N)))


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_dgrad_w_quantized_rowwise(gen, fmt):
    a, _ = _q_operands(gen, "dgrad", fmt)
    w = grouped.quantize(_rand(gen, G, N, K, dtype=torch.float32), fmt)
    _refuses(r"b must be quantized along the dgrad contraction dim: axis 1 \(blocks along N\); got axis -1",
             a, w, layout="dgrad", out=_poisoned((M, K)))


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_wgrad_operand_quantized_rowwise(gen, fmt):
    _, b = _q_operands(gen, "wgrad", fmt)
    a = grouped.quantize(_rand(gen, M, N, dtype=torch.float32), fmt)
    _refuses(r"a must be quantized along the wgrad contraction dim: axis 0 \(columnwise\)", a, b,
             layout="wgrad", out=_poisoned((G, N, K), torch.float32))


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("which", ["a", "b"])
def test_wgrad_columnwise_without_split_sizes(gen, fmt, which):
    m = 64  # a multiple of both block sizes, so quantize accepts it without split_sizes
    sizes = [16, 0, 32, 16]
    dy, x = _rand(gen, m, N, dtype=torch.float32), _rand(gen, m, K, dtype=torch.float32)
    ops = {
        "a": grouped.quantize(dy, fmt, axis=0, split_sizes=sizes),
        "b": grouped.quantize(x, fmt, axis=0, split_sizes=sizes),
    }
    ops[which] = grouped.quantize(dy if which == "a" else x, fmt, axis=0)
    _refuses(rf"{which}: wgrad needs blocks that restart at every expert boundary.*split_sizes",
             ops["a"], ops["b"], sizes, layout="wgrad", out=_poisoned((G, N, K), torch.float32))


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_wgrad_columnwise_with_other_split_sizes(gen, fmt):
    a, b = _q_operands(gen, "wgrad", fmt, sizes=SIZES)
    other = [11, 0, 24, 13]
    _refuses(r"a was quantized with split_sizes \[10, 0, 25, 13\], the call has \[11, 0, 24, 13\]",
             a, b, other, layout="wgrad", out=_poisoned((G, N, K), torch.float32))


def test_rowwise_nvfp4_grouped_otherwise(gen):
    """NVFP4's per-group S is read by the call's experts: the token operand's grouping must match."""
    x = _rand(gen, M, K, dtype=torch.float32)
    _, w = _q_operands(gen, "forward", "nvfp4")
    a = grouped.quantize(x, "nvfp4", split_sizes=SIZES)
    _refuses(r"a was quantized with split_sizes \[10, 0, 25, 13\], the call has \[11, 0, 24, 13\]",
             a, w, [11, 0, 24, 13], out=_poisoned((M, N)))
    a3 = grouped.quantize(x, "nvfp4", split_sizes=[10, 25, 13])
    _refuses(r"a was quantized with split_sizes \[10, 25, 13\]: 3 groups, the call has 4 experts",
             a3, w, out=_poisoned((M, N)))


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_wgrad_operands_grouped_otherwise_with_gpu_like_splits(gen, fmt):
    """Split sizes that live on the device are not read on the host; the operands' own groupings
    still must agree with each other and with the expert count."""
    a, _ = _q_operands(gen, "wgrad", fmt, sizes=SIZES)
    _, b = _q_operands(gen, "wgrad", fmt, sizes=[11, 0, 24, 13])
    ends = grouped.Splits(G, torch.device("cpu"), ends=torch.tensor(SIZES).cumsum(0).to(torch.int32))
    _refuses(r"wgrad: a and b must be grouped alike", a, b, ends, layout="wgrad",
             out=_poisoned((G, N, K), torch.float32))
    three = grouped.Splits(3, torch.device("cpu"), ends=torch.tensor([10, 35, 48], dtype=torch.int32))
    _refuses(r"a was quantized with split_sizes \[10, 0, 25, 13\]: 4 groups, the call has 3 experts",
             a, a, three, layout="wgrad", out=_poisoned((3, N, N), torch.float32))


def test_device_split_sizes_past_the_rows_raise_when_read(gen):
    x, w = _bf16_operands(gen, "forward")
    past = grouped.Splits(G, torch.device("cpu"), ends=torch.tensor([10, 10, 35, M + 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=rf"split_sizes \(on the GPU\) sum to {M + 1}, past the {M} rows"):
        grouped.gemm(x, w, past, backend="reference")


def test_grouped_tensor_without_the_needed_storage(gen):
    fmt = "mxfp8"
    dy, x = _rand(gen, M, N), _rand(gen, M, K)
    ga = GroupedTensor.from_tensor(dy, SIZES, fmt)  # rowwise only
    gb = GroupedTensor.from_tensor(x, SIZES, fmt, columnwise=True)
    _refuses(r"a must have columnwise storage for wgrad", ga, gb, layout="wgrad",
             out=_poisoned((G, N, K), torch.float32))
    w = _rand(gen, G, N, K)
    gw = GroupedTensor([(N, K)] * G, fmt).quantize_(list(w))  # rowwise only
    a, _ = _q_operands(gen, "dgrad", fmt)
    _refuses(r"b must have columnwise storage for dgrad", a, gw, layout="dgrad", out=_poisoned((M, K)))


def test_grouped_tensor_members_disagree_with_split_sizes(gen):
    x = _rand(gen, M, K)
    ga = GroupedTensor.from_tensor(x, SIZES, "nvfp4")
    _, w = _q_operands(gen, "forward", "nvfp4")
    _refuses(r"a: the GroupedTensor's member sizes \[10, 0, 25, 13\], the call has \[12, 0, 23, 13\]",
             ga, w, [12, 0, 23, 13])


def test_bf16_grouped_tensor_is_refused(gen):
    x = _rand(gen, M, K)
    ga = GroupedTensor.from_tensor(x, SIZES, "bf16")
    _refuses(r"a: a bf16 operand must be a plain tensor", ga, _rand(gen, G, N, K))


# ----------------------------------------------------------------------------- caller buffers


@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
def test_out_misaligned_data_ptr(gen, layout):
    a, b = _bf16_operands(gen, layout)
    shape = _out_shape(layout)
    dtype = torch.float32 if layout == "wgrad" else torch.bfloat16
    numel = 1
    for s in shape:
        numel *= s
    base = _poisoned((numel + 1,), dtype)
    out = base[1:].view(shape)
    assert out.data_ptr() % 16
    _refuses(r"out rows must start 16-byte aligned", a, b, layout=layout, out=out, keep=base)


@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
def test_out_row_stride_not_aligned(gen, layout):
    a, b = _bf16_operands(gen, layout)
    shape = _out_shape(layout)
    dtype = torch.float32 if layout == "wgrad" else torch.bfloat16
    base = _poisoned((*shape[:-1], shape[-1] + 1), dtype)
    out = base[..., : shape[-1]]
    _refuses(r"out rows must start 16-byte aligned.*row strides in bytes", a, b, layout=layout, out=out, keep=base)


def test_out_transposed_view(gen):
    x, w = _bf16_operands(gen, "forward")
    base = _poisoned((N, M))
    out = base.T
    _refuses(r"out must have unit stride along its last dim", x, w, out=out, keep=base)


def test_out_row_stride_smaller_than_row(gen):
    x, w = _bf16_operands(gen, "forward")
    base = _poisoned((M * N,))
    out = base.as_strided((M, N), (8, 1))  # aligned, but rows overlap each other
    _refuses(r"out strides .* make its own elements overlap", x, w, out=out, keep=base)


def test_out_expanded(gen):
    x, w = _bf16_operands(gen, "forward")
    base = _poisoned((1, N))
    _refuses(r"out strides .* make its own elements overlap", x, w, out=base.expand(M, N), keep=base)


def test_wgrad_out_with_overlapping_experts(gen):
    dy, x = _bf16_operands(gen, "wgrad")
    base = torch.zeros((G + N - 1) * K)
    out = base.as_strided((G, N, K), (K, K, 1))  # expert g+1 starts one row after expert g
    _refuses(r"out .*overlap", dy, x, layout="wgrad", out=out, keep=base, out_dtype=torch.float32)


def test_out_overlaps_a(gen):
    x = _rand(gen, M, N)  # N == out's row length: out can be x itself
    w = _rand(gen, G, N, N)
    _refuses(r"out overlaps an input tensor", x, w, out=x)
    _refuses(r"out overlaps an input tensor", x, w, out=x[:, :].view(M, N))


def test_out_overlaps_weight_storage(gen):
    x = _rand(gen, M, K)
    w = _rand(gen, 8, N, K)  # G*N*K >= M*N
    out = w.view(-1)[16 : 16 + M * N].view(M, N)
    _refuses(r"out overlaps an input tensor", x, w, [10, 0, 25, 13, 0, 0, 0, 0], out=out, keep=w)


def test_wgrad_out_overlaps_b(gen):
    dy = _rand(gen, M, N)
    x_storage = torch.randn(G * N * K, generator=gen)  # fp32 storage shared by b and out
    x = x_storage.view(torch.bfloat16)[: M * K].view(M, K)
    out = x_storage.view(G, N, K)
    _refuses(r"out overlaps an input tensor", dy, x, layout="wgrad", out=out, out_dtype=torch.float32)


def test_out_overlaps_quantized_data(gen):
    a, w = _q_operands(gen, "forward", "mxfp8")  # a.data: (M, 64) one byte each
    out = a.data.view(torch.uint8).view(torch.bfloat16).view(M, N)  # the same M*64 bytes
    _refuses(r"out overlaps an input tensor", a, w, out=out)


def test_out_requires_grad(gen):
    x, w = _bf16_operands(gen, "forward")
    out = torch.zeros(M, N, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        out.fill_(3.0)
    _refuses(r"out must not require grad", x, w, out=out, keep=out.detach())


@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
def test_out_wrong_shape(gen, layout):
    a, b = _bf16_operands(gen, layout)
    shape = list(_out_shape(layout))
    shape[-1] += 32
    dtype = torch.float32 if layout == "wgrad" else torch.bfloat16
    want = r"out must have shape \(%s\)" % ", ".join(str(s) for s in _out_shape(layout))
    _refuses(want, a, b, layout=layout, out=_poisoned(tuple(shape), dtype))


def test_out_fewer_rows_than_tokens(gen):
    x, w = _bf16_operands(gen, "forward")
    _refuses(r"out must have shape \(56, 32\), got \(48, 32\)", x, w, out=_poisoned((sum(SIZES), N)))


def test_out_not_a_tensor(gen):
    x, w = _bf16_operands(gen, "forward")
    with pytest.raises(ValueError, match=r"out must be a torch.Tensor, got list"):
        grouped.gemm(x, w, SIZES, out=[[0.0] * N] * M)


@pytest.mark.gpu
def test_out_on_another_device(gen):
    x, w = _bf16_operands(gen, "forward")
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    before = out.cpu().view(torch.int16).clone()
    with pytest.raises(ValueError, match=r"out must be on cpu"):
        grouped.gemm(x, w, SIZES, out=out)
    assert torch.equal(out.cpu().view(torch.int16), before)


# ----------------------------------------------------------------------------- split sizes


@pytest.mark.parametrize("layout", ["forward", "dgrad"])
def test_split_sizes_wrong_length(gen, layout):
    a, b = _bf16_operands(gen, layout)
    _refuses(r"split_sizes has 3 entries, expected one per expert \(4\)", a, b, [10, 0, 25], layout=layout,
             out=_poisoned(_out_shape(layout)))
    _refuses(r"split_sizes has 5 entries, expected one per expert \(4\)", a, b, [10, 0, 25, 1, 1],
             layout=layout, out=_poisoned(_out_shape(layout)))


@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
def test_split_sizes_negative(gen, layout):
    a, b = _bf16_operands(gen, layout)
    dtype = torch.float32 if layout == "wgrad" else torch.bfloat16
    for sizes in ([10, -1, 25, 13], torch.tensor([10, -1, 25, 13], dtype=torch.int32)):
        _refuses(r"split_sizes must be non-negative, got \[10, -1, 25, 13\]", a, b, sizes, layout=layout,
                 out=_poisoned(_out_shape(layout), dtype))


@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
def test_split_sizes_past_the_rows(gen, layout):
    a, b = _bf16_operands(gen, layout)
    dtype = torch.float32 if layout == "wgrad" else torch.bfloat16
    _refuses(r"split_sizes sum to 57, past the 56 rows", a, b, [10, 0, 25, 22], layout=layout,
             out=_poisoned(_out_shape(layout), dtype))


@pytest.mark.parametrize(
    "sizes, match",
    [
        ([10.0, 0.0, 25.0, 13.0], r"split_sizes must be a list of ints or a 1-D int tensor"),
        ([10, 0, 25.5, 13], r"split_sizes must be a list of ints"),
        ([True, False, True, True], r"split_sizes must be a list of ints"),
        (torch.tensor([10.0, 0.0, 25.0, 13.0]), r"split_sizes must be a 1-D int32/int64 tensor.*float32"),
        (torch.tensor([[10, 0], [25, 13]]), r"split_sizes must be a 1-D int32/int64 tensor.*shape \(2, 2\)"),
        ([[10, 0], [25, 13]], r"split_sizes must be a list of ints"),
        (torch.tensor(48), r"split_sizes must be a 1-D int32/int64 tensor"),
        (torch.tensor([10, 0, 25, 13], dtype=torch.int16), r"split_sizes must be a 1-D int32/int64 tensor.*int16"),
        (48, r"split_sizes must be a list of ints"),
        ("10,0,25,13", r"split_sizes must be a list of ints"),
    ],
    ids=["float_list", "one_float", "bools", "float_tensor", "2d_tensor", "2d_list", "0d_tensor", "int16",
         "int", "str"],
)
def test_split_sizes_bad_type(gen, sizes, match):
    x, w = _bf16_operands(gen, "forward")
    _refuses(match, x, w, sizes, out=_poisoned((M, N)))


def test_zero_experts(gen):
    x, w = _rand(gen, M, K), _rand(gen, 0, N, K)
    _refuses(r"at least one expert", x, w, [], out=_poisoned((M, N)))
    dy, xx = _bf16_operands(gen, "wgrad")
    _refuses(r"at least one expert", dy, xx, [], layout="wgrad")
    _refuses(r"at least one expert", x, w, None, offsets=torch.tensor([], dtype=torch.int64))


def test_split_sizes_and_offsets_both_or_neither(gen):
    x, w = _bf16_operands(gen, "forward")
    ends = torch.tensor(SIZES).cumsum(0)
    _refuses(r"give exactly one of split_sizes and offsets", x, w, SIZES, offsets=ends, out=_poisoned((M, N)))
    _refuses(r"give exactly one of split_sizes and offsets", x, w, None, out=_poisoned((M, N)))


def test_offsets_decreasing(gen):
    x, w = _bf16_operands(gen, "forward")
    _refuses(r"offsets must be non-decreasing end offsets, got \[10, 10, 5, 48\]", x, w, None,
             offsets=torch.tensor([10, 10, 5, 48]), out=_poisoned((M, N)))


def test_offsets_negative_and_bad_type(gen):
    x, w = _bf16_operands(gen, "forward")
    _refuses(r"offsets must be non-negative", x, w, None, offsets=torch.tensor([-1, 10, 20, 30]),
             out=_poisoned((M, N)))
    _refuses(r"offsets must be a 1-D int32/int64 tensor", x, w, None, offsets=torch.tensor([1.0, 2.0, 3.0, 4.0]),
             out=_poisoned((M, N)))


def test_offsets_errors_name_offsets(gen):
    x, w = _bf16_operands(gen, "forward")
    out = _poisoned((M, N))
    _refuses(r"offsets", x, w, None, offsets=torch.tensor([10, 10, 35, M + 1]), out=out)
    _refuses(r"offsets", x, w, None, offsets=torch.tensor([10, 10, 35]), out=out)


def test_offsets_past_rows_and_wrong_length_messages(gen):
    x, w = _bf16_operands(gen, "forward")
    _refuses(r"offsets \(as split sizes\) sum to 57, past the 56 rows", x, w, None,
             offsets=torch.tensor([10, 10, 35, 57]), out=_poisoned((M, N)))
    _refuses(r"offsets \(as split sizes\) has 3 entries, expected one per expert \(4\)", x, w, None,
             offsets=torch.tensor([10, 10, 35]), out=_poisoned((M, N)))


# ----------------------------------------------------------------------------- accumulate, layout


def test_accumulate_for_forward_and_dgrad(gen):
    for layout in ("forward", "dgrad"):
        a, b = _bf16_operands(gen, layout)
        out = _poisoned(_out_shape(layout), torch.float32)
        _refuses(rf"accumulate=True is for wgrad.*not {layout}", a, b, layout=layout, out=out, accumulate=True)


def test_accumulate_without_out(gen):
    dy, x = _bf16_operands(gen, "wgrad")
    _refuses(r"accumulate=True needs out", dy, x, layout="wgrad", accumulate=True)


def test_accumulate_with_out_dtype_bf16(gen):
    dy, x = _bf16_operands(gen, "wgrad")
    out = _poisoned((G, N, K), torch.float32)
    _refuses(r"accumulate=True adds into an fp32 buffer; out_dtype torch.bfloat16", dy, x, layout="wgrad",
             out=out, accumulate=True, out_dtype=torch.bfloat16)


def test_accumulate_into_bf16_main_grad(gen):
    dy, x = _bf16_operands(gen, "wgrad")
    out = _poisoned((G, N, K), torch.bfloat16)
    _refuses(r"out must have dtype torch.float32 .*got torch.bfloat16", dy, x, layout="wgrad", out=out,
             accumulate=True)


@pytest.mark.parametrize("layout", ["fwd", "Forward", "bwd", "", None])
def test_unknown_layout(gen, layout):
    x, w = _bf16_operands(gen, "forward")
    _refuses(r"layout must be one of \('forward', 'dgrad', 'wgrad'\)", x, w, layout=layout,
             out=_poisoned((M, N)))


# ----------------------------------------------------------------------------- block alignment, strides


def test_quantize_refuses_k_not_multiple_of_block(gen):
    x = _rand(gen, M, 48, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"48 elements, not a multiple of the mxfp8 block size 32"):
        grouped.quantize(x, "mxfp8")
    w = _rand(gen, G, N, 48, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"not a multiple of the mxfp8 block size 32"):
        grouped.quantize(w, "mxfp8")
    with pytest.raises(ValueError, match=r"not a multiple of the nvfp4 block size 16"):
        grouped.quantize(_rand(gen, M, 40, dtype=torch.float32), "nvfp4")


def test_bf16_gemm_with_k_48_works(gen):
    k = 48
    x, w = _rand(gen, M, k), _rand(gen, G, N, k)
    out = grouped.gemm(x, w, SIZES, out_dtype=torch.float32)
    start = 0
    for g, m in enumerate(SIZES):
        ref = x[start : start + m].double() @ w[g].double().T
        got = out[start : start + m].double()
        assert (got - ref).norm() <= 1e-5 * max(ref.norm().item(), 1e-30) or m == 0
        start += m


def test_noncontiguous_bf16_weight(gen):
    x = _rand(gen, M, K)
    w = _rand(gen, G, N, K).transpose(1, 2).contiguous().transpose(1, 2)
    assert w.shape == (G, N, K) and not w.is_contiguous()
    _refuses(r"b: the expert weight must be contiguous", x, w, out=_poisoned((M, N)))
    dy = _rand(gen, M, N)
    _refuses(r"b: the expert weight must be contiguous", dy, w, layout="dgrad", out=_poisoned((M, K)))


def test_token_operand_without_unit_last_stride(gen):
    x = _rand(gen, K, M).T  # (M, K), column-major
    w = _rand(gen, G, N, K)
    _refuses(r"a must have unit stride along its last dim", x, w, out=_poisoned((M, N)))
    dy = _rand(gen, N, M).T
    xx = _rand(gen, M, K)
    _refuses(r"a must have unit stride along its last dim", dy, xx, layout="wgrad",
             out=_poisoned((G, N, K), torch.float32))
    _refuses(r"b must have unit stride along its last dim", _rand(gen, M, N), x, layout="wgrad",
             out=_poisoned((G, N, K), torch.float32))


# ----------------------------------------------------------------------------- environment


def test_unknown_backend_env_value(monkeypatch, gen):
    monkeypatch.setenv("GROUPED_BACKEND", "foo")
    x, w = _bf16_operands(gen, "forward")
    _refuses(r"GROUPED_BACKEND='foo' is not allowed; use one of auto, reference, cublas, torch, cute, cudnn",
             x, w, out=_poisoned((M, N)))


def test_strict_refusal_leaves_out_unchanged(monkeypatch, gen):
    monkeypatch.setenv("GROUPED_BACKEND", "cublas")
    monkeypatch.setenv("GROUPED_STRICT", "1")
    x, w = _bf16_operands(gen, "forward")
    _refuses(r"backend 'cublas' cannot serve this call.*CUDA", x, w, out=_poisoned((M, N)))


def test_unknown_backend_argument_leaves_out_unchanged(gen):
    x, w = _bf16_operands(gen, "forward")
    _refuses(r"backend must be one of", x, w, out=_poisoned((M, N)), backend="cutlass")


# ----------------------------------------------------------------------------- empty groups are not errors


@pytest.mark.parametrize("fmt", ["bf16", "mxfp8", "nvfp4"])
@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
@pytest.mark.parametrize("sizes", [[0, 0, 0, 0], [0, 48, 0, 0], [0, 0, 0, 1]], ids=["all", "three", "tail"])
def test_empty_groups_give_correct_results(gen, fmt, layout, sizes):
    if fmt == "bf16":
        a, b = _bf16_operands(gen, layout)
    else:
        a, b = _q_operands(gen, layout, fmt, sizes=sizes)
    shape = _out_shape(layout)
    out = _poisoned(shape, torch.float32)
    before = _bits(out)
    grouped.gemm(a, b, sizes, layout=layout, out=out)
    A = a.double() if isinstance(a, torch.Tensor) else a.dequantize().double()
    B = b.double() if isinstance(b, torch.Tensor) else b.dequantize().double()
    total, start = sum(sizes), 0
    for g, m in enumerate(sizes):
        rows = slice(start, start + m)
        start += m
        if layout == "wgrad":
            ref = A[rows].T @ B[rows]
            got = out[g].double()
            if m == 0:
                assert torch.equal(out[g], torch.zeros_like(out[g])), f"expert {g}: dW must be 0"
        else:
            ref = A[rows] @ (B[g].T if layout == "forward" else B[g])
            got = out[rows].double()
        tol = 1e-5 if fmt == "bf16" else 1e-4
        assert (got - ref).norm() <= tol * ref.norm()
    if layout != "wgrad":
        assert torch.equal(_bits(out)[total:], before[total:])
    # Without a caller buffer too; all-empty wgrad is all zeros.
    own = grouped.gemm(a, b, sizes, layout=layout, out_dtype=torch.float32)
    if layout == "wgrad":
        assert torch.equal(own, out)
        if total == 0:
            assert torch.equal(own, torch.zeros_like(own))
    else:
        assert torch.equal(own[:total], out[:total])


@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
def test_zero_token_rows(gen, layout):
    """M = 0: every expert empty, an empty output (wgrad: zeros)."""
    a, b = _bf16_operands(gen, layout, m=0)
    out = grouped.gemm(a, b, [0, 0, 0, 0], layout=layout, out_dtype=torch.float32)
    assert tuple(out.shape) == _out_shape(layout, m=0)
    if layout == "wgrad":
        assert torch.equal(out, torch.zeros_like(out))
