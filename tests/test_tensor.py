"""GroupedTensor: buffer layout, aliasing views, in-place quantize_ and the noop flag."""

import pytest
import torch

import grouped
from grouped import GroupedTensor

FORMATS = ["bf16", "mxfp8", "nvfp4"]
QUANTIZED = ["mxfp8", "nvfp4"]


def _tokens(gen, rows, k):
    # Per-row magnitudes over many binades, so block scales differ.
    scale = torch.exp2(torch.randint(-20, 20, (rows, 1), generator=gen).float())
    return torch.randn(rows, k, generator=gen) * scale


def _ptr_in(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    if view.numel() == 0:  # an empty member's view owns no bytes
        return True
    start = buffer.data_ptr()
    return start <= view.data_ptr() < start + buffer.numel() * buffer.element_size()


@pytest.mark.parametrize("fmt", FORMATS)
def test_split_views_alias_buffers_and_are_aligned(fmt, gen):
    sizes = [5, 0, 33, 1, 31]
    x = _tokens(gen, sum(sizes) + 3, 64)
    kw = {"columnwise": True} if fmt != "bf16" else {}
    g = GroupedTensor.from_tensor(x, sizes, fmt, **kw)
    if fmt == "bf16":
        views = g.split()
        for v, xi in zip(views, torch.split(x[: sum(sizes)], sizes)):
            assert _ptr_in(v, g.data) and (v.numel() == 0 or v.data_ptr() % 16 == 0)
            assert torch.equal(v, xi)
        return
    for columnwise, data, scale in ((False, g.data, g.scale), (True, g.columnwise_data, g.columnwise_scale)):
        for v in g.split(columnwise=columnwise):
            assert _ptr_in(v.data, data) and _ptr_in(v.scale, scale)
            assert v.data.numel() == 0 or v.data.data_ptr() % 16 == 0
            assert v.scale.numel() == 0 or v.scale.data_ptr() % 16 == 0
    # A write through the buffer shows in the view: the views are not copies.
    first = g.split()[2]
    g.data.fill_(0)
    assert int(first.data.view(torch.uint8).abs().sum()) == 0


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_members_match_grouped_quantize(fmt, gen):
    sizes = [17, 0, 64, 3]
    x = _tokens(gen, sum(sizes), 96)
    g = GroupedTensor.from_tensor(x, sizes, fmt, columnwise=True)
    for i, xi in enumerate(torch.split(x, sizes)):
        row = grouped.quantize(xi, fmt)
        col = grouped.quantize(xi, fmt, axis=0, split_sizes=[xi.shape[0]])
        for view, ref in ((g.split()[i], row), (g.split(columnwise=True)[i], col)):
            assert torch.equal(view.data.view(torch.uint8), ref.data.view(torch.uint8))
            assert torch.equal(view.scale.view(torch.uint8), ref.scale.view(torch.uint8))
            assert torch.equal(view.dequantize(), ref.dequantize())
        if fmt == "nvfp4":
            assert torch.equal(g.global_scale[i], row.global_scale)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_in_place_and_noop_flag(fmt, gen):
    shapes = [(64, 128)] * 4  # an expert weight stack
    kw = {"columnwise": True} if fmt != "bf16" else {}
    g = GroupedTensor(shapes, fmt, **kw)
    buffers = [b for b in (g.data, g.scale, g.columnwise_data, g.columnwise_scale, g.global_scale) if b is not None]
    pointers = [b.data_ptr() for b in buffers]
    w1 = [_tokens(gen, 64, 128) for _ in shapes]
    g.quantize_(w1)
    first = [b.clone() for b in buffers]
    w2 = [_tokens(gen, 64, 128) for _ in shapes]
    g.quantize_(w2, noop_flag=torch.ones((), dtype=torch.int32))
    assert all(torch.equal(b, f) for b, f in zip(buffers, first)), "noop flag set: nothing may change"
    g.quantize_(w2, noop_flag=torch.zeros(1, dtype=torch.int32))
    assert [b.data_ptr() for b in buffers] == pointers, "quantize_ must write in place"
    assert not torch.equal(g.data, first[0])
    tol = {"bf16": 1e-2, "mxfp8": 0.07, "nvfp4": 0.2}[fmt]
    for got, ref in zip(g.dequantize(), w2):
        assert ((got - ref).norm() / ref.norm()).item() < tol


def test_bad_input():
    with pytest.raises(ValueError, match="last dim"):
        GroupedTensor([(4, 64), (4, 32)], "mxfp8")
    with pytest.raises(ValueError, match="block size"):
        GroupedTensor([(4, 48)], "mxfp8")
    with pytest.raises(ValueError, match="columnwise"):
        GroupedTensor([(4, 64)], "bf16", columnwise=True)
    with pytest.raises(ValueError, match="at least one member"):
        GroupedTensor([], "mxfp8")
    g = GroupedTensor([(4, 64), (2, 64)], "mxfp8")
    with pytest.raises(ValueError, match=r"tensors\[1\] must have shape \(2, 64\)"):
        g.quantize_([torch.randn(4, 64), torch.randn(3, 64)])
    with pytest.raises(ValueError, match="expected 2 tensors"):
        g.quantize_([torch.randn(4, 64)])
    with pytest.raises(ValueError, match="no columnwise"):
        g.split(columnwise=True)
    with pytest.raises(ValueError, match="split_sizes"):
        GroupedTensor.from_tensor(torch.randn(8, 64), [4, -1], "mxfp8")
    with pytest.raises(ValueError, match="past the 8 rows"):
        GroupedTensor.from_tensor(torch.randn(8, 64), [4, 5], "mxfp8")
