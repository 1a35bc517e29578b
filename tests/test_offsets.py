"""Tests for grouped.offsets.splits_to_offsets (CPU)."""

import itertools

import pytest
import torch

from grouped.offsets import splits_to_offsets

I32, I64 = torch.int32, torch.int64
INT32_MAX = 2**31 - 1


def _random_sizes(gen, n, dtype, high=300) -> torch.Tensor:
    """Random split sizes from the test's own generator (conftest's `gen` fixture)."""
    return torch.randint(0, high, (n,), generator=gen, dtype=torch.int64).to(dtype)


def _reference(sizes, stride, leading_zero) -> list:
    """Independent reference: plain Python ints."""
    out, acc = ([0] if leading_zero else []), 0
    for m in sizes:
        acc += int(m) * stride
        out.append(acc)
    return out


def _check(out, sizes, stride, leading_zero, dtype, device="cpu"):
    assert out.dtype == dtype
    assert out.device.type == device
    assert out.dim() == 1
    assert out.tolist() == _reference(sizes, stride, leading_zero)


@pytest.mark.parametrize("n", [1, 7, 256, 1000])
@pytest.mark.parametrize("stride", [1, 7, 4096])
@pytest.mark.parametrize("in_dtype", [I32, I64])
@pytest.mark.parametrize("out_dtype", [I32, I64])
@pytest.mark.parametrize("leading_zero", [False, True])
def test_single_output_matches_reference(gen, n, stride, in_dtype, out_dtype, leading_zero):
    sizes = _random_sizes(gen, n, in_dtype)
    assert sizes.any(), "random data should not be all zeros"
    (out,) = splits_to_offsets(sizes, strides=[stride], include_leading_zero=[leading_zero],
                               dtypes=[out_dtype])
    assert out.numel() == n + leading_zero
    _check(out, sizes.tolist(), stride, leading_zero, out_dtype)


MULTI = [  # (strides, include_leading_zero, dtypes)
    ([1, 7, 4096], [True, False, True], [I32, I64, I64]),
    ([4096, 1, 1], [False, True, False], [I64, I32, I64]),
    ([1, 1, 1], [True, True, False], [I32, I32, I32]),
    ([0, 3, 16], [False, False, True], [I32, I64, I32]),
]


@pytest.mark.parametrize("n", [1, 7, 256, 1000])
@pytest.mark.parametrize("in_dtype", [I32, I64])
@pytest.mark.parametrize("config", range(len(MULTI)))
@pytest.mark.parametrize("bulk", [False, True])
def test_several_outputs(gen, n, in_dtype, config, bulk):
    strides, zeros, dtypes = MULTI[config]
    sizes = _random_sizes(gen, n, in_dtype)
    outs = splits_to_offsets(sizes, strides=strides, include_leading_zero=zeros,
                             dtypes=dtypes, bulk_allocate=bulk)
    assert isinstance(outs, list) and len(outs) == 3
    for out, s, z, d in zip(outs, strides, zeros, dtypes):
        _check(out, sizes.tolist(), s, z, d)
    storages = {o.untyped_storage().data_ptr() for o in outs}
    if bulk:
        assert len(storages) == 1, "bulk_allocate must use one allocation"
        for o in outs:
            assert o.data_ptr() % 16 == 0
            assert (o.data_ptr() - o.untyped_storage().data_ptr()) % 16 == 0
        # Views must not overlap.
        spans = sorted((o.data_ptr(), o.data_ptr() + o.numel() * o.element_size())
                       for o in outs)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
    else:
        assert len(storages) == 3, "without bulk_allocate each output is its own tensor"


@pytest.mark.parametrize("bulk", [False, True])
def test_bulk_and_separate_agree(gen, bulk):
    sizes = _random_sizes(gen, 33, I32)
    kw = dict(strides=[1, 5, 128, 2], include_leading_zero=[True, False, False, True],
              dtypes=[I64, I32, I64, I32])
    ref = splits_to_offsets(sizes, **kw)
    got = splits_to_offsets(sizes, bulk_allocate=bulk, **kw)
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("in_dtype", [I32, I64])
@pytest.mark.parametrize("bulk", [False, True])
def test_int64_exact_past_2_31(gen, in_dtype, bulk):
    # Sizes around 2**28 (still int32) with stride 4096: totals reach ~2**40 or more.
    n = 64
    sizes = torch.randint(2**28 - 1000, 2**28, (n,), generator=gen, dtype=torch.int64).to(in_dtype)
    outs = splits_to_offsets(sizes, strides=[4096, 1], include_leading_zero=[True, False],
                             dtypes=[I64, I64], bulk_allocate=bulk)
    ref = _reference(sizes.tolist(), 4096, True)
    assert ref[-1] > 2**40
    _check(outs[0], sizes.tolist(), 4096, True, I64)
    _check(outs[1], sizes.tolist(), 1, False, I64)
    assert outs[1][-1].item() > INT32_MAX  # the sum alone passes int32 too


@pytest.mark.parametrize("in_dtype", [I32, I64])
def test_int32_overflow_raises_on_cpu(in_dtype):
    sizes = torch.full((16,), 2**28, dtype=in_dtype)  # total 2**32 rows
    with pytest.raises(ValueError, match=r"output 1 .*4294967296.*torch\.int32"):
        splits_to_offsets(sizes, strides=[1, 1], include_leading_zero=[False, True],
                          dtypes=[I64, I32])
    # Stride pushes it over: 1000 rows of 2**22 bytes is > 2**31.
    with pytest.raises(ValueError, match=r"output 0 .*torch\.int32"):
        splits_to_offsets([1000], strides=[2**22], include_leading_zero=[False],
                          dtypes=[I32])


def test_int32_exactly_at_limit_is_fine():
    (out,) = splits_to_offsets([INT32_MAX - 5, 5], strides=[1], include_leading_zero=[True],
                               dtypes=[I32])
    assert out.tolist() == [0, INT32_MAX - 5, INT32_MAX]
    with pytest.raises(ValueError, match="output 0"):
        splits_to_offsets([INT32_MAX - 5, 6], strides=[1], include_leading_zero=[True],
                          dtypes=[I32])


def test_int64_overflow_raises_on_cpu():
    with pytest.raises(ValueError, match=r"output 0 .*torch\.int64"):
        splits_to_offsets([2**62, 2**62], strides=[1], include_leading_zero=[False],
                          dtypes=[I64])


@pytest.mark.parametrize("in_dtype", [I32, I64])
@pytest.mark.parametrize("bulk", [False, True])
def test_empty_split_sizes(in_dtype, bulk):
    sizes = torch.empty(0, dtype=in_dtype)
    outs = splits_to_offsets(sizes, strides=[1, 4096, 3], include_leading_zero=[True, False, True],
                             dtypes=[I32, I64, I64], bulk_allocate=bulk)
    assert [o.tolist() for o in outs] == [[0], [], [0]]
    assert [o.dtype for o in outs] == [I32, I64, I64]


def test_zeros_and_zero_stride():
    sizes = torch.tensor([0, 5, 0, 0, 3], dtype=I32)
    a, b = splits_to_offsets(sizes, strides=[2, 0], include_leading_zero=[True, True],
                             dtypes=[I64, I32])
    assert a.tolist() == [0, 0, 10, 10, 10, 16]
    assert b.tolist() == [0] * 6


@pytest.mark.parametrize("container", [list, tuple])
def test_python_sequence_input(gen, container):
    sizes = _random_sizes(gen, 20, I64).tolist()
    outs = splits_to_offsets(container(sizes), strides=container([1, 64]),
                             include_leading_zero=container([True, False]),
                             dtypes=container([I32, I64]))
    _check(outs[0], sizes, 1, True, I32)
    _check(outs[1], sizes, 64, False, I64)
    (empty,) = splits_to_offsets([], strides=[1], include_leading_zero=[True], dtypes=[I64])
    assert empty.tolist() == [0]


def test_non_contiguous_input_and_input_untouched(gen):
    base = _random_sizes(gen, 40, I64)
    sizes = base[::2]
    before = base.clone()
    (out,) = splits_to_offsets(sizes, strides=[3], include_leading_zero=[True], dtypes=[I64])
    _check(out, sizes.tolist(), 3, True, I64)
    assert torch.equal(base, before)


KW = dict(strides=[1], include_leading_zero=[True], dtypes=[I64])


@pytest.mark.parametrize("sizes, match", [
    (torch.tensor([3, -1, 2], dtype=I32), r"split_sizes must be non-negative, got -1 at index 1"),
    (torch.tensor([-5], dtype=I64), r"split_sizes.*non-negative"),
    ([4, -2], r"split_sizes.*non-negative"),
    (torch.tensor([1.0, 2.0]), r"split_sizes.*torch\.int32 or torch\.int64.*torch\.float32"),
    (torch.tensor([True, False]), r"split_sizes.*torch\.int32 or torch\.int64.*torch\.bool"),
    (torch.tensor([1, 2], dtype=torch.int16), r"split_sizes.*torch\.int32 or torch\.int64.*torch\.int16"),
    (torch.ones(2, 3, dtype=I64), r"split_sizes must be 1-D, got shape \(2, 3\)"),
    (torch.tensor(5, dtype=I64), r"split_sizes must be 1-D, got shape \(\)"),
    ([1, 2.5], r"split_sizes.*Python ints.*2\.5"),
    ([[1, 2]], r"split_sizes"),
    ("123", r"split_sizes"),
    (7, r"split_sizes"),
])
def test_bad_split_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        splits_to_offsets(sizes, **KW)


SIZES = torch.tensor([1, 2, 3], dtype=I32)


@pytest.mark.parametrize("kw, match", [
    (dict(strides=[1, 2], include_leading_zero=[True], dtypes=[I64]),
     r"strides, include_leading_zero and dtypes must have the same length, got lengths 2, 1 and 1"),
    (dict(strides=[1], include_leading_zero=[True], dtypes=[I64, I32]),
     r"same length, got lengths 1, 1 and 2"),
    (dict(strides=[], include_leading_zero=[], dtypes=[]), r"at least one output"),
    (dict(strides=1, include_leading_zero=[True], dtypes=[I64]), r"strides must be a list or tuple"),
    (dict(strides=[1], include_leading_zero=True, dtypes=[I64]),
     r"include_leading_zero must be a list or tuple"),
    (dict(strides=[1], include_leading_zero=[True], dtypes=I64), r"dtypes must be a list or tuple"),
    (dict(strides=[1, -4], include_leading_zero=[True, True], dtypes=[I64, I64]),
     r"strides\[1\] must be a Python int in \[0, 2\*\*63 - 1\], got -4"),
    (dict(strides=[2**63], include_leading_zero=[True], dtypes=[I64]), r"strides\[0\]"),
    (dict(strides=[2.0], include_leading_zero=[True], dtypes=[I64]), r"strides\[0\].*2\.0"),
    (dict(strides=[True], include_leading_zero=[True], dtypes=[I64]), r"strides\[0\]"),
    (dict(strides=[1], include_leading_zero=[1], dtypes=[I64]), r"include_leading_zero\[0\] must be a bool"),
    (dict(strides=[1, 1], include_leading_zero=[True, False], dtypes=[I64, torch.float32]),
     r"splits_to_offsets: dtypes\[1\] must be torch\.int32 or torch\.int64, got torch\.float32"),
    (dict(strides=[1], include_leading_zero=[True], dtypes=[torch.int16]), r"dtypes\[0\].*torch\.int16"),
    (dict(strides=[1], include_leading_zero=[True], dtypes=["int64"]), r"dtypes\[0\]"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        splits_to_offsets(SIZES, **kw)


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        splits_to_offsets(SIZES, [1], [True], [I64])
