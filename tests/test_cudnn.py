"""The cudnn backend (cuDNN frontend on Blackwell), tested without a Blackwell GPU.

There is no sm100 device here, so nothing in this file runs a cuDNN kernel. A
FAKE ``cudnn`` module is injected into sys.modules; its wrappers and GLU class
record the keyword arguments they get and the device that was current then,
check them against the contract read from nvidia-cudnn-frontend 1.32.0's sources
(shapes, strides, dtypes, packed-scale sizes, the 256 / 128 token rules, the
wgrad descriptor workspace), and emulate the computation on the CPU by reading
the scales back with from_blocked as cuDNN documents them. Results are compared
with the reference backend, and the exact tensors with references built from
docs/design.md's rules (grouped.to_blocked per matrix / per group, splits_to_offsets,
1/(S_a S_b)). Selection, per-call refusals and graph-capture warm-up run on
simulated sm100 calls. The real frontend's own argument checks run in
tests/test_cudnn_frontend.py.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import grouped
from grouped import fused, selector
from grouped.backends import BACKENDS
from grouped.backends import cudnn as cb
from grouped.formats import MXFP8, NVFP4
from grouped.problem import Problem, prepare
from grouped.scale_layout import blocked_numel, from_blocked, to_blocked
from grouped.splits import Splits

FORMATS = ("mxfp8", "nvfp4")
FMT = {"mxfp8": MXFP8, "nvfp4": NVFP4}



def with_gpu_counts(call, counts):
    """The call as if its split sizes had come as a device tensor (here on the CPU)."""
    ends = torch.cumsum(torch.as_tensor(counts), 0, dtype=torch.int32)
    return dataclasses.replace(call, splits=Splits(call.num_groups, call.device, ends=ends))

# ---- a fake cuDNN frontend ---------------------------------------------------------------------


def _ceil(a, b):
    return -(-a // b)


FP4 = torch.float4_e2m1fn_x2


def _dequant(data: torch.Tensor, compact_scale_bytes: torch.Tensor) -> torch.Tensor:
    """Block-scaled data (blocks along the last dim) -> fp64, WITHOUT any NVFP4 tensor scale."""
    if data.dtype == FP4:  # packed FP4, E4M3 block scales
        one = torch.ones((), dtype=torch.float32)
        codes = data.view(torch.uint8)
        return NVFP4.dequantize_blocks(codes, compact_scale_bytes.view(torch.float8_e4m3fn), one).double()
    return MXFP8.dequantize_blocks(data, compact_scale_bytes.view(torch.uint8)).double()


def _check_sf_pairing(data_dtype, sf_dtype, sf_vec):
    # uint8 is NOT accepted for packed FP4: the quant / GLU APIs would measure it in bytes
    assert data_dtype in (FP4, torch.float8_e4m3fn), f"operand dtype {data_dtype}"
    if data_dtype == FP4:
        assert sf_dtype == torch.float8_e4m3fn and sf_vec == 16, "NVFP4: E4M3 scales with sf_vec_size 16"
    else:
        assert data_dtype == torch.float8_e4m3fn
        assert sf_dtype == torch.float8_e8m0fnu and sf_vec == 32, "MXFP8: E8M0 scales with sf_vec_size 32"


def _forward_like(kw):
    """Checks shared by the quant and GLU kernels; returns (valid_m, k, n, experts, C = alpha A B^T in fp64)."""
    a, b = kw["a_tensor"], kw["b_tensor"]
    assert a.dim() == 2 and a.is_contiguous(), "canonical A is (valid_m, k) row-major"
    assert b.dim() == 3 and b.is_contiguous(), "canonical B is (l, n, k) row-major (k-major)"
    assert a.dtype == b.dtype
    fp4 = a.dtype == FP4
    valid_m, k = a.shape[0], a.shape[1] * (2 if fp4 else 1)
    experts, n = b.shape[0], b.shape[1]
    assert b.shape[2] == a.shape[1]
    sf_vec, sfa, sfb = kw["sf_vec_size"], kw["sfa_tensor"], kw["sfb_tensor"]
    _check_sf_pairing(a.dtype, sfa.dtype, sf_vec)
    assert sfb.dtype == sfa.dtype
    rest_k = _ceil(_ceil(k, sf_vec), 4)
    assert sfa.is_contiguous() and sfa.numel() == 512 * _ceil(valid_m, 128) * rest_k, "complete MMA-packed SFA"
    assert sfb.is_contiguous() and sfb.numel() == 512 * _ceil(n, 128) * rest_k * experts, "complete MMA-packed SFB"
    offs = kw["padded_offsets"]
    assert offs.dtype == torch.int32 and tuple(offs.shape) == (experts,)
    ends = offs.tolist()
    assert valid_m % 256 == 0, "valid_m is compiled divisible by 256"
    assert all(e % 256 == 0 for e in ends) and ends == sorted(ends) and ends[-1] <= valid_m
    alpha = kw["alpha_tensor"]
    assert alpha.dtype == torch.float32 and tuple(alpha.shape) == (experts,)
    assert experts <= 1024
    A = _dequant(a, from_blocked(sfa.view(torch.uint8), valid_m, k // sf_vec))
    Bw = _dequant(b, from_blocked(sfb.view(torch.uint8).reshape(experts, -1), n, k // sf_vec))
    C = torch.zeros(valid_m, n, dtype=torch.float64)
    start = 0
    for g, end in enumerate(ends):
        C[start:end] = alpha[g].double() * (A[start:end] @ Bw[g].T)
        start = end
    return valid_m, k, n, experts, C, ends[-1]


class FakeDevice:
    """Stands in for torch.cuda.device / current_device on the CPU: the adapter must make the operands'
    device current around every frontend call (outside, the current device is another one)."""

    outside = torch.device("cuda", 7)

    def __init__(self):
        self.current = self.outside

    def __call__(self, device):
        fake = self

        class Guard:
            def __enter__(self):
                self.previous, fake.current = fake.current, torch.device(device)

            def __exit__(self, *exc):
                fake.current = self.previous

        return Guard()


FAKE_WGRAD_WORKSPACE_BYTES = 256  # per expert (the real size is the frontend's: get_..._workspace_size_sm100)


class FakeCudnn(types.ModuleType):
    """Records every frontend call's kwargs (and the current device then) and emulates its documented contract."""

    def __init__(self, device: FakeDevice):
        super().__init__("cudnn")
        self.__spec__ = importlib.machinery.ModuleSpec("cudnn", None)
        self.__version__ = "1.32.0"
        self.calls: list[tuple[str, dict]] = []
        self.devices: list[torch.device] = []  # the current device at each call
        self.device = device
        self.glu_compiles = 0
        self.GroupedGemmGluSm100 = self._glu_kernel_class()

    def _record(self, name, kw):
        self.calls.append((name, kw))
        self.devices.append(self.device.current)

    def grouped_gemm_quant_wrapper_sm100(self, **kw):
        self._record("quant", kw)
        valid_m, k, n, experts, C, total = _forward_like(kw)
        assert kw["b_major"] == "k" and kw["cd_major"] == "n"
        d = kw["d_tensor"]
        fp4 = kw["a_tensor"].dtype == FP4
        allowed = (torch.float16, torch.bfloat16, torch.float32) if fp4 else (torch.float16, torch.bfloat16)
        assert d.dtype == kw["d_dtype"] and d.dtype in allowed
        assert tuple(d.shape) == (valid_m, n) and d.stride() == (n, 1), "d_tensor: (valid_m, n), stride (n, 1)"
        assert kw.get("generate_amax") is False
        d[:total] = C[:total].to(d.dtype)
        return {"d_tensor": d}

    def get_grouped_gemm_wgrad_workspace_size_sm100(self, num_experts, *, output_mode="dense", input_order="tensor2d"):
        return FAKE_WGRAD_WORKSPACE_BYTES * num_experts

    def grouped_gemm_wgrad_wrapper_sm100(self, **kw):
        self._record("wgrad", kw)
        a, b, w = kw["a_tensor"], kw["b_tensor"], kw["wgrad_tensor"]
        assert kw["output_mode"] == "dense"
        assert a.dim() == 2 and b.dim() == 2 and a.dtype == b.dtype
        fp4 = a.dtype == FP4
        assert a.stride(1) == 1, "A (hidden, tokens) token-innermost"
        if fp4:
            assert b.stride(0) == 1, "four-bit wgrad needs K-major (token-innermost) B"
        hidden = a.shape[0]
        tokens = a.shape[1] * (2 if fp4 else 1)
        inter = b.shape[1]
        assert (b.shape[0] * (2 if fp4 else 1)) == tokens
        sf_vec, sfa, sfb = kw["sf_vec_size"], kw["sfa_tensor"], kw["sfb_tensor"]
        _check_sf_pairing(a.dtype, sfa.dtype, sf_vec)
        cols = _ceil(_ceil(tokens, sf_vec), 4) * 4
        assert sfa.dim() == 1 and sfa.is_contiguous() and sfa.numel() == _ceil(hidden, 128) * 128 * cols
        assert sfb.dim() == 1 and sfb.is_contiguous() and sfb.numel() == _ceil(inter, 128) * 128 * cols
        offs = kw["offsets_tensor"]
        experts = w.shape[0]
        assert offs.dtype == torch.int32 and tuple(offs.shape) == (experts,)
        ends = offs.tolist()
        assert ends == sorted(ends) and ends[-1] <= tokens and all(e % 128 == 0 for e in ends)
        assert w.dtype == kw["wgrad_dtype"] and tuple(w.shape[1:]) == (hidden, inter)
        workspace = kw["descriptor_workspace"]  # the execute-time checks of _blockscaled_api.py
        assert workspace.dtype == torch.uint8 and workspace.is_contiguous() and workspace.device == w.device
        assert workspace.numel() >= self.get_grouped_gemm_wgrad_workspace_size_sm100(experts)
        gs_a, gs_b = kw["global_scale_a"], kw["global_scale_b"]
        if fp4:
            assert gs_a.dtype == gs_b.dtype == torch.float32 and gs_a.shape == gs_b.shape == (experts,)
            scale = gs_a.double() * gs_b.double()
        else:
            assert gs_a is None and gs_b is None
            scale = torch.ones(experts, dtype=torch.float64)
        pack = 2 if fp4 else 1
        bt = b.t()  # (inter, tokens / pack)
        start = 0
        for e, end in enumerate(ends):
            t = end - start
            if t == 0:
                if not kw["accumulate_on_output"]:
                    w[e].zero_()
                continue
            # expert e's scales: its own blocked matrix, starting at round_up(rows, 128) * start / sf_vec
            oa, ob = _ceil(hidden, 128) * 128 * start // sf_vec, _ceil(inter, 128) * 128 * start // sf_vec
            a_bytes, b_bytes = _ceil(hidden, 128) * 128 * t // sf_vec, _ceil(inter, 128) * 128 * t // sf_vec
            sa = from_blocked(sfa.view(torch.uint8)[oa : oa + a_bytes], hidden, t // sf_vec)
            sb = from_blocked(sfb.view(torch.uint8)[ob : ob + b_bytes], inter, t // sf_vec)
            A = _dequant(a[:, start // pack : end // pack], sa)
            B = _dequant(bt[:, start // pack : end // pack], sb)
            dw = scale[e] * (A @ B.T)
            if kw["accumulate_on_output"]:
                w[e] = (w[e].double() + dw).to(w.dtype)
            else:
                w[e] = dw.to(w.dtype)
            start = end
        return {"wgrad_tensor": w}

    def _glu_kernel_class(self):
        fake = self

        class GroupedGemmGluSm100:
            """The GLU class API: built from sample tensors, checked, compiled once, executed with every call's."""

            def __init__(self, **kw):
                assert all(name.startswith("sample_") for name in kw if name not in ("sf_vec_size", "act_func"))
                assert kw["act_func"] == "swiglu"
                self.samples = kw
                self.compiled = False

            def check_support(self):
                assert self.samples["sample_d"].dtype in (torch.bfloat16, torch.float16, torch.float32)
                return True

            def compile(self):
                fake.glu_compiles += 1
                self.compiled = True

            def execute(self, **kw):
                assert self.compiled
                fake._record("glu", kw)
                valid_m, k, n, experts, C, total = _forward_like(dict(kw, sf_vec_size=self.samples["sf_vec_size"]))
                assert n % 64 == 0
                c, d = kw["c_tensor"], kw["d_tensor"]
                assert c.shape == (valid_m, n) and c.is_contiguous() and c.dtype in (torch.bfloat16, torch.float16)
                assert d.shape == (valid_m, n // 2) and d.stride() == (n // 2, 1) and d.dtype == torch.bfloat16
                assert kw["d_col_tensor"] is d, "no SFD outputs: D_col is never stored, D stands in for it"
                assert "amax_tensor" not in kw, "no amax: nothing reads it"
                prob = kw["prob_tensor"]
                D = torch.zeros(valid_m, n // 2, dtype=torch.float64)
                for j in range(n // 64):
                    gate, up = C[:, 64 * j : 64 * j + 32], C[:, 64 * j + 32 : 64 * j + 64]
                    D[:, 32 * j : 32 * j + 32] = up * F.silu(gate)
                if prob is not None:
                    assert prob.shape == (valid_m,) and prob.is_contiguous() and prob.dtype == torch.float32
                    D = D * prob.double().unsqueeze(1)
                c[:total] = C[:total].to(c.dtype)  # the kernel always stores the pre-activation
                d[:total] = D[:total].to(torch.bfloat16)

        return GroupedGemmGluSm100


@pytest.fixture
def fake_cudnn(monkeypatch):
    device = FakeDevice()
    monkeypatch.setattr(torch.cuda, "device", device)
    fake = FakeCudnn(device)
    monkeypatch.setitem(sys.modules, "cudnn", fake)
    monkeypatch.setattr(cb, "_glu_kernels", {})  # compiled with an earlier test's fake
    monkeypatch.setattr(cb, "_warm_signatures", set())
    real = cb.splits_to_offsets
    fake.offsets_calls = []

    def spy(*args, **kw):  # the adapter must build its offsets with splits_to_offsets, bulk-allocated
        outs = real(*args, **kw)
        fake.offsets_calls.append((kw, outs))
        return outs

    monkeypatch.setattr(cb, "splits_to_offsets", spy)
    selector.clear_cache()
    yield fake
    selector.clear_cache()


@pytest.fixture
def no_cudnn(monkeypatch):
    monkeypatch.setitem(sys.modules, "cudnn", None)  # import cudnn fails, find_spec says None
    selector.clear_cache()
    yield
    selector.clear_cache()


def simulate(call, capability=(10, 0)):
    """The same call, as if its tensors lived on a GPU of this compute capability."""
    problem = dataclasses.replace(call.problem, device_type="cuda", capability=capability)
    return dataclasses.replace(call, problem=problem)


def problem(fmt, layout="forward", capability=(10, 0), **kw):
    fields = dict(
        fmt=fmt, layout=layout, device_type="cuda", capability=capability, out_dtype=torch.bfloat16,
        accumulate=False, device_splits=False, capturing=False, caller_buffer=False, aligned=True,
        grouped_operands=False,
    )
    fields.update(kw)
    return Problem(**fields)


# ---- data ----------------------------------------------------------------------------------------


def rand(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)


def sizes_of(gen, groups, multiple, *, max_blocks=2):
    sizes = [multiple * int(c) for c in torch.randint(0, max_blocks + 1, (groups,), generator=gen)]
    sizes[int(torch.randint(0, groups, (1,), generator=gen))] = multiple * max_blocks  # never all empty
    return sizes


def check_bf16_close(out, ref):
    """docs/design.md's bf16 tolerance: normwise <= 4e-3, and no element past one bf16 ulp of its row's max."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    assert (out - ref).norm() <= 4e-3 * ref.norm()
    row_max = ref.abs().amax(dim=1, keepdim=True)
    ulp = torch.pow(2.0, torch.floor(torch.log2(row_max.clamp_min(1e-30))) - 7)
    assert ((out - ref).abs() <= ulp + 1e-30).all()


def check_offsets(fake, offs, sizes):
    """int32 inclusive end offsets, 16-byte aligned, made by splits_to_offsets(bulk_allocate=True)."""
    assert offs.dtype == torch.int32 and offs.dim() == 1
    assert offs.tolist() == [sum(sizes[: g + 1]) for g in range(len(sizes))]
    assert offs.data_ptr() % 16 == 0
    kw, outs = fake.offsets_calls[-1]
    assert kw["bulk_allocate"] is True and kw["dtypes"] == [torch.int32] and kw["include_leading_zero"] == [False]
    assert outs[0] is offs  # the very tensor handed to cuDNN: one allocation, no copy after


def byte_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def check_refused(call, match, monkeypatch):
    """cudnn refuses this call in ``accepts`` (with a reason matching ``match``): the selector falls to the next
    backend (with a warning: the reference on a GPU is slow) and says why, and a forced cudnn under
    GROUPED_STRICT=1 raises that reason before any write."""
    reason = BACKENDS["cudnn"].accepts(call)
    assert reason is not None and re.search(match, reason), reason
    monkeypatch.delenv("GROUPED_BACKEND", raising=False)
    monkeypatch.delenv("GROUPED_STRICT", raising=False)
    selector._warned.clear()
    with pytest.warns(RuntimeWarning, match="runs on the fp64 reference backend"):  # never silently, on a GPU
        decision = selector.choose(call)
    assert decision.backend == "reference" and "cudnn cannot serve this call" in decision.why
    assert re.search(match, decision.reasons["cudnn"]) and "(this call)" in decision.reasons["cudnn"]
    monkeypatch.setenv("GROUPED_BACKEND", "cudnn")
    monkeypatch.setenv("GROUPED_STRICT", "1")
    with pytest.raises(ValueError, match=match):
        selector.choose(call)


def forward_case(gen, fmt, layout="forward", *, groups=3, n=96, k=64, extra_rows=37):
    """(a, b, sizes, m_total, reference output): tokens grouped in multiples of 256, rows past the total."""
    sizes = sizes_of(gen, groups, 256)
    m_total = sum(sizes) + extra_rows
    w = rand(gen, groups, n, k, scale=0.5)
    x = rand(gen, m_total, k if layout == "forward" else n)
    a = grouped.quantize(x, fmt, split_sizes=sizes)
    b = grouped.quantize(w, fmt, axis=-1 if layout == "forward" else 1)
    ref = grouped.gemm(a, b, sizes, layout=layout, backend="reference")
    return a, b, sizes, m_total, ref


# ---- selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
def test_selects_cudnn_on_sm100(fake_cudnn, fmt, layout):
    p = problem(fmt, layout, out_dtype=torch.float32 if layout == "wgrad" else torch.bfloat16)
    decision = selector.decide(p)
    assert decision.backend == "cudnn"
    assert decision.reasons["cudnn"] is None
    assert "preference" in decision.why
    text = str(decision)
    assert "-> cudnn" in text and "has not run on Blackwell hardware" in text
    assert str(cb.token_multiple(layout)) in decision.note
    wrapper = cb.WRAPPERS[layout]
    assert wrapper in decision.note
    for name in ("cute", "torch", "cublas"):
        assert decision.reasons[name] is not None  # every other backend says why not


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cap", [(9, 0), (8, 0), (12, 0)])
def test_not_blackwell_says_why(fake_cudnn, fmt, cap):
    decision = selector.decide(problem(fmt, capability=cap))
    assert decision.backend != "cudnn"
    reason = decision.reasons["cudnn"]
    assert "Blackwell" in reason and "10.x" in reason and f"sm{cap[0]}{cap[1]}" in reason


@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_says_blackwell(fake_cudnn, fmt):
    p = dataclasses.replace(problem(fmt), device_type="cpu", capability=None)
    assert "Blackwell" in selector.decide(p).reasons["cudnn"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_not_installed_says_so(no_cudnn, fmt):
    assert not cb.cudnn_installed()
    decision = selector.decide(problem(fmt))
    assert decision.backend == "reference"  # the next in the sm100 preference order for quantized formats
    reason = decision.reasons["cudnn"]
    assert "not installed" in reason and "nvidia-cudnn-frontend" in reason


def test_bf16_is_not_served(fake_cudnn):
    decision = selector.decide(problem("bf16"))
    assert decision.backend != "cudnn" and "mxfp8, nvfp4" in decision.reasons["cudnn"]


def test_refusals_by_problem_kind(fake_cudnn):
    mx_fp32 = selector.decide(problem("mxfp8", out_dtype=torch.float32))
    assert mx_fp32.backend == "reference" and "fp32" in mx_fp32.reasons["cudnn"]
    assert selector.decide(problem("mxfp8", "dgrad", out_dtype=torch.float32)).backend == "reference"
    # NVFP4 inputs can write fp32 D; wgrad writes fp32 main_grad in both formats
    assert selector.decide(problem("nvfp4", out_dtype=torch.float32)).backend == "cudnn"
    assert selector.decide(problem("mxfp8", "wgrad", out_dtype=torch.float32, accumulate=True)).backend == "cudnn"
    unaligned = selector.decide(problem("nvfp4", aligned=False))
    assert unaligned.backend == "reference" and "16-byte" in unaligned.reasons["cudnn"]
    grouped_wgrad = selector.decide(problem("mxfp8", "wgrad", grouped_operands=True))
    assert "QuantizedTensor" in grouped_wgrad.reasons["cudnn"]
    assert selector.decide(problem("mxfp8", "forward", grouped_operands=True)).backend == "cudnn"


def test_graph_capture_with_gpu_splits_keeps_cudnn(fake_cudnn):
    p = problem("nvfp4", device_splits=True, capturing=True)
    assert selector.decide(p).backend == "cudnn"


def test_forced_backend_env(fake_cudnn, monkeypatch):
    monkeypatch.setenv("GROUPED_BACKEND_MXFP8", "reference")
    assert selector.decide(problem("mxfp8")).backend == "reference"
    monkeypatch.setenv("GROUPED_BACKEND_MXFP8", "cudnn")
    assert "forced" in selector.decide(problem("mxfp8", capability=(10, 3))).why


def test_import_grouped_does_not_import_cudnn():
    import subprocess

    code = "import sys, grouped, grouped.fused; assert 'cudnn' not in sys.modules; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "ok"


# ---- forward / dgrad arguments --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["forward", "dgrad"])
def test_forward_dgrad_arguments_exact(fake_cudnn, gen, fmt, layout):
    a, b, sizes, m_total, ref = forward_case(gen, fmt, layout)
    n_out = ref.shape[1]
    out = torch.full((m_total, n_out), -7.0, dtype=torch.bfloat16)
    before = out.clone()
    call = simulate(prepare(a, b, sizes, offsets=None, layout=layout, out=out, accumulate=False, out_dtype=None))
    assert selector.decide(call.problem).backend == "cudnn"
    result = BACKENDS["cudnn"].run(call)
    assert result is out
    ((name, kw),) = fake_cudnn.calls
    assert name == "quant" and fake_cudnn.devices == [call.device]  # called with the operands' device current
    total = sum(sizes)
    f = FMT[fmt]

    # A: the first `total` rows of the quantized data, a view (no copy)
    assert kw["a_tensor"].data_ptr() == a.data.data_ptr()
    assert kw["a_tensor"].shape == (total, a.data.shape[1]) and kw["a_tensor"].stride() == (a.data.shape[1], 1)
    assert kw["a_tensor"].dtype == kw["b_tensor"].dtype == (FP4 if fmt == "nvfp4" else torch.float8_e4m3fn)
    # SFA: blocked 128x4 of the (total, K/block) compact scales == per-group blocked, concatenated (256-row groups)
    sf_dtype = torch.float8_e4m3fn if fmt == "nvfp4" else torch.float8_e8m0fnu
    assert kw["sfa_tensor"].dtype == sf_dtype and kw["sfa_tensor"].dim() == 1
    compact = a.scale[:total]
    assert byte_equal(kw["sfa_tensor"], to_blocked(compact))
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    per_group = torch.cat([to_blocked(compact[s : s + m]).reshape(-1) for s, m in zip(starts, sizes)])
    assert byte_equal(kw["sfa_tensor"], per_group)
    # B: the weight data itself (contiguous (G, rows, cols)), SFB: one blocked matrix per expert
    assert kw["b_tensor"].data_ptr() == b.data.data_ptr() and kw["b_tensor"].is_contiguous()
    assert byte_equal(kw["sfb_tensor"], torch.stack([to_blocked(s) for s in b.scale.unbind(0)]))
    assert kw["sfb_tensor"].shape == (len(sizes), blocked_numel(b.data.shape[1], b.scale.shape[2]))
    # offsets: int32 end offsets, 16-byte aligned, from one bulk allocation
    check_offsets(fake_cudnn, kw["padded_offsets"], sizes)
    # alpha: 1 for MXFP8, 1/(S_a[g] S_b[g]) for NVFP4
    if fmt == "nvfp4":
        expected = (1.0 / (a.global_scale.double() * b.global_scale.double())).float()
    else:
        expected = torch.ones(len(sizes))
    assert kw["alpha_tensor"].dtype == torch.float32 and torch.equal(kw["alpha_tensor"], expected)
    # d_tensor IS the caller's buffer (its first `total` rows)
    d = kw["d_tensor"]
    assert d.data_ptr() == out.data_ptr() and d.stride() == out.stride() and d.shape == (total, n_out)
    assert d._base is out or d._base is out._base
    assert kw["d_dtype"] == torch.bfloat16 and kw["sf_vec_size"] == f.block_size
    assert kw["b_major"] == "k" and kw["cd_major"] == "n" and kw["generate_amax"] is False
    # what cuDNN computes from these arguments is the reference result; rows past the total untouched
    check_bf16_close(out[:total], ref[:total])
    assert torch.equal(out[total:], before[total:])


def test_nvfp4_fp32_output_and_new_buffer(fake_cudnn, gen):
    fmt = "nvfp4"  # (MXFP8 has no fp32 D in cuDNN frontend: refused by problem kind, see above)
    a, b, sizes, m_total, _ = forward_case(gen, fmt, extra_rows=0)
    call = simulate(prepare(a, b, sizes, offsets=None, layout="forward", out=None, accumulate=False,
                            out_dtype=torch.float32))
    y = BACKENDS["cudnn"].run(call)
    ((_, kw),) = fake_cudnn.calls
    assert y.dtype == torch.float32 and kw["d_dtype"] == torch.float32 and kw["d_tensor"].data_ptr() == y.data_ptr()
    ref = grouped.gemm(a, b, sizes, out_dtype=torch.float32, backend="reference")
    assert (y.double() - ref.double()).norm() <= 1e-5 * ref.double().norm()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["forward", "dgrad"])
def test_grouped_tensor_weight_is_passed_without_copy(fake_cudnn, gen, fmt, layout):
    groups, n, k = 2, 64, 96
    sizes = sizes_of(gen, groups, 256)
    w = rand(gen, groups, n, k, scale=0.5)
    gt = grouped.GroupedTensor([(n, k)] * groups, fmt, rowwise=True, columnwise=True)
    gt.quantize_(list(w.unbind(0)))
    width = k if layout == "forward" else n
    x = grouped.quantize(rand(gen, sum(sizes), width), fmt, split_sizes=sizes)
    call = simulate(prepare(x, gt, sizes, offsets=None, layout=layout, out=None, accumulate=False, out_dtype=None))
    y = BACKENDS["cudnn"].run(call)
    ((_, kw),) = fake_cudnn.calls
    members = gt.split(columnwise=layout == "dgrad")
    base = gt.data if layout == "forward" else gt.columnwise_data
    assert kw["b_tensor"].data_ptr() == base.data_ptr()
    assert torch.equal(kw["b_tensor"].view(torch.uint8), torch.stack([q.data.view(torch.uint8) for q in members]))
    assert byte_equal(kw["sfb_tensor"], torch.stack([to_blocked(q.scale) for q in members]))
    if fmt == "nvfp4":
        assert torch.equal(kw["alpha_tensor"], (1 / (x.global_scale.double() * gt.global_scale.double())).float())
    check_bf16_close(y, grouped.gemm(x, gt, sizes, layout=layout, backend="reference"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_blocked_scales_pass_through(fake_cudnn, gen, fmt):
    a, b, sizes, m_total, ref = forward_case(gen, fmt, extra_rows=0)
    a_blk, b_blk = a.with_layout("blocked"), b.with_layout("blocked")
    call = simulate(prepare(a_blk, b_blk, sizes, offsets=None, layout="forward", out=None, accumulate=False,
                            out_dtype=None))
    y = BACKENDS["cudnn"].run(call)
    ((_, kw),) = fake_cudnn.calls
    assert kw["sfa_tensor"].data_ptr() == a_blk.scale.data_ptr()  # no copy
    assert kw["sfb_tensor"].data_ptr() == b_blk.scale.data_ptr()
    check_bf16_close(y, ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nvfp4_scalar_tensor_scale(fake_cudnn, gen, fmt):
    sizes = [256, 0, 512]
    x = rand(gen, 768, 64)
    a = grouped.quantize(x, fmt)  # no split sizes: one tensor scale for all rows
    b = grouped.quantize(rand(gen, 3, 64, 64), fmt)
    call = simulate(prepare(a, b, sizes, offsets=None, layout="forward", out=None, accumulate=False, out_dtype=None))
    y = BACKENDS["cudnn"].run(call)
    ((_, kw),) = fake_cudnn.calls
    if fmt == "nvfp4":
        assert a.global_scale.dim() == 0
        assert torch.equal(kw["alpha_tensor"], (1 / (a.global_scale.double() * b.global_scale.double())).float())
    check_bf16_close(y, grouped.gemm(a, b, sizes, backend="reference"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["forward", "dgrad"])
def test_token_rule_refused_not_padded(fake_cudnn, gen, fmt, layout, monkeypatch):
    groups, n, k = 3, 64, 64
    sizes = [256, 100, 156]  # sums to 512, but two experts break the 256 rule
    x = rand(gen, 512, k if layout == "forward" else n)
    a = grouped.quantize(x, fmt, split_sizes=sizes)
    b = grouped.quantize(rand(gen, groups, n, k), fmt, axis=-1 if layout == "forward" else 1)
    out = rand(gen, 512, n if layout == "forward" else k)
    before = out.clone()
    call = simulate(prepare(a, b, sizes, offsets=None, layout=layout, out=out, accumulate=False, out_dtype=None))
    check_refused(call, r"multiple of 256.*expert 1: 100, expert 2: 156.*refuses rather than padding.*"
                  r"padded_split_sizes", monkeypatch)
    assert fake_cudnn.calls == []
    assert torch.equal(out, before)  # left byte-for-byte unchanged


@pytest.mark.parametrize("fmt", FORMATS)
def test_strided_caller_buffer_refused_not_copied(fake_cudnn, gen, fmt, monkeypatch):
    a, b, sizes, m_total, _ = forward_case(gen, fmt, extra_rows=0, n=64)
    big = rand(gen, m_total, 96)
    out = big[:, :64]  # a strided view: row stride 96 != N
    before = big.clone()
    call = simulate(prepare(a, b, sizes, offsets=None, layout="forward", out=out, accumulate=False, out_dtype=None))
    check_refused(call, r"stride \(64, 1\).*\(96, 1\).*refused rather than copied", monkeypatch)
    assert fake_cudnn.calls == [] and torch.equal(big, before)


def test_too_many_experts_refused(fake_cudnn, gen, monkeypatch):
    groups = 1025
    b = grouped.quantize(rand(gen, groups, 32, 32), "mxfp8")
    sizes = [0] * groups
    sizes[3] = 256
    a = grouped.quantize(rand(gen, 256, 32), "mxfp8", split_sizes=sizes)
    call = simulate(prepare(a, b, sizes, offsets=None, layout="forward", out=None, accumulate=False, out_dtype=None))
    check_refused(call, "at most 1024 experts", monkeypatch)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_split_sizes_path(fake_cudnn, gen, fmt):
    """Split sizes on the device: offsets from them without a sync, the rule as a device-side assertion."""
    a, b, sizes, m_total, ref = forward_case(gen, fmt, extra_rows=0)
    out = torch.zeros(m_total, ref.shape[1], dtype=torch.bfloat16)
    call = simulate(prepare(a, b, sizes, offsets=None, layout="forward", out=out, accumulate=False, out_dtype=None))
    counts = torch.tensor(sizes, dtype=torch.int32)
    dev = with_gpu_counts(call, counts)
    kw = cb.forward_arguments(dev, out)
    assert kw["a_tensor"].shape[0] == m_total and kw["d_tensor"].shape[0] == m_total  # all rows (no host total)
    assert kw["padded_offsets"].tolist() == torch.cumsum(counts, 0).tolist()
    assert kw["padded_offsets"].data_ptr() % 16 == 0
    # end offsets given instead of sizes
    given_ends = torch.cumsum(counts, 0).to(torch.int64)
    ends = dataclasses.replace(call, splits=Splits(call.num_groups, call.device, ends=given_ends))
    assert torch.equal(cb.forward_arguments(ends, out)["padded_offsets"], kw["padded_offsets"])
    # a count that breaks the rule trips the device-side assertion (on a GPU: a broken CUDA context), and the
    # explanation says so
    assert BACKENDS["cudnn"].accepts(dev) is None
    assert "device-side assert" in BACKENDS["cudnn"].note(dataclasses.replace(dev.problem, device_splits=True))
    bad = with_gpu_counts(call, torch.tensor([128] + sizes[1:-1] + [sizes[-1] + 128]))
    with pytest.raises(RuntimeError, match="multiple of 256"):
        cb.forward_arguments(bad, out)
    # with GPU sizes the whole token tensor goes in: its row count must be a multiple of 256
    a2, b2, sizes2, m2, _ = forward_case(gen, fmt, extra_rows=5)
    c2 = simulate(prepare(a2, b2, sizes2, offsets=None, layout="forward", out=None, accumulate=False, out_dtype=None))
    c2 = with_gpu_counts(c2, torch.tensor(sizes2))
    assert re.search(f"multiple of 256; got {m2} rows", BACKENDS["cudnn"].accepts(c2))


def test_zero_tokens_calls_nothing(fake_cudnn, gen):
    a = grouped.quantize(rand(gen, 300, 64), "mxfp8", split_sizes=[0, 0])
    b = grouped.quantize(rand(gen, 2, 64, 64), "mxfp8")
    out = rand(gen, 300, 64)
    before = out.clone()
    call = simulate(prepare(a, b, [0, 0], offsets=None, layout="forward", out=out, accumulate=False, out_dtype=None))
    assert BACKENDS["cudnn"].run(call) is out
    assert fake_cudnn.calls == [] and torch.equal(out, before)


# ---- wgrad arguments ------------------------------------------------------------------------------------


def wgrad_case(gen, fmt, *, groups=3, n=160, k=64, extra_rows=11):
    sizes = sizes_of(gen, groups, 128, max_blocks=3)
    m_total = sum(sizes) + extra_rows
    dy, x = rand(gen, m_total, n), rand(gen, m_total, k)
    qdy = grouped.quantize(dy, fmt, axis=0, split_sizes=sizes)
    qx = grouped.quantize(x, fmt, axis=0, split_sizes=sizes)
    return qdy, qx, sizes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_wgrad_arguments_exact(fake_cudnn, gen, fmt, accumulate):
    qdy, qx, sizes = wgrad_case(gen, fmt)
    groups, n, k = len(sizes), qdy.shape[1], qx.shape[1]
    storage = torch.randn(groups, n, k + 16, generator=gen)
    out = storage[:, :, :k]  # a strided view into a bigger buffer: fine for wgrad_tensor
    before, storage_before = out.clone(), storage.clone()
    call = simulate(prepare(qdy, qx, sizes, offsets=None, layout="wgrad", out=out, accumulate=accumulate,
                            out_dtype=torch.float32))
    assert selector.decide(call.problem).backend == "cudnn"
    assert BACKENDS["cudnn"].run(call) is out
    ((name, kw),) = fake_cudnn.calls
    assert name == "wgrad" and fake_cudnn.devices == [call.device]
    # a TMA-descriptor workspace of its own, of the size the frontend asks for (not the one shared by a shape)
    workspace = kw["descriptor_workspace"]
    assert workspace.dtype == torch.uint8
    assert workspace.numel() == fake_cudnn.get_grouped_gemm_wgrad_workspace_size_sm100(groups)
    assert workspace.device == call.device
    f = FMT[fmt]
    # A = dY^T (hidden N, tokens) and B = X (tokens, K): views of the columnwise data, token innermost
    assert kw["a_tensor"].data_ptr() == qdy.data.data_ptr() and kw["a_tensor"].stride() == (qdy.data.shape[1], 1)
    assert kw["b_tensor"].data_ptr() == qx.data.data_ptr() and kw["b_tensor"].stride() == (1, qx.data.shape[1])
    assert kw["b_tensor"].shape == (qx.data.shape[1], k)
    # scales: each expert's token range in its own blocked matrix, concatenated (NOT one blocked matrix)
    starts = [sum(sizes[:g]) // f.block_size for g in range(groups)]
    for key, q in (("sfa_tensor", qdy), ("sfb_tensor", qx)):
        expected = torch.cat([to_blocked(q.scale[:, s : s + m // f.block_size]).reshape(-1)
                              for s, m in zip(starts, sizes)])
        assert byte_equal(kw[key], expected)
        assert kw[key].dtype == (torch.float8_e4m3fn if fmt == "nvfp4" else torch.float8_e8m0fnu)
    if n > 128 and sum(1 for m in sizes if m) > 1:  # two row tiles, two experts: not one blocked matrix
        assert not byte_equal(kw["sfa_tensor"], to_blocked(qdy.scale).reshape(-1))
    check_offsets(fake_cudnn, kw["offsets_tensor"], sizes)
    if fmt == "nvfp4":
        assert torch.equal(kw["global_scale_a"], 1 / qdy.global_scale)
        assert torch.equal(kw["global_scale_b"], 1 / qx.global_scale)
    else:
        assert kw["global_scale_a"] is None and kw["global_scale_b"] is None
    w = kw["wgrad_tensor"]
    assert w is out and w.data_ptr() == out.data_ptr() and w.stride() == out.stride()
    assert kw["wgrad_dtype"] == torch.float32 and kw["sf_vec_size"] == f.block_size
    assert kw["accumulate_on_output"] is accumulate and kw["output_mode"] == "dense"
    ref = grouped.gemm(qdy, qx, sizes, layout="wgrad", out_dtype=torch.float32, backend="reference").double()
    if accumulate:
        ref = ref + before.double()
    assert (out.double() - ref).norm() <= 1e-5 * ref.norm()
    assert torch.equal(storage[:, :, k:], storage_before[:, :, k:])  # columns outside the view untouched


@pytest.mark.parametrize("fmt", FORMATS)
def test_wgrad_token_rule_refused(fake_cudnn, gen, fmt, monkeypatch):
    sizes = [128, 64, 64]
    dy, x = rand(gen, 256, 64), rand(gen, 256, 64)
    qdy = grouped.quantize(dy, fmt, axis=0, split_sizes=sizes)
    qx = grouped.quantize(x, fmt, axis=0, split_sizes=sizes)
    out = torch.zeros(3, 64, 64)
    call = simulate(prepare(qdy, qx, sizes, offsets=None, layout="wgrad", out=out, accumulate=True,
                            out_dtype=torch.float32))
    check_refused(call, r"multiple of 128.*expert 1: 64, expert 2: 64", monkeypatch)
    # with the call's split sizes on the GPU the rule is read off the quantized operands' host sizes
    check_refused(with_gpu_counts(call, torch.tensor(sizes)),
                  r"multiple of 128.*expert 1: 64", monkeypatch)
    assert fake_cudnn.calls == [] and torch.equal(out, torch.zeros(3, 64, 64))


@pytest.mark.parametrize("accumulate", [False, True])
def test_wgrad_no_tokens(fake_cudnn, gen, accumulate):
    qdy = grouped.quantize(rand(gen, 40, 64), "nvfp4", axis=0, split_sizes=[0, 0])
    qx = grouped.quantize(rand(gen, 40, 32), "nvfp4", axis=0, split_sizes=[0, 0])
    out = torch.randn(2, 64, 32, generator=gen)
    before = out.clone()
    call = simulate(prepare(qdy, qx, [0, 0], offsets=None, layout="wgrad", out=out, accumulate=accumulate,
                            out_dtype=torch.float32))
    BACKENDS["cudnn"].run(call)
    assert fake_cudnn.calls == []
    assert torch.equal(out, before if accumulate else torch.zeros_like(out))


def test_wgrad_workspace_per_call(fake_cudnn, gen):
    """Two wgrad calls of the same shapes each get their own descriptor workspace (two streams would
    otherwise race on the frontend's one)."""
    qdy, qx, sizes = wgrad_case(gen, "nvfp4")
    call = simulate(prepare(qdy, qx, sizes, offsets=None, layout="wgrad", out=None, accumulate=False,
                            out_dtype=torch.float32))
    keep = []
    for _ in range(2):
        BACKENDS["cudnn"].run(call)
        keep.append(fake_cudnn.calls[-1][1]["descriptor_workspace"])  # held, so the allocator cannot reuse it
    assert keep[0].data_ptr() != keep[1].data_ptr()


def test_wgrad_gpu_split_sizes(fake_cudnn, gen):
    qdy, qx, sizes = wgrad_case(gen, "mxfp8")
    call = simulate(prepare(qdy, qx, sizes, offsets=None, layout="wgrad", out=None, accumulate=False,
                            out_dtype=torch.float32))
    dev = with_gpu_counts(call, torch.tensor(sizes))
    kw = cb.wgrad_arguments(dev)
    assert kw["offsets_tensor"].tolist() == torch.cumsum(torch.tensor(sizes), 0).tolist()


def test_run_without_wrapper_names_the_version(monkeypatch, gen):
    monkeypatch.setattr(torch.cuda, "device", FakeDevice())
    old = types.ModuleType("cudnn")
    old.__spec__ = importlib.machinery.ModuleSpec("cudnn", None)
    old.__version__ = "1.10.0"
    monkeypatch.setitem(sys.modules, "cudnn", old)
    a, b, sizes, _, _ = forward_case(gen, "mxfp8", extra_rows=0)
    call = simulate(prepare(a, b, sizes, offsets=None, layout="forward", out=None, accumulate=False, out_dtype=None))
    missing = r"1\.10\.0 does not provide grouped_gemm_quant_wrapper_sm100.*>=1\.32,<1\.33"
    with pytest.raises(ImportError, match=missing):
        BACKENDS["cudnn"].run(call)


# ---- CUDA graph capture: a warm-up call per signature --------------------------------------------------


def capturing(call):
    """The same call, as if issued while the current stream is being captured into a CUDA graph."""
    return dataclasses.replace(call, problem=dataclasses.replace(call.problem, capturing=True, device_splits=True))


def test_capture_needs_a_warm_up_call(fake_cudnn, gen, monkeypatch):
    """The frontend's first call of a signature compiles, allocates and (wgrad) reads offsets on the host: under
    capture a signature that has not run yet is refused with what to do, before anything runs or is written."""
    x, w = rand(gen, 768, 64), rand(gen, 2, 128, 64)
    sizes, b = [512, 256], grouped.quantize(w, "nvfp4")
    out = torch.full((768, 128), 3.0, dtype=torch.bfloat16)
    call = simulate(prepare(grouped.quantize(x, "nvfp4", split_sizes=sizes), b, sizes, offsets=None,
                            layout="forward", out=out, accumulate=False, out_dtype=None))
    cold = BACKENDS["cudnn"].accepts(capturing(call))
    assert "CUDA graph capture" in cold and "once outside capture first" in cold
    with pytest.raises(ValueError, match="once outside capture first"):  # reference is not graph-safe either
        selector.choose(capturing(call))
    assert fake_cudnn.calls == [] and torch.all(out == 3.0)
    assert "graph capture" in BACKENDS["cudnn"].note(call.problem)

    BACKENDS["cudnn"].run(call)  # the warm-up, outside capture
    assert BACKENDS["cudnn"].accepts(capturing(call)) is None
    assert selector.choose(capturing(call)).backend == "cudnn"
    # another signature (here: another token total) needs its own warm-up; wgrad and the fused path have theirs
    fewer = [256, 256]
    other = simulate(prepare(grouped.quantize(x, "nvfp4", split_sizes=fewer), b, fewer, offsets=None,
                             layout="forward", out=out, accumulate=False, out_dtype=None))
    assert "once outside capture first" in BACKENDS["cudnn"].accepts(capturing(other))
    assert "once outside capture first" in BACKENDS["cudnn"].swiglu_refusal(capturing(call), None, torch.bfloat16)


def test_capture_of_wgrad_and_fused_after_warm_up(fake_cudnn, simulated_sm100, gen, monkeypatch):
    qdy, qx, sizes = wgrad_case(gen, "mxfp8")
    main_grad = torch.zeros(len(sizes), qdy.shape[1], qx.shape[1])
    call = simulate(prepare(qdy, qx, sizes, offsets=None, layout="wgrad", out=main_grad, accumulate=True,
                            out_dtype=torch.float32))
    assert "once outside capture first" in BACKENDS["cudnn"].accepts(capturing(call))
    BACKENDS["cudnn"].run(call)
    assert BACKENDS["cudnn"].accepts(capturing(call)) is None

    x, w = rand(gen, 512, 64), rand(gen, 2, 128, 64)
    a, b = grouped.quantize(x, "nvfp4", split_sizes=[256, 256]), grouped.quantize(w, "nvfp4")
    real_prepare = fused.prepare
    monkeypatch.setattr(fused, "prepare", lambda *args, **kw: capturing(simulate(real_prepare(*args, **kw))))
    with pytest.raises(ValueError, match="once outside capture first"):  # not fusable yet, and FC1 alone is cold
        fused.explain_swiglu(a, b, [256, 256])
    monkeypatch.setattr(fused, "prepare", lambda *args, **kw: simulate(real_prepare(*args, **kw)))
    fused.gemm_swiglu(a, b, [256, 256])
    monkeypatch.setattr(fused, "prepare", lambda *args, **kw: capturing(simulate(real_prepare(*args, **kw))))
    assert fused.explain_swiglu(a, b, [256, 256]).fused


# ---- padded dispatch ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("multiple", [256, 128])
def test_padded_split_sizes(gen, as_tensor, multiple):
    sizes = [int(m) for m in torch.randint(0, 700, (5,), generator=gen)]
    sizes[2] = 0
    rows = sum(sizes) + 13
    given = torch.tensor(sizes, dtype=torch.int32) if as_tensor else sizes
    padded, index, padded_rows = cb.padded_split_sizes(given, multiple, rows)
    expected = [-(-m // multiple) * multiple for m in sizes]
    if as_tensor:
        assert padded.dtype == torch.int32 and padded.tolist() == expected
    else:
        assert padded == expected
    assert padded_rows % multiple == 0 and padded_rows >= sum(expected) + 13
    assert index.dtype == torch.int64 and index.shape == (rows,)
    assert len(set(index.tolist())) == rows and int(index.max()) < padded_rows  # one distinct row each
    start, pstart = 0, 0
    for m, p in zip(sizes, expected):  # each expert's rows land, in order, at the start of its padded range
        assert index[start : start + m].tolist() == list(range(pstart, pstart + m))
        start, pstart = start + m, pstart + p
    assert index[start:].tolist() == list(range(pstart, pstart + 13))  # rows past the total keep their order


@pytest.mark.parametrize("fmt", FORMATS)
def test_padded_dispatch_serves_any_split(fake_cudnn, gen, fmt):
    """Sizes that break the token rule, padded with padded_split_sizes: cudnn accepts the padded calls, and the
    forward result read back through row_index and the wgrad result equal the unpadded reference."""
    sizes, n, k = [100, 0, 300], 64, 64
    rows = sum(sizes)
    x, w, dy = rand(gen, rows, k), rand(gen, 3, n, k, scale=0.5), rand(gen, rows, n)
    fwd = cb.padded_split_sizes(sizes, cb.token_multiple("forward"), rows)
    xp = x.new_zeros(fwd.rows, k)
    xp[fwd.row_index] = x
    ap, b = grouped.quantize(xp, fmt, split_sizes=fwd.split_sizes), grouped.quantize(w, fmt)
    call = simulate(prepare(ap, b, fwd.split_sizes, offsets=None, layout="forward", out=None, accumulate=False,
                            out_dtype=None))
    assert BACKENDS["cudnn"].accepts(call) is None
    y = BACKENDS["cudnn"].run(call)[fwd.row_index]
    a = grouped.quantize(x, fmt, split_sizes=sizes)
    check_bf16_close(y, grouped.gemm(a, b, sizes, backend="reference"))

    wg = cb.padded_split_sizes(sizes, cb.token_multiple("wgrad"), rows)
    dyp, xp = dy.new_zeros(wg.rows, n), x.new_zeros(wg.rows, k)
    dyp[wg.row_index], xp[wg.row_index] = dy, x
    qdy, qx = (grouped.quantize(t, fmt, axis=0, split_sizes=wg.split_sizes) for t in (dyp, xp))
    call = simulate(prepare(qdy, qx, wg.split_sizes, offsets=None, layout="wgrad", out=None, accumulate=False,
                            out_dtype=torch.float32))
    assert BACKENDS["cudnn"].accepts(call) is None
    dw = BACKENDS["cudnn"].run(call).double()
    ref = grouped.gemm(*(grouped.quantize(t, fmt, axis=0, split_sizes=sizes) for t in (dy, x)), sizes,
                       layout="wgrad", out_dtype=torch.float32, backend="reference").double()
    assert (dw - ref).norm() <= 1e-5 * ref.norm()


def test_padded_split_sizes_bad_input():
    with pytest.raises(ValueError, match="multiple must be a positive int"):
        cb.padded_split_sizes([1, 2], 0, 3)
    with pytest.raises(ValueError, match="past the 3 rows"):
        cb.padded_split_sizes([2, 2], 256, 3)
    with pytest.raises(ValueError, match="one count an expert"):
        cb.padded_split_sizes(torch.zeros(2, 2, dtype=torch.int64), 256, 3)
    with pytest.raises(ValueError, match="int32/int64 tensor"):
        cb.padded_split_sizes(torch.ones(2), 256, 3)


# ---- gemm_swiglu -------------------------------------------------------------------------------------------


def swiglu_ref(h: torch.Tensor, probs) -> torch.Tensor:
    h = h.double()
    f = h.shape[1] // 2
    act = F.silu(h[:, :f]) * h[:, f:]
    return act if probs is None else act * probs.double().unsqueeze(1)


@pytest.mark.parametrize("fmt", ["bf16", *FORMATS])
@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("with_out", [False, True])
def test_gemm_swiglu_unfused_cpu(gen, fmt, with_probs, with_out):
    selector.clear_cache()
    groups, f, k = 3, 32, 64
    sizes = [int(s) for s in torch.randint(0, 40, (groups,), generator=gen)]
    m = sum(sizes) + 9
    x, w = rand(gen, m, k), rand(gen, groups, 2 * f, k, scale=0.5)
    a = x if fmt == "bf16" else grouped.quantize(x, fmt, split_sizes=sizes)
    b = w if fmt == "bf16" else grouped.quantize(w, fmt)
    probs = torch.rand(m, generator=gen) if with_probs else None
    out = torch.full((m, f), 3.0, dtype=torch.bfloat16) if with_out else None
    explanation = fused.explain_swiglu(a, b, sizes, probs, out=out)
    assert explanation.fused is False and "no fused" in explanation.why and "unfused" in str(explanation)
    y = fused.gemm_swiglu(a, b, sizes, probs, out=out)
    if with_out:
        assert y is out
    total = sum(sizes)
    h = grouped.gemm(a, b, sizes)  # the public entry, as the unfused path uses it (bf16 h)
    ref = swiglu_ref(h[:total], probs[:total] if with_probs else None)
    assert y.dtype == torch.bfloat16 and y.shape == (m, f)
    # the unfused path is grouped.gemm's bf16 h, then SwiGLU in fp32: within one bf16 rounding of the fp64 SwiGLU
    assert ((y[:total].double() - ref).abs() <= ref.abs() * 2**-8 * 1.01).all()
    # and against the fp64 reference of the whole thing (h not rounded)
    h64 = grouped.gemm(a, b, sizes, out_dtype=torch.float32, backend="reference")
    full = swiglu_ref(h64[:total], probs[:total] if with_probs else None)
    assert (y[:total].double() - full).norm() <= 1e-2 * full.norm()
    expected_tail = 3.0 if with_out else 0.0
    assert torch.all(y[total:] == expected_tail)


def test_gemm_swiglu_fp32_out_and_bad_input(gen):
    sizes = [5, 7]
    x, w = rand(gen, 12, 32), rand(gen, 2, 64, 32)
    out = torch.zeros(12, 32)
    y = fused.gemm_swiglu(x, w, sizes, out=out)
    assert y is out
    h = grouped.gemm(x, w, sizes)
    assert torch.allclose(out.double(), swiglu_ref(h, None), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        fused.gemm_swiglu(x, rand(gen, 2, 63, 32), sizes)
    with pytest.raises(ValueError, match="probs"):
        fused.gemm_swiglu(x, w, sizes, torch.ones(11))
    with pytest.raises(ValueError, match="out"):
        fused.gemm_swiglu(x, w, sizes, out=torch.zeros(12, 64))
    with pytest.raises(ValueError, match="bf16 or fp32"):
        fused.gemm_swiglu(x, w, sizes, out=torch.zeros(12, 32, dtype=torch.float16))


def test_gemm_swiglu_has_no_autograd_history(gen):
    """Forward only on every path, as under torch.compile: no input gets a partial gradient."""
    sizes = [5, 7]
    x, w = rand(gen, 12, 32).requires_grad_(), rand(gen, 2, 64, 32).requires_grad_()
    probs = torch.rand(12, generator=gen, requires_grad=True)
    y = fused.gemm_swiglu(x, w, sizes, probs)
    assert not y.requires_grad and y.grad_fn is None
    with torch.no_grad():
        assert torch.equal(fused.gemm_swiglu(x, w, sizes, probs), y)


@pytest.fixture
def simulated_sm100(monkeypatch):
    """Make grouped.fused see its operands as living on an sm100 GPU."""
    real = fused.prepare
    monkeypatch.setattr(fused, "prepare", lambda *a, **kw: simulate(real(*a, **kw)))


@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("extra_rows", [0, 21])
def test_gemm_swiglu_fused_on_simulated_sm100(fake_cudnn, simulated_sm100, gen, with_probs, extra_rows):
    fmt = "nvfp4"  # MXFP8 is not fused: see test_gemm_swiglu_falls_back_and_says_why
    groups, f, k = 3, 64, 64  # N = 128: a multiple of 64
    sizes = sizes_of(gen, groups, 256)
    total = sum(sizes)
    m = total + extra_rows
    x, w = rand(gen, m, k), rand(gen, groups, 2 * f, k, scale=0.5)
    a = grouped.quantize(x, fmt, split_sizes=sizes)
    b = grouped.quantize(w, fmt)
    probs = torch.rand(m, generator=gen) if with_probs else None
    explanation = fused.explain_swiglu(a, b, sizes, probs)
    assert explanation.fused is True and explanation.gemm.backend == "cudnn"
    assert "cudnn computes FC1 + SwiGLU" in explanation.why and "not run on Blackwell" in str(explanation)
    y = fused.gemm_swiglu(a, b, sizes, probs)
    ((name, kw),) = fake_cudnn.calls
    assert name == "glu" and fake_cudnn.devices == [torch.device("cpu")]  # run on the operands' device
    ((kernel),) = cb._glu_kernels.values()
    assert kernel.samples["act_func"] == "swiglu" and kernel.samples["sf_vec_size"] == FMT[fmt].block_size
    assert kernel.samples["sample_b"] is kw["b_tensor"] and fake_cudnn.glu_compiles == 1
    # D is the result's first rows (no copy); C, the pre-activation the kernel always stores, is scratch
    assert kw["d_tensor"].data_ptr() == y.data_ptr() and kw["d_tensor"].shape == (total, f)
    assert kw["c_tensor"].shape == (total, 2 * f) and kw["c_tensor"].dtype == torch.bfloat16
    # the weight rows are interleaved in 32-row gate/up blocks: 64j+c <- gate 32j+c, 64j+32+c <- up 32j+c
    perm = torch.tensor([h * f + 32 * j + c for j in range(f // 32) for h in (0, 1) for c in range(32)])
    assert torch.equal(cb.glu_interleave(2 * f), perm)
    assert torch.equal(kw["b_tensor"].view(torch.uint8), b.data[:, perm].view(torch.uint8))
    assert byte_equal(kw["sfb_tensor"], to_blocked(b.scale[:, perm]))
    assert kw["a_tensor"].data_ptr() == a.data.data_ptr() and kw["a_tensor"].shape[0] == total
    assert byte_equal(kw["sfa_tensor"], to_blocked(a.scale[:total]))
    check_offsets(fake_cudnn, kw["padded_offsets"], sizes)
    if fmt == "nvfp4":
        assert torch.equal(kw["alpha_tensor"], (1 / (a.global_scale.double() * b.global_scale.double())).float())
    if with_probs:
        assert torch.equal(kw["prob_tensor"], probs[:total].float()) and kw["prob_tensor"].is_contiguous()
    else:
        assert kw["prob_tensor"] is None
    # the result: the fp64 SwiGLU of the exact FC1 product, rows past the total zero
    h64 = grouped.gemm(a, b, sizes, out_dtype=torch.float32, backend="reference")
    ref = swiglu_ref(h64[:total], probs[:total] if with_probs else None)
    assert y.shape == (m, f) and y.dtype == torch.bfloat16
    check_bf16_close(y[:total], ref)
    assert torch.all(y[total:] == 0)
    # another token count runs the same compiled kernel
    fewer = [0] + sizes[1:]
    total = sum(fewer)
    a2 = grouped.quantize(x, fmt, split_sizes=fewer)
    h64 = grouped.gemm(a2, b, fewer, out_dtype=torch.float32, backend="reference")
    ref = swiglu_ref(h64[:total], probs[:total] if with_probs else None)
    check_bf16_close(fused.gemm_swiglu(a2, b, fewer, probs)[:total], ref)
    assert fake_cudnn.glu_compiles == 1 and len(fake_cudnn.calls) == 2


def test_gemm_swiglu_fused_into_out(fake_cudnn, simulated_sm100, gen):
    fmt, sizes = "nvfp4", [256, 256]
    x, w = rand(gen, 520, 64), rand(gen, 2, 128, 64, scale=0.5)
    a, b = grouped.quantize(x, fmt, split_sizes=sizes), grouped.quantize(w, fmt)
    out = torch.full((520, 64), 5.0, dtype=torch.bfloat16)
    assert fused.gemm_swiglu(a, b, sizes, out=out) is out
    ((_, kw),) = fake_cudnn.calls
    assert kw["d_tensor"].data_ptr() == out.data_ptr() and kw["d_tensor"].shape == (512, 64)  # D is out: no copy
    h64 = grouped.gemm(a, b, sizes, out_dtype=torch.float32, backend="reference")
    check_bf16_close(out[:512], swiglu_ref(h64[:512], None))
    assert torch.all(out[512:] == 5.0)
    # a strided out: the kernel writes a dense result, copied into out's rows up to the split total
    big = torch.full((520, 96), 7.0, dtype=torch.bfloat16)
    assert fused.gemm_swiglu(a, b, sizes, out=big[:, :64]) is not None
    assert torch.equal(big[:512, :64], out[:512]) and torch.all(big[512:] == 7.0) and torch.all(big[:, 64:] == 7.0)


@pytest.mark.parametrize(
    "case, match",
    [
        ("n_not_64", "multiple of 64"),
        ("tokens", "multiple of 256"),
        ("fp32_out", "fp32|bf16"),
        ("forced_reference", "goes to reference.*no fused"),
        ("mxfp8", "FP8 inputs.*block-scaled D"),
    ],
)
def test_gemm_swiglu_falls_back_and_says_why(fake_cudnn, simulated_sm100, gen, case, match):
    fmt, groups, f, k = ("mxfp8" if case == "mxfp8" else "nvfp4"), 2, 64, 64
    sizes = [256, 256]
    if case == "n_not_64":
        f = 48  # N = 96
    if case == "tokens":
        sizes = [300, 212]
    x, w = rand(gen, sum(sizes), k), rand(gen, groups, 2 * f, k, scale=0.5)
    a, b = grouped.quantize(x, fmt, split_sizes=sizes), grouped.quantize(w, fmt)
    out = torch.zeros(sum(sizes), f) if case == "fp32_out" else None
    backend = "reference" if case == "forced_reference" else None
    explanation = fused.explain_swiglu(a, b, sizes, out=out, backend=backend)
    assert explanation.fused is False
    assert re.search(match, explanation.why), explanation.why
    y = fused.gemm_swiglu(a, b, sizes, out=out, backend=backend)
    assert all(name != "glu" for name, _ in fake_cudnn.calls)
    h = grouped.gemm(a, b, sizes, backend="reference")
    ref = swiglu_ref(h, None)
    assert (y.double() - ref).abs().max() <= ref.abs().max() * 2**-7


# ---- the real cuDNN frontend on a GPU (tests/test_cudnn_frontend.py runs its checks on the CPU) -------------


def _real_case(kind, fmt):
    """(call, probs) on CUDA tensors, for the real cuDNN frontend."""
    gen = torch.Generator().manual_seed(1234)
    dev = torch.device("cuda")
    groups, n, k, sizes = 2, 128, 128, [256, 512]
    m = sum(sizes)
    if kind == "wgrad":
        dy, x = rand(gen, m, n).to(dev), rand(gen, m, k).to(dev)
        a = grouped.quantize(dy, fmt, axis=0, split_sizes=sizes)
        b = grouped.quantize(x, fmt, axis=0, split_sizes=sizes)
        call = prepare(a, b, sizes, offsets=None, layout="wgrad", out=torch.zeros(groups, n, k, device=dev),
                       accumulate=True, out_dtype=torch.float32)
        return call, None
    layout = "dgrad" if kind == "dgrad" else "forward"
    w = rand(gen, groups, n, k, scale=0.5).to(dev)
    x = rand(gen, m, k if layout == "forward" else n).to(dev)
    a = grouped.quantize(x, fmt, split_sizes=sizes)
    b = grouped.quantize(w, fmt, axis=-1 if layout == "forward" else 1)
    out = None if kind == "swiglu" else torch.zeros(m, n if layout == "forward" else k, dtype=torch.bfloat16,
                                                    device=dev)
    call = prepare(a, b, sizes, offsets=None, layout=layout, out=out, accumulate=False, out_dtype=None)
    probs = torch.rand(m, generator=gen).to(dev) if kind == "swiglu" else None
    return call, probs


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["forward", "dgrad", "wgrad", "swiglu"])
def test_real_cudnn_frontend_on_a_gpu(fmt, kind):
    """On sm100: run and match the reference. On another GPU: the real frontend checks every argument the
    adapter hands it, on the GPU's own device and stream, then refuses that GPU ("requires SM100+")."""
    pytest.importorskip("cudnn", reason="nvidia-cudnn-frontend is not installed")
    call, probs = _real_case(kind, fmt)
    if kind == "swiglu" and fmt == "mxfp8":  # not fused: see _glu_refusal
        assert "block-scaled D" in BACKENDS["cudnn"].swiglu_refusal(simulate(call), probs, torch.bfloat16)
        return
    if torch.cuda.get_device_capability()[0] == 10:  # a Blackwell GPU: the real thing
        sizes = list(call.splits.sizes)
        if kind == "swiglu":
            assert fused.explain_swiglu(call.a, call.b, sizes, probs).fused
            y = fused.gemm_swiglu(call.a, call.b, sizes, probs)
            h64 = grouped.gemm(call.a, call.b, sizes, out_dtype=torch.float32, backend="reference")
            check_bf16_close(y.cpu(), swiglu_ref(h64, probs).cpu())
            return
        y = BACKENDS["cudnn"].run(call)
        ref = grouped.gemm(call.a, call.b, sizes, layout=call.layout, backend="reference", out_dtype=y.dtype)
        if y.dtype == torch.bfloat16:
            check_bf16_close(y.cpu(), ref.cpu())
        else:
            assert (y.double() - ref.double()).norm() <= 1e-4 * ref.double().norm()
        return
    call = simulate(call)
    with pytest.raises(RuntimeError, match=r"requires SM100\+"):
        if kind == "swiglu":
            BACKENDS["cudnn"].run_swiglu(call, probs)
        else:
            BACKENDS["cudnn"].run(call)
