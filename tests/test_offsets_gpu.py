"""splits_to_offsets on CUDA: the one-launch CuTe DSL kernel against the torch path."""

import itertools

import pytest
import torch
from conftest import kernels_unavailable

import grouped
from grouped import kernels

pytestmark = pytest.mark.gpu


def _reference(sizes, strides, leading, dtypes):
    outs = []
    for s, z, d in zip(strides, leading, dtypes):
        running, values = 0, [0] if z else []
        for m in sizes:
            running += m * s
            values.append(running)
        outs.append(torch.tensor(values, dtype=torch.int64).to(d))
    return outs


def _kernel_available():
    if not kernels.usable(torch.empty(0, device="cuda")):
        kernels_unavailable(kernels.unavailable("cuda", torch.cuda.get_device_capability()))


@pytest.mark.parametrize("n", [1, 7, 256, 1000, 5000])
@pytest.mark.parametrize("in_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bulk", [False, True])
def test_kernel_matches_reference(gen, n, in_dtype, bulk):
    _kernel_available()
    sizes = torch.randint(0, 5000, (n,), generator=gen)
    combos = list(itertools.product([1, 7, 4096], [False, True], [torch.int32, torch.int64]))
    strides, leading, dtypes = zip(*combos)  # 12 outputs: two launches
    outs = grouped.splits_to_offsets(
        sizes.to(in_dtype).cuda(), strides=strides, include_leading_zero=leading, dtypes=dtypes, bulk_allocate=bulk
    )
    for got, want in zip(outs, _reference(sizes.tolist(), strides, leading, dtypes)):
        assert got.dtype == want.dtype and torch.equal(got.cpu(), want)
        assert got.data_ptr() % 16 == 0 or not bulk


def test_int64_totals_past_2_31(gen):
    _kernel_available()
    sizes = torch.randint(2**27, 2**28, (64,), generator=gen)
    (out,) = grouped.splits_to_offsets(sizes.cuda(), strides=[4096], include_leading_zero=[True], dtypes=[torch.int64])
    assert torch.equal(out.cpu(), _reference(sizes.tolist(), [4096], [True], [torch.int64])[0])
    assert int(out[-1]) > 2**40


def test_one_launch_and_graph_replay(gen):
    _kernel_available()
    n = 256
    sizes = torch.randint(0, 100, (n,), generator=gen, dtype=torch.int32).cuda()
    args = dict(strides=[1, 1, 7168, 4096, 2, 1], include_leading_zero=[True, False, True, False, True, False],
                dtypes=[torch.int32, torch.int32, torch.int64, torch.int64, torch.int32, torch.int64])
    grouped.splits_to_offsets(sizes, **args)  # compile / load
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        grouped.splits_to_offsets(sizes, **args)
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels_run = [e.name for e in launches if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    assert len(kernels_run) == 1, kernels_run

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        grouped.splits_to_offsets(sizes, **args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = grouped.splits_to_offsets(sizes, **args)
    for _ in range(3):
        new = torch.randint(0, 100, (n,), generator=gen, dtype=torch.int32)
        sizes.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        expected = _reference(new.tolist(), args["strides"], args["include_leading_zero"], args["dtypes"])
        for got, want in zip(outs, expected):
            assert torch.equal(got.cpu(), want)
