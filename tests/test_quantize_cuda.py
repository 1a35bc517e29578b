"""grouped.quantize and GroupedTensor.quantize_ on CUDA (the CuTe DSL kernels) equal the CPU reference bytes."""

import pytest
import torch
from conftest import kernels_unavailable

import grouped
from grouped import kernels

pytestmark = pytest.mark.gpu
FORMATS = ["mxfp8", "nvfp4"]


@pytest.fixture(autouse=True)
def _needs_kernels():
    reason = kernels.unavailable("cuda", torch.cuda.get_device_capability())
    if reason:
        kernels_unavailable(reason)


def _wide(gen, *shape, dtype=torch.bfloat16):
    """Values spanning many binades, some zero blocks, a NaN and an Inf block."""
    exponents = torch.randint(-30, 30, shape[:-1] + (1,), generator=gen).float()
    x = torch.randn(*shape, generator=gen) * torch.exp2(exponents)
    flat = x.view(-1)
    if flat.numel() > 200:
        flat[:32] = 0
        flat[64] = float("nan")
        flat[130] = float("inf")
    return x.to(dtype)


def _same(a: grouped.QuantizedTensor, b: grouped.QuantizedTensor):
    assert a.data.shape == b.data.shape and a.scale.shape == b.scale.shape
    assert torch.equal(a.data.view(torch.uint8).cpu(), b.data.view(torch.uint8))
    assert torch.equal(a.scale.view(torch.uint8).cpu(), b.scale.view(torch.uint8))
    if b.global_scale is not None:
        assert torch.equal(a.global_scale.cpu(), b.global_scale)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape, axis, sizes",
    [((192, 256), -1, None), ((192, 256), 0, None), ((150, 96), -1, [5, 0, 37, 1, 64]),
     ((150, 96), 0, [5, 0, 37, 1, 64]), ((4, 64, 96), -1, None), ((4, 64, 96), 1, None)],
    ids=["row", "col", "row-split", "col-split", "w-row", "w-col"],
)
def test_quantize_cuda_matches_cpu(gen, fmt, dtype, shape, axis, sizes):
    x = _wide(gen, *shape, dtype=dtype)
    _same(grouped.quantize(x.cuda(), fmt, axis=axis, split_sizes=sizes),
          grouped.quantize(x, fmt, axis=axis, split_sizes=sizes))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("members", [[(64, 128)] * 8, [(17, 96), (0, 96), (64, 96), (3, 96)]],
                         ids=["weights", "tokens"])
def test_grouped_tensor_quantize_cuda_and_noop(gen, fmt, members):
    on_gpu = grouped.GroupedTensor(members, fmt, columnwise=True, device="cuda")
    on_cpu = grouped.GroupedTensor(members, fmt, columnwise=True)
    xs = [_wide(gen, *shape) for shape in members]
    on_gpu.quantize_([x.cuda() for x in xs])
    on_cpu.quantize_(xs)
    for name in ("data", "scale", "columnwise_data", "columnwise_scale", "global_scale"):
        gpu, cpu = getattr(on_gpu, name), getattr(on_cpu, name)
        if cpu is not None:
            assert torch.equal(gpu.cpu(), cpu), name
    before = [b.clone() for b in (on_gpu.data, on_gpu.columnwise_data)]
    fresh = [_wide(gen, *shape).cuda() for shape in members]
    on_gpu.quantize_(fresh, noop_flag=torch.ones((), dtype=torch.int32, device="cuda"))
    assert all(torch.equal(b, a) for b, a in zip(before, (on_gpu.data, on_gpu.columnwise_data)))
    on_gpu.quantize_(fresh, noop_flag=torch.zeros((), dtype=torch.int32, device="cuda"))
    on_cpu.quantize_([f.cpu() for f in fresh])
    assert torch.equal(on_gpu.columnwise_data.cpu(), on_cpu.columnwise_data)


def test_weight_quantize_is_one_launch_and_graph_safe(gen):
    w = _wide(gen, 8, 256, 512).cuda()
    cache = grouped.GroupedTensor([(256, 512)] * 8, "mxfp8", columnwise=True, device="cuda")
    cache.quantize_(list(w.unbind(0)))  # compile / load
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cache.quantize_(list(w.unbind(0)))
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels_run = [n for n in names if "memcpy" not in n.lower() and "memset" not in n.lower()]
    assert len(kernels_run) == 1, names  # rowwise + columnwise in one pass
    flag = torch.zeros((), dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cache.quantize_(list(w.unbind(0)), noop_flag=flag)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cache.quantize_(list(w.unbind(0)), noop_flag=flag)
    w.copy_(_wide(gen, 8, 256, 512).cuda())
    flag.fill_(1)
    graph.replay()  # weights changed but the flag says skip: cache keeps the old values
    stale = cache.data.clone()
    flag.fill_(0)
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(stale, cache.data)
    ref = grouped.quantize(w.cpu(), "mxfp8")
    assert torch.equal(cache.data.cpu().view(8, 256, 512).view(torch.float8_e4m3fn).view(torch.uint8),
                       ref.data.view(torch.uint8))
