"""The cudnn backend against the REAL nvidia-cudnn-frontend 1.32, on the CPU.

The frontend's wrappers and its GLU class check every argument in Python
(shapes, strides, dtypes, packed-scale sizes, the descriptor workspace) before
they need a GPU. This file patches only what needs one: torch.cuda's device
queries (available, current device, compute capability 10.0, current stream)
and the kernel classes' ``compile`` (which would build the kernel for the GPU
it finds; here it installs a recorder as the compiled kernel). Then it runs the
backend's own ``run`` / ``run_swiglu`` on simulated sm100 calls, so every
argument set the adapter builds goes through the frontend's real code down to
the kernel launch, and a misreading of its API fails here. What the fake module
of tests/test_cudnn.py emulates (the numbers) is not repeated.

Needs the frontend: ``pip install -e ".[blackwell]"``, then
``python -m pytest -m cudnn_frontend`` (the tests are skipped, with the reason,
where it is not installed). See docs/cudnn-frontend.md.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import grouped
from grouped.backends import BACKENDS
from grouped.backends import cudnn as cb
from grouped.problem import prepare

cudnn = pytest.importorskip("cudnn", reason="nvidia-cudnn-frontend is not installed (pip install -e '.[blackwell]')")
if not cudnn.__version__.startswith("1.32."):
    pytest.skip(f"these checks encode nvidia-cudnn-frontend 1.32, found {cudnn.__version__}", allow_module_level=True)

from cudnn.gemm.cutedsl.grouped.glu import _blockscaled_api as glu_impl  # noqa: E402
from cudnn.gemm.cutedsl.grouped.moe_utils import WgradSfTensormapConstructor  # noqa: E402
from cudnn.gemm.cutedsl.grouped.quant import api as quant_api  # noqa: E402
from cudnn.gemm.cutedsl.grouped.wgrad import _blockscaled_api as wgrad_impl  # noqa: E402
from cudnn.gemm.cutedsl.grouped.wgrad import api as wgrad_api  # noqa: E402

pytestmark = pytest.mark.cudnn_frontend

FORMATS = ("mxfp8", "nvfp4")
OUTSIDE, OPERANDS = 7, 0  # the current device index outside the adapter's device guard, and inside it
STREAM_BASE = 100  # the fake current stream of device i is STREAM_BASE + i


@dataclasses.dataclass
class Launch:
    api: str  # the kernel class whose compiled kernel was called
    args: tuple
    kwargs: dict
    stream: int


@pytest.fixture
def launches(monkeypatch):
    """Patch the GPU-only steps; return the list of kernel launches the real frontend makes."""
    current = {"index": OUTSIDE}

    class Guard:  # torch.cuda.device(call.device): the simulated operands live on device OPERANDS
        def __init__(self, device):
            pass

        def __enter__(self):
            self.previous, current["index"] = current["index"], OPERANDS

        def __exit__(self, *exc):
            current["index"] = self.previous

    class Stream:
        @property
        def cuda_stream(self):
            return STREAM_BASE + current["index"]

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    recorded: list[Launch] = []

    def compile_recorder(api):
        api._ensure_support_checked()

        def kernel(*args, **kwargs):
            stream = kwargs["stream"] if "stream" in kwargs else args[7]  # wgrad passes it 8th
            recorded.append(Launch(type(api).__name__, args, kwargs, int(stream)))

        api._compiled_kernel = kernel

    def wgrad_compile_recorder(api):
        compile_recorder(api)
        # what compile() takes from the kernel's get_workspace_bytes()
        api._workspace_bytes = max(WgradSfTensormapConstructor.get_workspace_size(
            api.input_order, api.weight_mode, api.expert_cnt), 1)

    monkeypatch.setattr(quant_api.GroupedGemmQuantSm100, "compile", compile_recorder)
    monkeypatch.setattr(wgrad_impl.GroupedGemmWgradBlockScaledAPI, "compile", wgrad_compile_recorder)
    monkeypatch.setattr(glu_impl.GroupedGemmGluBlockScaledAPI, "compile", compile_recorder)
    # every test builds its ops afresh, so the frontend's checks run for every case
    monkeypatch.setattr(quant_api, "_cache_of_GroupedGemmQuantSm100Objects", {})
    monkeypatch.setattr(quant_api, "_quant_wrapper_memo", {})
    monkeypatch.setattr(wgrad_api, "_cache_of_GroupedGemmWgradSm100Objects", {})
    monkeypatch.setattr(wgrad_api, "_wgrad_wrapper_memo", {})
    monkeypatch.setattr(cb, "_glu_kernels", {})
    monkeypatch.setattr(cb, "_warm_signatures", set())
    return recorded


def simulate(call):
    """The same call, as if its tensors lived on an sm100 GPU."""
    problem = dataclasses.replace(call.problem, device_type="cuda", capability=(10, 0))
    return dataclasses.replace(call, problem=problem)


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


def forward_call(gen, fmt, layout, case):
    """A forward/dgrad call of the kind the adapter serves; ``case`` varies what it builds."""
    groups, n, k, sizes = 3, 192, 128, [256, 0, 512]
    extra_rows = 0 if case == "gpu_sizes" else 40
    m = sum(sizes) + extra_rows
    width, out_width = (k, n) if layout == "forward" else (n, k)
    a = grouped.quantize(rand(gen, m, width), fmt, split_sizes=sizes)
    w = rand(gen, groups, n, k)
    if case == "grouped_weight":
        b = grouped.GroupedTensor([(n, k)] * groups, fmt, rowwise=True, columnwise=True)
        b.quantize_(list(w.unbind(0)))
    else:
        b = grouped.quantize(w, fmt, axis=-1 if layout == "forward" else 1)
    if case == "blocked_scales":
        a, b = a.with_layout("blocked"), b.with_layout("blocked")
    out_dtype = torch.float32 if case == "fp32_out" else torch.bfloat16
    out = torch.zeros(m, out_width, dtype=out_dtype)
    call = simulate(prepare(a, b, sizes, offsets=None, layout=layout, out=out, accumulate=False, out_dtype=None))
    if case == "gpu_sizes":
        ends = torch.tensor(sizes).cumsum(0).to(torch.int32)
        call = dataclasses.replace(call, splits=grouped.Splits(call.num_groups, call.device, ends=ends))
    return call


FORWARD_CASES = ["host_sizes", "gpu_sizes", "blocked_scales", "grouped_weight"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["forward", "dgrad"])
@pytest.mark.parametrize("case", FORWARD_CASES + ["fp32_out"])
def test_forward_dgrad_pass_the_real_checks(launches, gen, fmt, layout, case):
    if case == "fp32_out" and fmt == "mxfp8":
        pytest.skip("refused by problem kind: no fp32 D for FP8 inputs")
    call = forward_call(gen, fmt, layout, case)
    assert BACKENDS["cudnn"].accepts(call) is None
    out = BACKENDS["cudnn"].run(call)
    (launch,) = launches
    assert launch.api == "GroupedGemmQuantSm100"
    assert launch.stream == STREAM_BASE + OPERANDS  # launched on the current stream of the operands' device
    d = launch.kwargs["d_tensor"]
    assert d.data_ptr() == out.data_ptr() and d.dtype == out.dtype  # into the caller's buffer
    assert launch.kwargs["amax_tensor"] is None and launch.kwargs["d_col_tensor"] is d  # nothing extra allocated


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("strided_out", [False, True])
def test_wgrad_passes_the_real_checks(launches, gen, fmt, accumulate, strided_out):
    sizes, n, k = [128, 0, 384], 160, 96
    m = sum(sizes) + 11
    qdy = grouped.quantize(rand(gen, m, n), fmt, axis=0, split_sizes=sizes)
    qx = grouped.quantize(rand(gen, m, k), fmt, axis=0, split_sizes=sizes)
    storage = torch.zeros(len(sizes), n, k + (32 if strided_out else 0))
    out = storage[:, :, :k]
    call = simulate(prepare(qdy, qx, sizes, offsets=None, layout="wgrad", out=out, accumulate=accumulate,
                            out_dtype=torch.float32))
    assert BACKENDS["cudnn"].accepts(call) is None
    BACKENDS["cudnn"].run(call)
    (launch,) = launches
    assert launch.api == "GroupedGemmWgradBlockScaledAPI" and launch.stream == STREAM_BASE + OPERANDS
    assert launch.args[4].data_ptr() == out.data_ptr() and launch.args[4].stride() == out.stride()
    # the workspace argument is the adapter's descriptor_workspace (the op's own was never made here), and it
    # passed the frontend's check: uint8, contiguous, on the wgrad tensor's device, at least the size it needs
    assert launch.args[6] is not None


@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("into_out", [False, True])
def test_fused_swiglu_passes_the_real_checks(launches, gen, with_probs, into_out):
    sizes, f, k = [256, 512], 128, 128
    m = sum(sizes) + 8
    a = grouped.quantize(rand(gen, m, k), "nvfp4", split_sizes=sizes)
    b = grouped.quantize(rand(gen, 2, 2 * f, k), "nvfp4")
    call = simulate(prepare(a, b, sizes, offsets=None, layout="forward", out=None, accumulate=False, out_dtype=None))
    probs = torch.rand(m, generator=gen) if with_probs else None
    assert BACKENDS["cudnn"].swiglu_refusal(call, probs, torch.bfloat16) is None
    out = torch.zeros(m, f, dtype=torch.bfloat16) if into_out else None
    result = BACKENDS["cudnn"].run_swiglu(call, probs, out)
    (launch,) = launches
    assert launch.api == "GroupedGemmGluBlockScaledAPI" and launch.stream == STREAM_BASE + OPERANDS
    kw = launch.kwargs
    assert kw["d_tensor"].data_ptr() == result.data_ptr() and (out is None or result is out)
    assert kw["d_col_tensor"].data_ptr() == result.data_ptr()  # D stands in for the D_col never stored
    assert kw["amax_tensor"] is None and kw["sfd_row_tensor"] is None and kw["sfd_col_tensor"] is None
    assert kw["c_tensor"].shape == (sum(sizes), 2 * f)  # the pre-activation the kernel always stores
    assert (kw["prob_tensor"] is not None) == with_probs


def test_fused_swiglu_mxfp8_plain_d_passes_the_real_checks(launches, gen):
    """MXFP8 is not fused (the frontend's wrapper always quantizes D for FP8 inputs), but its GLU class takes
    a plain bf16 D without SFD outputs: what enabling it would hand the frontend passes its checks."""
    sizes = [256, 256]
    a = grouped.quantize(rand(gen, 512, 128), "mxfp8", split_sizes=sizes)
    b = grouped.quantize(rand(gen, 2, 256, 128), "mxfp8")
    call = simulate(prepare(a, b, sizes, offsets=None, layout="forward", out=None, accumulate=False, out_dtype=None))
    assert "block-scaled D" in BACKENDS["cudnn"].swiglu_refusal(call, None, torch.bfloat16)
    kwargs = cb.glu_arguments(call, None, torch.empty(512, 128, dtype=torch.bfloat16))
    cb._glu_kernel(call, kwargs).execute(**kwargs)
    (launch,) = launches
    assert launch.api == "GroupedGemmGluBlockScaledAPI" and launch.kwargs["sfd_row_tensor"] is None


def test_the_checks_are_live(launches, gen, monkeypatch):
    """Controls: a packed scale buffer one byte short, and a descriptor workspace smaller than the frontend
    needs, are refused by the real frontend (ValueError), not launched."""
    call = forward_call(gen, "nvfp4", "forward", "host_sizes")
    kwargs = cb.forward_arguments(call)
    with pytest.raises(ValueError):
        cudnn.grouped_gemm_quant_wrapper_sm100(**dict(kwargs, sfa_tensor=kwargs["sfa_tensor"][:-1]))

    sizes = [128, 256]
    qdy = grouped.quantize(rand(gen, 384, 128), "mxfp8", axis=0, split_sizes=sizes)
    qx = grouped.quantize(rand(gen, 384, 128), "mxfp8", axis=0, split_sizes=sizes)
    call = simulate(prepare(qdy, qx, sizes, offsets=None, layout="wgrad", out=None, accumulate=False,
                            out_dtype=torch.float32))
    monkeypatch.setattr(cudnn, cb.WGRAD_WORKSPACE_SIZE, lambda experts: 1)
    with pytest.raises(ValueError, match="descriptor_workspace requires at least"):
        BACKENDS["cudnn"].run(call)
    assert launches == []
