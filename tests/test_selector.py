"""Backend selection: explain(), environment variables, forced backends, the
decision log, simulated GPUs (Problem objects built by hand), caching."""

import dataclasses
import re
import sys

import pytest
import torch
from gemm_operands import layout_operands

import grouped
from grouped import kernels, selector
from grouped.problem import Problem
from grouped.quantize import kernel_facts

BACKEND_NAMES = ("reference", "cublas", "torch", "cute", "cudnn")
# Whether the cute kernels' packages are installed here: on a (simulated) Hopper GPU the cute
# BF16 kernel is then the first choice for many/small experts or GPU split sizes, else torch.
CUTE = kernels.unavailable("cuda", (9, 0)) is None
SM90_BF16 = "cute" if CUTE else "torch"


@pytest.fixture(autouse=True)
def _no_cudnn(monkeypatch):
    # These tests assume cuDNN frontend is absent (tests/test_cudnn.py covers it present).
    monkeypatch.setitem(sys.modules, "cudnn", None)


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _call(gen, fmt="bf16", layout="forward", sizes=(10, 0, 22), n=32, k=64):
    """(a, b, sizes) for a small call of the given format and layout."""
    sizes = list(sizes)
    m = sum(sizes) + 3
    x, dy, w = _rand(gen, m, k), _rand(gen, m, n), _rand(gen, len(sizes), n, k)
    return (*layout_operands(layout, fmt, x, dy, w, sizes), sizes)


def _problem(**kw) -> Problem:
    base = dict(
        fmt="bf16",
        layout="forward",
        device_type="cuda",
        capability=(9, 0),
        out_dtype=torch.bfloat16,
        accumulate=False,
        device_splits=False,
        capturing=False,
        caller_buffer=False,
        aligned=True,
        grouped_operands=False,
        large_experts=False,
    )
    base.update(kw)
    return Problem(**base)


# ----------------------------------------------------------------------------- explain on the CPU


@pytest.mark.parametrize("fmt", ["bf16", "mxfp8", "nvfp4"])
@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
def test_explain_on_cpu_picks_reference(fmt, layout, gen):
    a, b, sizes = _call(gen, fmt, layout)
    d = grouped.explain(a, b, sizes, layout=layout)
    assert d.backend == "reference"
    assert tuple(d.reasons) == BACKEND_NAMES
    assert d.reasons["reference"] is None
    for name in BACKEND_NAMES[1:]:
        assert isinstance(d.reasons[name], str) and d.reasons[name], name
    assert d.problem.fmt == fmt and d.problem.layout == layout and d.problem.device_type == "cpu"
    assert isinstance(d.why, str) and d.why
    text = str(d)
    for name in BACKEND_NAMES:
        assert name in text
    assert "reference" in text.splitlines()[0]
    assert fmt in text.splitlines()[0] and layout in text.splitlines()[0]
    # Every refusal is printed with its reason.
    for name in BACKEND_NAMES[1:]:
        assert d.reasons[name] in text


def test_explain_reasons_say_why_on_cpu(gen):
    a, b, sizes = _call(gen, "bf16")
    d = grouped.explain(a, b, sizes)
    assert "CUDA" in d.reasons["cublas"]
    assert "CUDA" in d.reasons["torch"]
    assert "sm90" in d.reasons["cute"]
    assert "bf16" in d.reasons["cudnn"]  # serves mxfp8/nvfp4 only


def test_explain_does_not_write_the_caller_buffer(gen):
    a, b, sizes = _call(gen, "bf16")
    out = torch.full((a.shape[0], b.shape[1]), float("nan"), dtype=torch.bfloat16)
    before = out.view(torch.int16).clone()
    d = grouped.explain(a, b, sizes, out=out)
    assert d.problem.caller_buffer
    assert torch.equal(out.view(torch.int16), before)


# ----------------------------------------------------------------------------- environment variables


def test_env_backend_reference(monkeypatch, gen):
    monkeypatch.setenv("GROUPED_BACKEND", "reference")
    a, b, sizes = _call(gen)
    d = grouped.explain(a, b, sizes)
    assert d.backend == "reference"
    assert "forced" in d.why and "GROUPED_BACKEND" in d.why
    out = grouped.gemm(a, b, sizes)
    assert torch.isfinite(out[: sum(sizes)].float()).all()


def test_env_backend_is_case_insensitive_and_auto(monkeypatch, gen):
    a, b, sizes = _call(gen)
    monkeypatch.setenv("GROUPED_BACKEND", "Reference")
    assert grouped.explain(a, b, sizes).backend == "reference"
    monkeypatch.setenv("GROUPED_BACKEND", "auto")
    d = grouped.explain(a, b, sizes)
    assert d.backend == "reference" and "forced" not in d.why


def test_env_cublas_on_cpu_falls_back(monkeypatch, gen):
    monkeypatch.setenv("GROUPED_BACKEND", "cublas")
    a, b, sizes = _call(gen)
    d = grouped.explain(a, b, sizes)
    assert d.backend == "reference"
    assert "cublas" in d.why and "cannot serve" in d.why and "CUDA" in d.why
    # The call runs (on the reference backend) and gives the reference's bits.
    got = grouped.gemm(a, b, sizes, out_dtype=torch.float32)
    want = grouped.gemm(a, b, sizes, out_dtype=torch.float32, backend="reference")
    total = sum(sizes)
    assert torch.equal(got[:total], want[:total])


@pytest.mark.parametrize("how", ["env", "argument"])
def test_strict_forced_backend_raises_with_reason(monkeypatch, gen, how):
    monkeypatch.setenv("GROUPED_STRICT", "1")
    a, b, sizes = _call(gen)
    kw = {}
    if how == "env":
        monkeypatch.setenv("GROUPED_BACKEND", "cublas")
    else:
        kw["backend"] = "cublas"
    with pytest.raises(ValueError, match=r"cublas.*CUDA"):
        grouped.explain(a, b, sizes, **kw)
    with pytest.raises(ValueError, match=r"cublas.*CUDA"):
        grouped.gemm(a, b, sizes, **kw)


def test_strict_with_servable_forced_backend_runs(monkeypatch, gen):
    monkeypatch.setenv("GROUPED_STRICT", "1")
    monkeypatch.setenv("GROUPED_BACKEND", "reference")
    a, b, sizes = _call(gen)
    assert grouped.explain(a, b, sizes).backend == "reference"
    grouped.gemm(a, b, sizes)


def test_per_format_variable_wins_over_global(monkeypatch, gen):
    monkeypatch.setenv("GROUPED_BACKEND", "cublas")
    monkeypatch.setenv("GROUPED_BACKEND_BF16", "reference")
    a, b, sizes = _call(gen)
    d = grouped.explain(a, b, sizes)
    assert d.backend == "reference"
    assert "forced" in d.why and "cublas" not in d.why
    # Strict would raise if GROUPED_BACKEND (cublas) were the one in force.
    monkeypatch.setenv("GROUPED_STRICT", "1")
    assert grouped.explain(a, b, sizes).backend == "reference"


def test_per_format_variable_only_affects_its_format(monkeypatch, gen):
    monkeypatch.setenv("GROUPED_BACKEND_BF16", "cublas")
    monkeypatch.setenv("GROUPED_STRICT", "1")
    a, b, sizes = _call(gen, "mxfp8")
    d = grouped.explain(a, b, sizes)  # mxfp8: not forced, so strict does not apply
    assert d.backend == "reference" and "forced" not in d.why


def test_per_format_variable_wins_on_simulated_gpu(monkeypatch):
    monkeypatch.setenv("GROUPED_BACKEND", "torch")
    monkeypatch.setenv("GROUPED_BACKEND_BF16", "cublas")
    assert selector.decide(_problem()).backend == "cublas"
    monkeypatch.setenv("GROUPED_BACKEND_BF16", "")  # empty = unset
    assert selector.decide(_problem()).backend == "torch"


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
def test_quantized_never_falls_back_to_bf16(monkeypatch, gen, fmt, layout):
    monkeypatch.setenv(f"GROUPED_BACKEND_{fmt.upper()}", "cublas")
    a, b, sizes = _call(gen, fmt, layout)
    d = grouped.explain(a, b, sizes, layout=layout)
    assert d.backend == "reference"
    assert d.reasons["cublas"] is not None and fmt in d.reasons["cublas"]
    assert "cublas" in d.why
    got = grouped.gemm(a, b, sizes, layout=layout, out_dtype=torch.float32)
    want = grouped.gemm(a, b, sizes, layout=layout, out_dtype=torch.float32, backend="reference")
    valid = slice(None) if layout == "wgrad" else slice(0, sum(sizes))
    assert torch.equal(got[valid], want[valid])
    selector.clear_cache()
    monkeypatch.setenv("GROUPED_STRICT", "1")
    with pytest.raises(ValueError, match=rf"cublas.*{fmt}"):
        grouped.gemm(a, b, sizes, layout=layout)


def test_quantized_on_simulated_gpu_never_picks_a_bf16_backend(monkeypatch):
    for fmt in ("mxfp8", "nvfp4"):
        for cap in ((9, 0), (10, 0), (8, 0), (12, 0)):
            monkeypatch.setenv("GROUPED_BACKEND", "torch")
            d = selector.decide(_problem(fmt=fmt, capability=cap))
            assert d.backend not in ("cublas", "torch"), (fmt, cap)
            assert d.reasons["torch"] is not None and d.reasons["cublas"] is not None


@pytest.mark.parametrize(
    "var, value, allowed",
    [
        ("GROUPED_BACKEND", "foo", r"auto, reference, cublas, torch, cute, cudnn"),
        ("GROUPED_BACKEND_BF16", "cuBLASLt", r"auto, reference, cublas, torch, cute, cudnn"),
        ("GROUPED_BACKEND_MXFP8", "fast", r"auto, reference, cublas, torch, cute, cudnn"),
        ("GROUPED_STRICT", "yes", r"0, 1"),
        ("GROUPED_LOG", "true", r"0, 1"),
    ],
)
def test_bad_env_value_raises_listing_allowed(monkeypatch, gen, var, value, allowed):
    monkeypatch.setenv(var, value)
    fmt = "mxfp8" if var.endswith("MXFP8") else "bf16"
    a, b, sizes = _call(gen, fmt)
    with pytest.raises(ValueError, match=re.escape(var)) as info:
        grouped.explain(a, b, sizes)
    assert re.search(allowed, str(info.value)), str(info.value)
    assert value in str(info.value)
    with pytest.raises(ValueError, match=re.escape(var)):
        grouped.gemm(a, b, sizes)


def test_bad_env_value_raises_even_after_a_cached_decision(monkeypatch, gen):
    a, b, sizes = _call(gen)
    grouped.explain(a, b, sizes)
    monkeypatch.setenv("GROUPED_BACKEND", "foo")
    with pytest.raises(ValueError, match="GROUPED_BACKEND"):
        grouped.explain(a, b, sizes)


def test_env_read_at_call_time(monkeypatch):
    p = _problem()
    assert selector.decide(p).backend == SM90_BF16
    monkeypatch.setenv("GROUPED_BACKEND", "cublas")
    assert selector.decide(p).backend == "cublas"
    monkeypatch.delenv("GROUPED_BACKEND")
    assert selector.decide(p).backend == SM90_BF16


# ----------------------------------------------------------------------------- GROUPED_LOG


def test_log_once_per_problem_kind(monkeypatch, capsys, gen):
    monkeypatch.setenv("GROUPED_LOG", "1")
    a, b, sizes = _call(gen)
    grouped.gemm(a, b, sizes)
    first = capsys.readouterr()
    assert first.out == ""
    lines = [line for line in first.err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "reference" in lines[0] and "forward" in lines[0] and "bf16" in lines[0]

    grouped.gemm(a, b, sizes)
    grouped.explain(a, b, sizes)
    assert capsys.readouterr().err == ""

    da, db, dsizes = _call(gen, "bf16", "dgrad")
    grouped.gemm(da, db, dsizes, layout="dgrad")
    again = capsys.readouterr().err
    assert len(again.splitlines()) == 1 and "dgrad" in again

    grouped.gemm(a, b, sizes, out_dtype=torch.float32)  # another problem kind: out dtype
    assert "float32" in capsys.readouterr().err


def test_no_log_without_the_variable(capsys, gen):
    a, b, sizes = _call(gen)
    grouped.gemm(a, b, sizes)
    assert capsys.readouterr().err == ""


def test_log_after_clear_cache_logs_again(monkeypatch, capsys, gen):
    monkeypatch.setenv("GROUPED_LOG", "1")
    a, b, sizes = _call(gen)
    grouped.explain(a, b, sizes)
    assert capsys.readouterr().err
    selector.clear_cache()
    grouped.explain(a, b, sizes)
    assert capsys.readouterr().err


# ----------------------------------------------------------------------------- backend= argument


def test_backend_argument_forces(gen):
    a, b, sizes = _call(gen)
    d = grouped.explain(a, b, sizes, backend="reference")
    assert d.backend == "reference" and "backend= argument" in d.why


def test_backend_argument_wins_over_environment(monkeypatch, gen):
    monkeypatch.setenv("GROUPED_BACKEND", "cublas")
    monkeypatch.setenv("GROUPED_STRICT", "1")
    a, b, sizes = _call(gen)
    d = grouped.explain(a, b, sizes, backend="reference")
    assert d.backend == "reference" and "backend= argument" in d.why


def test_backend_argument_that_cannot_serve_falls_back(gen):
    a, b, sizes = _call(gen, "nvfp4")
    d = grouped.explain(a, b, sizes, backend="torch")
    assert d.backend == "reference"
    assert "torch" in d.why and "cannot serve" in d.why


@pytest.mark.parametrize("name", ["foo", "CUBLAS_LT", ""])
def test_unknown_backend_argument_raises(gen, name):
    # "auto" is an environment value, not a backend name: the argument takes names only.
    a, b, sizes = _call(gen)
    with pytest.raises(ValueError, match=r"backend must be one of reference, cublas, torch, cute, cudnn"):
        grouped.explain(a, b, sizes, backend=name)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        grouped.gemm(a, b, sizes, backend=name)


# ----------------------------------------------------------------------------- simulated GPUs


def _first_servable(problem):
    reasons = {name: b.supports(problem) for name, b in grouped.backends.BACKENDS.items()}
    return next(name for name in selector.preference(problem) if reasons[name] is None)


@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
@pytest.mark.parametrize("cap", [(9, 0), (10, 0)])
@pytest.mark.parametrize("large_experts", [False, True])
def test_bf16_host_splits_follows_preference(layout, cap, large_experts):
    """Our cute kernel on Hopper when installed; otherwise the cuBLAS loop for a few large experts
    with host split sizes and torch._grouped_mm for the rest."""
    if cap == (9, 0) and CUTE:
        expected = "cute"
    else:
        expected = "cublas" if large_experts else "torch"
    p = _problem(layout=layout, capability=cap, large_experts=large_experts)
    d = selector.decide(p)
    assert tuple(d.reasons) == BACKEND_NAMES
    assert d.backend == _first_servable(p)
    order = selector.preference(p)
    assert d.backend in order
    for name in order[: order.index(d.backend)]:
        assert d.reasons[name] is not None  # everything preferred over it said why not
    assert d.reasons[d.backend] is None
    assert d.backend == expected
    assert d.reasons["cublas"] is None and d.reasons["reference"] is None
    assert "preference" in d.why


def test_sm90_bf16_prefers_cute():
    p = _problem()
    assert selector.preference(p)[:2] == ("cute", "torch")
    assert selector.preference(_problem(large_experts=True))[:2] == ("cute", "cublas")
    d = selector.decide(p)
    if CUTE:
        assert d.reasons["cute"] is None and d.backend == "cute"
    else:
        assert "not installed" in d.reasons["cute"]


@pytest.mark.parametrize("cap", [(9, 0), (10, 0)])
def test_graph_capture_with_device_splits_excludes_host_sync_backends(cap):
    p = _problem(capability=cap, capturing=True, device_splits=True)
    d = selector.decide(p)
    for name in ("cublas", "reference"):
        assert d.reasons[name] is not None and "graph" in d.reasons[name], name
    assert d.backend not in ("cublas", "reference")
    assert d.backend == (SM90_BF16 if cap == (9, 0) else "torch")
    assert grouped.backends.BACKENDS[d.backend].graph_safe


def test_graph_capture_with_host_splits_allows_cublas(monkeypatch):
    p = _problem(capturing=True, device_splits=False)
    d = selector.decide(p)
    assert d.reasons["cublas"] is None
    monkeypatch.setenv("GROUPED_BACKEND", "cublas")
    assert selector.decide(p).backend == "cublas"


def test_forced_cublas_under_capture_with_device_splits(monkeypatch):
    p = _problem(capturing=True, device_splits=True)
    monkeypatch.setenv("GROUPED_BACKEND", "cublas")
    d = selector.decide(p)
    assert d.backend == SM90_BF16 and "cublas" in d.why and "graph" in d.why
    monkeypatch.setenv("GROUPED_STRICT", "1")
    with pytest.raises(ValueError, match="graph"):
        selector.decide(p)


def test_device_splits_note_for_cublas(monkeypatch):
    monkeypatch.setenv("GROUPED_BACKEND", "cublas")
    d = selector.decide(_problem(device_splits=True))
    assert d.backend == "cublas" and d.note and "sync" in d.note


def test_torch_caller_buffer_note():
    d = selector.decide(_problem(caller_buffer=True), "torch")
    assert d.backend == "torch"
    assert d.note and "cop" in d.note  # "copies": not in place
    assert "note" in str(d)


def test_unaligned_bf16_on_sm90_goes_to_cublas():
    d = selector.decide(_problem(aligned=False))
    assert "aligned" in d.reasons["torch"]
    assert d.backend == "cublas"


@pytest.mark.parametrize("fmt, weight_only", [("mxfp8", False), ("nvfp4", False), ("nvfp4", True)])
def test_block_scaled_on_sm90_runs_cute_when_asked(fmt, weight_only):
    """Until their GPU tests have run, the sm90 block-scaled kernels serve when forced and come after
    the reference in the automatic order (grouped/selector.py)."""
    problem = _problem(fmt=fmt, capability=(9, 0), weight_only=weight_only)
    d = selector.decide(problem)
    assert d.backend == "reference" and selector.preference(problem) == ("reference", "cute")
    assert fmt in d.reasons["cublas"] and fmt in d.reasons["torch"]
    assert "Blackwell" in d.reasons["cudnn"]
    if weight_only:  # and on Blackwell cuDNN frontend cannot take a bf16 activation either
        on_sm100 = selector.decide(_problem(fmt=fmt, capability=(10, 0), weight_only=True))
        assert "bf16 activation" in on_sm100.reasons["cudnn"] or "not installed" in on_sm100.reasons["cudnn"]
    forced = selector.decide(problem, "cute")
    if d.reasons["cute"] is None:
        assert forced.backend == "cute" and forced.forced
    else:  # only without the CuTe DSL toolchain
        assert "not installed" in d.reasons["cute"]


@pytest.mark.parametrize("fmt, sizes, refused", [
    ("nvfp4", [3, 17], True),    # 16 + 32 tokens padded: rows of 24 bytes
    ("nvfp4", [16, 16], False),  # 32 tokens: rows of 16 bytes
    ("mxfp8", [3, 17], False),   # 32 + 32 tokens: rows of 64 bytes
])
def test_cute_refuses_stored_rows_tma_cannot_map(gen, fmt, sizes, refused):
    """wgrad's columnwise operands store the padded token count per row: NVFP4 with an odd number of
    16-token blocks gives rows TMA cannot step by; the cute backend says so instead of launching."""
    from grouped.backends import BACKENDS
    from grouped.problem import prepare

    m = sum(sizes)
    dy = grouped.quantize(torch.randn(m, 32, generator=gen), fmt, axis=0, split_sizes=sizes)
    x = grouped.quantize(torch.randn(m, 64, generator=gen), fmt, axis=0, split_sizes=sizes)
    call = prepare(dy, x, sizes, offsets=None, layout="wgrad", out=None, accumulate=False, out_dtype=None)
    reason = BACKENDS["cute"].accepts(call)
    assert (reason is not None and "TMA needs 16-byte aligned stored rows" in reason) == refused, reason


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_quantized_on_sm100(fmt):
    d = selector.decide(_problem(fmt=fmt, capability=(10, 0)))
    assert re.search(r"frontend|adapter", d.reasons["cudnn"])
    assert "sm90" in d.reasons["cute"]
    assert d.backend == "reference"
    assert selector.preference(d.problem)[0] == "cudnn"


def test_quantized_under_capture_with_device_splits():
    # On sm90 the cute kernels are graph-safe. Elsewhere (sm80) no kernel serves a quantized format
    # and the reference is not graph-safe: refuse, with reasons.
    for fmt in ("mxfp8", "nvfp4"):
        d = selector.decide(_problem(fmt=fmt, capturing=True, device_splits=True))
        assert d.backend == "cute" or "not installed" in d.reasons["cute"]
    with pytest.raises(ValueError, match=r"no backend can serve.*graph"):
        selector.decide(_problem(fmt="nvfp4", capturing=True, device_splits=True, capability=(8, 0)))


def test_sm80_bf16():
    d = selector.decide(_problem(capability=(8, 0)))
    assert "sm90" in d.reasons["torch"]
    assert "sm90" in d.reasons["cute"]
    assert d.backend == "cublas"


def test_other_arch_uses_generic_table():
    d = selector.decide(_problem(capability=(12, 0)))
    assert selector.preference(d.problem) == selector.preference(_problem(capability=(8, 6)))
    assert d.backend == "torch"


def test_cpu_problem():
    d = selector.decide(_problem(device_type="cpu", capability=None))
    assert d.backend == "reference"
    assert selector.preference(d.problem) == ("reference",)


def test_decision_str_lists_every_backend_and_the_problem():
    d = selector.decide(_problem(capturing=True, device_splits=True, caller_buffer=True))
    text = str(d)
    assert "sm90" in text and "graph capture" in text and "GPU split sizes" in text
    for name in BACKEND_NAMES:
        assert re.search(rf"^\s*\*?\s*{name}\b", text, re.M), name
    assert re.search(rf"^\s*\*\s*{d.backend}\b", text, re.M)  # the chosen one is marked


# ----------------------------------------------------------------------------- availability


def test_availability_cpu_structure():
    table = selector.availability("cpu", None)
    assert set(table) == {"bf16", "mxfp8", "nvfp4"}
    for fmt, row in table.items():
        assert tuple(row) == BACKEND_NAMES
        assert row["reference"] is None
        for name in BACKEND_NAMES[1:]:
            assert isinstance(row[name], str) and row[name], (fmt, name)
    assert "CUDA" in table["bf16"]["cublas"] and "CUDA" in table["bf16"]["torch"]
    assert "mxfp8" in table["mxfp8"]["cublas"] and "nvfp4" in table["nvfp4"]["torch"]
    assert "bf16" in table["bf16"]["cudnn"]


def test_availability_hopper():
    table = selector.availability("cuda", (9, 0))
    assert table["bf16"]["cublas"] is None and table["bf16"]["torch"] is None
    assert table["bf16"]["reference"] is None
    assert (table["bf16"]["cute"] is None) == CUTE
    assert (table["mxfp8"]["cute"] is None) == CUTE and "Blackwell" in table["mxfp8"]["cudnn"]
    assert (table["nvfp4"]["cute"] is None) == CUTE


def test_availability_cuda_unknown_capability():
    # A CUDA device of unknown capability: a reason for every arch-bound backend, no TypeError.
    table = selector.availability("cuda", None)
    assert table["bf16"]["reference"] is None and table["bf16"]["cublas"] is None
    for fmt, name in (("bf16", "torch"), ("bf16", "cute"), ("mxfp8", "cute"), ("mxfp8", "cudnn")):
        assert isinstance(table[fmt][name], str) and table[fmt][name], (fmt, name)


# ----------------------------------------------------------------------------- caching


def test_decision_cached_for_equal_problems():
    p1 = _problem(layout="dgrad")
    p2 = _problem(layout="dgrad")
    assert p1 == p2 and p1 is not p2
    d1 = selector.decide(p1)
    assert selector.decide(p2) is d1
    d3 = selector.decide(dataclasses.replace(p1, layout="wgrad"))
    assert d3 is not d1
    selector.clear_cache()
    assert selector.decide(p2) is not d1


def test_decision_cache_separates_forced_backends(monkeypatch):
    p = _problem()
    auto = selector.decide(p)
    forced = selector.decide(p, "cublas")
    assert forced is not auto and forced.backend == "cublas" and auto.backend == SM90_BF16
    assert selector.decide(p) is auto
    monkeypatch.setenv("GROUPED_BACKEND", "cublas")
    via_env = selector.decide(p)
    assert via_env.backend == "cublas" and via_env is not auto


def test_explain_cached_across_calls(gen):
    a, b, sizes = _call(gen)
    d1 = grouped.explain(a, b, sizes)
    a2, b2, _ = _call(gen)
    assert grouped.explain(a2, b2, sizes) is d1


# (layout, tokens, experts, m, n) -> the schedule the cute backend's BF16 GEMM picks on a 132-SM GPU
SM90_SCHEDULES = [
    (("forward", 32768, 8, 32768, 4096), (2, False)),  # 4096 rows an expert: clusters of two
    (("forward", 65536, 128, 65536, 1536), (1, False)),  # 512 rows an expert
    (("dgrad", 512, 64, 512, 7168), (1, True)),  # decode: 8 rows an expert
    (("wgrad", 65536, 128, 2048, 768), (1, True)),  # 64 output tiles an expert, fewer than the SMs
    (("wgrad", 65536, 128, 1536, 2048), (2, False)),  # 132 output tiles an expert
    (("wgrad", 512, 64, 4096, 7168), (1, True)),  # decode
]


@pytest.mark.parametrize("call, expected", SM90_SCHEDULES, ids=[f"{c[0]}-{c[1]}x{c[2]}" for c, _ in SM90_SCHEDULES])
def test_sm90_schedule_is_a_compiled_config(call, expected, monkeypatch):
    """schedule_for's rules, and every config they lead to is one CI compiles (configs_for_layouts)."""
    from cute_backend.sm90 import grouped_gemm as sm90

    monkeypatch.setattr(sm90, "sm_count", lambda device: 132)
    schedule = sm90.schedule_for(*call, torch.device("cuda"))
    assert schedule == expected
    layout = call[0]
    mxfp8 = kernel_facts(grouped.MXFP8)
    compiled = {spec.config for spec, _ in sm90.configs([mxfp8])}
    for fmt in (None, mxfp8):
        kinds = [(torch.bfloat16, False), (torch.float32, False)] + [(torch.float32, True)] * (layout == "wgrad")
        for out_dtype, accumulate in kinds:
            assert sm90._spec(sm90.config_for(layout, out_dtype, accumulate, *schedule, fmt)).config in compiled
