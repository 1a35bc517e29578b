"""Grouped GEMM benchmark: our backends and the peers, side by side, on one GPU.

    python scripts/bench.py                  # full run (H100/H200, ~4 min)
    python scripts/bench.py --quick          # one shape, uniform splits, forward only
    python scripts/bench.py --dry-run        # CPU, tiny shapes: checks the script's logic
    python scripts/bench.py --out DIR        # where results.json / table.txt / bench.png go
    python scripts/bench.py --mxfp8          # also our sm90 MXFP8 kernel, against our BF16 one

What it does, in order:
1. prints the GPU and torch version, then measures two ceilings in this run: the
   dense bf16 matmul rate (8192^3 torch.mm) and the device copy bandwidth (2 GB
   copy, bytes read + written);
2. for every shape x split (uniform, skewed) x layout (forward, dgrad, wgrad)
   checks each contender's output against the per-expert loop (normwise
   relative error), then times all of them with CUDA events in interleaved
   rounds, one call of each per round (L2 flushed before each, then the GPU
   kept busy ~200 us more, so each call is queued before its start event and
   its time is GPU time, not how fast its host code launches behind an idle
   GPU: that varies with the host and is reported apart, step 4), and reports
   each one's median over up to 20 rounds (~100 ms a contender): the GPU's
   clocks drift under sustained load, and interleaving makes every contender
   see the same drift instead of favouring whichever ran first;
3. contenders: our backends through ``grouped.gemm(..., backend=name)`` (each
   one whose explain() reason is None; ``reference`` only in --quick/--dry-run),
   and the peers ``torch._grouped_mm``,
   a per-expert torch.mm loop and quack's varlen GEMM; fp8 rowwise
   ``torch._scaled_grouped_mm`` is a speed reference row (forward only), not a peer;
   with --mxfp8, ``ours:cute mxfp8`` runs the same case on MXFP8 operands quantized beforehand
   (as GroupedLinear hands them over), checked against the per-expert loop on their dequantized
   values, and is reported against our BF16 kernel (xbf16);
4. metrics: TFLOP/s (2 * M_total * N * K), the floor time
   max(FLOPs / matmul rate, bytes / copy bandwidth) and the % of it achieved,
   and for our backends the speedup over the best peer (best peer ms / our ms,
   > 1 means ours is faster); then our host-side overhead per call;
5. writes results.json (after every case, then once more with the host overhead), table.txt
   and (if matplotlib imports) bench.png to --out, and ends with a compact summary.

Split sizes: the per-expert loop and our non-graph-safe backends (cublas,
reference) get host lists; torch._grouped_mm, quack and our graph-safe backends
get device offsets made before timing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grouped  # noqa: E402
from grouped.backends import BACKENDS  # noqa: E402

LAYOUTS = ("forward", "dgrad", "wgrad")
SPLITS = ("uniform", "skewed")
SEED = 1234
MAX_REPS = 20
MIN_REPS = 5
BUDGET_MS = 100.0  # per contender and case, after warmup
L2_FLUSH_BYTES = 256 << 20
# GPU cycles spun after the flush (~200 us at H100/H200 clocks): more than any contender's host
# time to its launch, which a call right after a synchronize pays with cold CPU caches
LAUNCH_COVER_CYCLES = 400_000
# normwise relative error vs the per-expert loop (MXFP8: the loop on its dequantized operands, exact in bf16)
ERR_LIMIT = {"bf16": 1e-2, "fp8": 0.1, "mxfp8": 1e-2}
OPERAND_BYTES = {"bf16": 2.0, "fp8": 1.0, "mxfp8": 1.0 + 1.0 / 32}  # a stored element, with its block scale
FP8_API_USED = [None]  # which fp8 grouped GEMM API worked, for the report


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    name: str
    experts: int
    tokens: int
    k: int
    n: int

    def scaled_for_dry_run(self) -> "Shape":
        return Shape(self.name, self.experts, max(64, self.tokens // 128), self.k // 32, self.n // 32)


SHAPES = (
    Shape("dsv3", 8, 32768, 7168, 4096),
    Shape("dsv3", 8, 32768, 2048, 7168),
    Shape("qwen3-30b", 128, 65536, 2048, 1536),
    Shape("qwen3-30b", 128, 65536, 768, 2048),
    Shape("mixtral", 8, 16384, 4096, 28672),
    Shape("mixtral", 8, 16384, 14336, 4096),
    Shape("decode", 64, 512, 7168, 4096),
)
QUICK_SHAPE = SHAPES[1]


def uniform_splits(tokens: int, experts: int) -> list[int]:
    base, extra = divmod(tokens, experts)
    return [base + (1 if g < extra else 0) for g in range(experts)]


def skewed_splits(tokens: int, experts: int, seed: int = SEED) -> list[int]:
    """Zipf-like (s = 1.2) over a shuffled expert order; a quarter of the experts get no tokens."""
    rng = random.Random(seed * 1000 + experts)
    order = list(range(experts))
    rng.shuffle(order)
    n_empty = experts // 4 if experts >= 4 else 0
    active = order[n_empty:]
    weights = [1.0 / (rank + 1) ** 1.2 for rank in range(len(active))]
    total_w = sum(weights)
    exact = [tokens * w / total_w for w in weights]
    sizes = [int(e) for e in exact]
    by_fraction = sorted(range(len(active)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_fraction[: tokens - sum(sizes)]:
        sizes[i] += 1
    out = [0] * experts
    for g, m in zip(active, sizes):
        out[g] = m
    return out


def make_splits(kind: str, tokens: int, experts: int) -> list[int]:
    sizes = uniform_splits(tokens, experts) if kind == "uniform" else skewed_splits(tokens, experts)
    assert sum(sizes) == tokens and len(sizes) == experts
    return sizes


# --------------------------------------------------------------------------- timing


def l2_flusher(device: torch.device) -> Callable[[], None]:
    """Before each timed call: flush L2, then keep the GPU busy while the call is launched."""
    if device.type != "cuda":
        return lambda: None
    buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)

    def flush():
        buf.zero_()
        torch.cuda._sleep(LAUNCH_COVER_CYCLES)

    return flush


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_time_ms(fn, device, flush) -> float:
    """One timed call: CUDA events on the GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: list[Callable], device: torch.device, flush,
                     max_reps: int = MAX_REPS) -> list[tuple[float, int]]:
    """(median ms, rounds) of each warmed-up fn, timed in rounds of one call each (~BUDGET_MS a fn)."""
    estimates = [min(_one_time_ms(fn, device, flush) for _ in range(2)) for fn in fns]
    rounds = max(MIN_REPS, min(max_reps, math.ceil(BUDGET_MS * len(fns) / max(sum(estimates), 1e-3))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, samples in zip(fns, times):
            samples.append(_one_time_ms(fn, device, flush))
    return [(statistics.median(samples), rounds) for samples in times]


def time_ms(fn: Callable, device: torch.device, flush, max_reps: int = MAX_REPS) -> tuple[float, int]:
    """do_bench-like: a warmup call, then the median of up to max_reps timed calls (~BUDGET_MS)."""
    fn()  # first call: compiles, autotunes, warms allocator and cuBLAS heuristics
    synchronize(device)
    return time_interleaved([fn], device, flush, max_reps)[0]


def host_us_per_call(fn: Callable, device: torch.device, calls: int) -> float:
    """Host time of `calls` back-to-back calls (including the final sync), in us per call."""
    for _ in range(10):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / calls * 1e6


# --------------------------------------------------------------------------- ceilings


def print_header(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = torch.cuda.get_device_capability(device)
        print(f"GPU: {name} (sm{cap[0]}{cap[1]})")
    else:
        name, cap = "CPU (dry run)", None
        print(f"GPU: none -- {name}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, grouped {grouped.__version__}")
    return {"gpu": name, "capability": cap, "torch": torch.__version__, "cuda": torch.version.cuda}


def matmul_rate(device: torch.device, flush, n: int) -> tuple[float, float]:
    """(TFLOP/s, ms) of an n x n x n bf16 torch.mm on random data."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms, _ = time_ms(lambda: torch.mm(a, b), device, flush)
    return 2 * n**3 / (ms * 1e-3) / 1e12, ms


def copy_bandwidth(device: torch.device, flush, nbytes: int) -> tuple[float, float]:
    """(GB/s counting bytes read + written, ms) of a device-to-device copy of nbytes."""
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), device, flush)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9, ms


def measure_ceilings(device: torch.device, flush, dry_run: bool) -> dict:
    """Dense bf16 matmul rate (TFLOP/s) and device copy bandwidth (GB/s, read + write)."""
    n = 512 if dry_run else 8192
    nbytes = (64 << 20) if dry_run else (2 << 30)  # 2 GB on the GPU
    tflops, mm_ms = matmul_rate(device, flush, n)
    gbps, copy_ms = copy_bandwidth(device, flush, nbytes)
    free_memory(device)
    print(f"ceilings: dense bf16 mm {n}^3 = {tflops:.4g} TFLOP/s ({mm_ms:.3f} ms); "
          f"copy of {nbytes / 1e9:.2f} GB = {gbps:.0f} GB/s read+write ({copy_ms:.3f} ms)")
    return {"matmul_tflops": tflops, "copy_gbps": gbps, "matmul_n": n, "copy_bytes": nbytes}


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    shape: Shape
    split: str
    layout: str
    sizes: list[int]
    a: torch.Tensor  # token-major operand: X (forward) or dY (dgrad, wgrad)
    b: torch.Tensor  # W (G, N, K) (forward, dgrad) or X (wgrad)
    offs: torch.Tensor  # inclusive end offsets (G,), int32, on the device
    expected: torch.Tensor | None = None  # the per-expert loop's output

    @property
    def m_total(self) -> int:
        return sum(self.sizes)

    @property
    def flops(self) -> float:
        return 2.0 * self.m_total * self.shape.n * self.shape.k

    def bytes(self, precision: str = "bf16") -> float:
        """Each operand read once (``precision``'s bytes an element), the output written once
        (bf16). Forward/dgrad read only the weights of experts that have tokens; wgrad writes
        every expert's dW."""
        m, n, k, g = self.m_total, self.shape.n, self.shape.k, self.shape.experts
        used = sum(1 for s in self.sizes if s)
        operands, output = {"forward": (m * k + used * n * k, m * n),
                            "dgrad": (m * n + used * n * k, m * k),
                            "wgrad": (m * n + m * k, g * n * k)}[self.layout]
        return OPERAND_BYTES[precision] * operands + 2.0 * output

    def floor_ms(self, ceilings: dict, precision: str = "bf16") -> float:
        """max(FLOPs / the bf16 matmul rate, bytes / copy bandwidth): MXFP8 runs bf16 MMAs too."""
        compute = self.flops / (ceilings["matmul_tflops"] * 1e12)
        memory = self.bytes(precision) / (ceilings["copy_gbps"] * 1e9)
        return max(compute, memory) * 1e3


def make_operands(shape: Shape, device: torch.device) -> dict[str, torch.Tensor]:
    """Random bf16 operands (randn * 0.1, never zeros): X (M, K), W (G, N, K), dY (M, N)."""
    torch.manual_seed(SEED)
    def rand(*dims):
        return (torch.randn(*dims, device=device, dtype=torch.bfloat16) * 0.1)
    return {"x": rand(shape.tokens, shape.k), "w": rand(shape.experts, shape.n, shape.k),
            "dy": rand(shape.tokens, shape.n)}


def make_case(shape, split, layout, sizes, ops, offs) -> Case:
    a, b = {"forward": (ops["x"], ops["w"]), "dgrad": (ops["dy"], ops["w"]),
            "wgrad": (ops["dy"], ops["x"])}[layout]
    return Case(shape, split, layout, sizes, a, b, offs)


def end_offsets(sizes: list[int], device: torch.device) -> torch.Tensor:
    return torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0).to(torch.int32).to(device)


# --------------------------------------------------------------------------- contenders


class Skip(Exception):
    """A contender that cannot run this case; the message says why."""


@dataclass
class Contender:
    name: str
    kind: str  # "ours", "peer" or "reference" (a speed reference, not a peer)
    build: Callable[[Case], Callable[[], torch.Tensor]]  # setup outside the timed region
    precision: str = "bf16"
    grouped_result: bool = True  # False: a speed reference whose output is not the grouped GEMM's


def per_expert_loop(a, b, sizes, layout) -> torch.Tensor:
    """The classic MoE loop: one torch.mm per expert, written into views of one output."""
    g_count = len(sizes)
    if layout == "wgrad":
        out = torch.empty(g_count, a.shape[1], b.shape[1], dtype=a.dtype, device=a.device)
    else:
        cols = b.shape[1] if layout == "forward" else b.shape[2]
        out = torch.empty(a.shape[0], cols, dtype=a.dtype, device=a.device)
    start = 0
    for g, m in enumerate(sizes):
        rows = slice(start, start + m)
        start += m
        if m == 0:
            if layout == "wgrad":
                out[g].zero_()
            continue
        if layout == "forward":
            torch.mm(a[rows], b[g].t(), out=out[rows])
        elif layout == "dgrad":
            torch.mm(a[rows], b[g], out=out[rows])
        else:
            torch.mm(a[rows].t(), b[rows], out=out[g])
    return out


def build_loop(case: Case):
    sizes = list(case.sizes)
    return lambda: per_expert_loop(case.a, case.b, sizes, case.layout)


def build_torch_grouped_mm(case: Case):
    if not hasattr(torch, "_grouped_mm"):
        raise Skip(f"torch {torch.__version__} has no torch._grouped_mm")
    a, b, offs = case.a, case.b, case.offs
    if case.layout == "forward":
        return lambda: torch._grouped_mm(a, b.transpose(1, 2), offs=offs)
    if case.layout == "dgrad":
        return lambda: torch._grouped_mm(a, b, offs=offs)
    return lambda: torch._grouped_mm(a.t(), b, offs=offs)


def build_ours(name: str):
    """grouped.gemm forced to one backend (checked: no silent fallback)."""
    backend = BACKENDS[name]

    def build(case: Case):
        kwargs = {"offsets": case.offs} if backend.graph_safe else {"split_sizes": list(case.sizes)}
        decision = grouped.explain(case.a, case.b, layout=case.layout, backend=name, **kwargs)
        if decision.backend != name:
            raise Skip(f"selector ran {decision.backend} instead: {decision.reasons.get(name)}")
        a, b, layout = case.a, case.b, case.layout
        return lambda: grouped.gemm(a, b, layout=layout, backend=name, **kwargs)
    return build


def build_ours_mxfp8(case: Case):
    """Our cute kernel on MXFP8 operands, each quantized along its GEMM's contraction dim first."""
    sizes = list(case.sizes)
    if case.a.device.type != "cuda":
        raise Skip("the MXFP8 kernel runs on a Hopper GPU")
    if case.layout == "forward":
        qa, qb = grouped.quantize(case.a, "mxfp8"), grouped.quantize(case.b, "mxfp8")
    elif case.layout == "dgrad":
        qa, qb = grouped.quantize(case.a, "mxfp8"), grouped.quantize(case.b, "mxfp8", axis=1)
    else:
        qa = grouped.quantize(case.a, "mxfp8", axis=0, split_sizes=sizes)
        qb = grouped.quantize(case.b, "mxfp8", axis=0, split_sizes=sizes)
    decision = grouped.explain(qa, qb, layout=case.layout, offsets=case.offs, backend="cute")
    if decision.backend != "cute":
        raise Skip(f"cute cannot serve MXFP8 here: {decision.reasons['cute']}")
    offs, layout = case.offs, case.layout

    def run():
        return grouped.gemm(qa, qb, layout=layout, offsets=offs, backend="cute")

    # checked against the loop on the dequantized operands (bf16 holds them exactly), not on bf16's
    run.expected = per_expert_loop(qa.dequantize().to(torch.bfloat16), qb.dequantize().to(torch.bfloat16), sizes,
                                   layout)
    return run


def build_dense_mm(case: Case):
    """One dense cuBLAS GEMM with the same FLOPs (the tokens as one expert): the rate a grouped
    GEMM would reach if grouping cost nothing."""
    m, a, b = case.m_total, case.a, case.b
    if case.layout == "forward":
        lhs, rhs = a[:m], b[0].T
    elif case.layout == "dgrad":
        lhs, rhs = a[:m], b[0]
    else:
        lhs, rhs = a[:m].T, b[:m]
    return lambda: torch.mm(lhs, rhs)


def rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last dim to float8_e4m3fn with fp32 scales (dequant = q * scale)."""
    amax = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / 448.0
    q = (t.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale.squeeze(-1).contiguous()


def build_fp8_scaled(case: Case):
    """fp8 rowwise grouped GEMM, forward only: torch._scaled_grouped_mm, else F.scaled_grouped_mm."""
    if case.layout != "forward":
        raise Skip("forward only")
    xq, sa = rowwise_fp8(case.a)  # (M, K), (M,)
    wq, sb = rowwise_fp8(case.b)  # (G, N, K), (G, N)
    offs = case.offs
    errors = []
    candidates = []
    if hasattr(torch, "_scaled_grouped_mm"):
        candidates.append(("torch._scaled_grouped_mm", lambda: torch._scaled_grouped_mm(
            xq, wq.transpose(1, 2), sa, sb, offs=offs, out_dtype=torch.bfloat16)))
    functional = getattr(torch.nn.functional, "scaled_grouped_mm", None)
    scaling = getattr(torch.nn.functional, "ScalingType", None)
    if functional is not None and scaling is not None:
        candidates.append(("F.scaled_grouped_mm", lambda: functional(
            xq, wq.transpose(1, 2), sa, scaling.RowWise, sb, scaling.RowWise,
            offs=offs, output_dtype=torch.bfloat16)))
    for api, fn in candidates:
        try:
            fn()
            FP8_API_USED[0] = api
            return fn
        except Exception as e:  # noqa: BLE001 - the API/arch may refuse; report it
            errors.append(f"{api}: {one_line(e)}")
    raise Skip("unsupported: " + ("; ".join(errors) or "no scaled grouped mm API in this torch"))


def fp8_signatures() -> list[str]:
    """The installed torch's fp8 grouped GEMM entry points, as this torch spells them."""
    found = []
    if hasattr(torch.ops.aten, "_scaled_grouped_mm"):
        found.append(f"aten schema {torch.ops.aten._scaled_grouped_mm.default._schema}")
    functional = getattr(torch.nn.functional, "scaled_grouped_mm", None)
    if functional is not None:
        try:
            found.append(f"F.scaled_grouped_mm{inspect.signature(functional)}")
        except (TypeError, ValueError):
            found.append("F.scaled_grouped_mm (signature not inspectable)")
    return found or ["no fp8 grouped GEMM API in this torch"]


@dataclass
class QuackAPI:
    gemm: Callable
    varlen_k: bool
    tuned_kw: bool
    where: str


def find_quack() -> tuple[QuackAPI | None, list[str]]:
    """quack's varlen-M GEMM: quack.gemm_interface.gemm(A, B, cu_seqlens_m=..., tuned=False)."""
    log = []
    try:
        import quack  # noqa: F401
        log.append(f"import quack: ok (version {getattr(quack, '__version__', '?')})")
    except Exception as e:  # noqa: BLE001
        return None, log + [f"import quack: {one_line(e)}"]
    try:
        from quack import gemm_interface
    except Exception as e:  # noqa: BLE001
        return None, log + [f"from quack import gemm_interface: {one_line(e)}"]
    fn = getattr(gemm_interface, "gemm", None)
    if fn is None:
        return None, log + ["quack.gemm_interface has no attribute 'gemm'"]
    params = inspect.signature(fn).parameters
    log.append(f"quack.gemm_interface.gemm params: {', '.join(list(params)[:24])}")
    if "cu_seqlens_m" not in params:
        return None, log + ["quack.gemm_interface.gemm takes no cu_seqlens_m: no varlen-M entry point"]
    api = QuackAPI(fn, "cu_seqlens_k" in params, "tuned" in params, "quack.gemm_interface.gemm")
    log.append("using quack.gemm_interface.gemm(A (M,K), B (G,K,N), cu_seqlens_m=(G+1,) int32"
               + (", tuned=False" if api.tuned_kw else "") + ") for forward/dgrad"
               + (", and gemm(dY^T (N,M), X (M,K), cu_seqlens_k=...) for wgrad" if api.varlen_k else
                  "; wgrad skipped (no cu_seqlens_k)"))
    return api, log


def build_quack(api: QuackAPI | None, reason: str):
    def build(case: Case):
        if api is None:
            raise Skip(reason)
        cu = torch.cat([case.offs.new_zeros(1), case.offs])  # (G+1,) with the leading zero
        extra = {"tuned": False} if api.tuned_kw else {}  # autotuning compiles dozens of configs
        a, b, fn = case.a, case.b, api.gemm
        if case.layout == "forward":
            return lambda: fn(a, b.transpose(1, 2), cu_seqlens_m=cu, **extra)
        if case.layout == "dgrad":
            return lambda: fn(a, b, cu_seqlens_m=cu, **extra)
        if not api.varlen_k:
            raise Skip("this quack has no cu_seqlens_k (varlen-K) for wgrad")
        return lambda: fn(a.t(), b, cu_seqlens_k=cu, **extra)
    return build


def build_contenders(case: Case, include_reference: bool, quack: tuple, mxfp8: bool) -> tuple[list[Contender],
                                                                                              list[str]]:
    """Our available backends (by explain()), the peers, the speed references, and (``mxfp8``) our
    MXFP8 kernel."""
    skipped = []
    reasons = grouped.explain(case.a, case.b, list(case.sizes), layout=case.layout).reasons
    ours = []
    for name in BACKENDS:
        if reasons[name] is not None:
            skipped.append(f"ours:{name}: {reasons[name]}")
        elif name == "reference" and not include_reference:
            skipped.append("ours:reference: skipped outside --quick/--dry-run (too slow)")
        else:
            ours.append(Contender(f"ours:{name}", "ours", build_ours(name)))
    peers = [
        Contender("torch._grouped_mm", "peer", build_torch_grouped_mm),
        Contender("per-expert mm loop", "peer", build_loop),
        Contender("quack varlen", "peer", build_quack(*quack)),
    ]
    peers.append(Contender("dense mm, same FLOPs", "reference", build_dense_mm, grouped_result=False))
    if mxfp8:
        peers.append(Contender("ours:cute mxfp8", "ours-mxfp8", build_ours_mxfp8, precision="mxfp8"))
    if case.layout == "forward":
        peers.append(Contender("fp8 rowwise scaled_gmm", "reference", build_fp8_scaled, precision="fp8"))
    return ours + peers, skipped


# --------------------------------------------------------------------------- running


@dataclass
class Row:
    shape: str
    split: str
    layout: str
    experts: int
    m_total: int
    n: int
    k: int
    contender: str
    kind: str
    status: str = "ok"  # ok | skipped: ... | error: ...
    ms: float | None = None
    reps: int | None = None
    tflops: float | None = None
    floor_ms: float | None = None
    pct_floor: float | None = None
    speedup_vs_best_peer: float | None = None  # best peer ms / this ms (ours only)
    vs_dense: float | None = None  # dense mm of the same FLOPs ms / this ms (ours only)
    vs_bf16: float | None = None  # our bf16 cute kernel's ms / this ms (ours on MXFP8)
    rel_err: float | None = None
    first_call_s: float | None = None  # includes compilation / autotuning
    notes: list[str] = field(default_factory=list)


def one_line(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (out.float() - expected.float()).norm().item()
    return diff / max(expected.float().norm().item(), 1e-30)


def check_output(out, expected, case: Case, limit: float) -> tuple[float, str | None]:
    """(normwise relative error vs the per-expert loop's ``expected``, a note when something is off)."""
    if tuple(out.shape) != tuple(expected.shape):
        return float("nan"), f"WRONG: shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    err = relative_error(out, expected)
    ok = math.isfinite(err) and err <= limit
    if not ok and case.layout == "wgrad" and 0 in case.sizes:
        used = [g for g, m in enumerate(case.sizes) if m]
        err_used = relative_error(out[used], expected[used])
        if math.isfinite(err_used) and err_used <= limit:
            return err_used, "dW of empty experts not zeroed (err over the others)"
    return err, None if ok else f"WRONG: rel err {err:.2e}"


def is_wrong(r: "Row") -> bool:
    return any(n.startswith("WRONG") for n in r.notes)


def prepare_contender(case: Case, c: Contender, ceilings: dict, device) -> tuple[Row, Callable | None]:
    """Build the contender, make its first call (compiles, warms up) and check its output; the
    callable is None when it cannot run."""
    s = case.shape
    row = Row(s.name, case.split, case.layout, s.experts, case.m_total, s.n, s.k, c.name, c.kind)
    row.floor_ms = case.floor_ms(ceilings, c.precision)
    try:
        fn = c.build(case)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        row.first_call_s = time.perf_counter() - t0
        if row.first_call_s > 1.0:
            row.notes.append(f"first call {row.first_call_s:.1f} s")
        if c.grouped_result:
            err, note = check_output(out, getattr(fn, "expected", case.expected), case, ERR_LIMIT[c.precision])
            row.rel_err = err if math.isfinite(err) else None
            if note:
                row.notes.append(note)
        del out
        if hasattr(fn, "expected"):
            del fn.expected
        return row, fn
    except Skip as e:
        row.status = f"skipped: {e}"
    except Exception as e:  # noqa: BLE001 - one contender failing must not stop the run
        row.status = f"error: {one_line(e)}"
        if device.type == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
            free_memory(device)
    return row, None


def run_case(case: Case, contenders: list[Contender], ceilings: dict, device, flush, max_reps) -> list[Row]:
    prepared = [prepare_contender(case, c, ceilings, device) for c in contenders]
    timed = [(row, fn) for row, fn in prepared if fn is not None]
    try:
        results = time_interleaved([fn for _, fn in timed], device, flush, max_reps)
    except Exception as e:  # noqa: BLE001
        for row, _ in timed:
            row.status = f"error: timing failed: {one_line(e)}"
        results = []
    for (row, _), (ms, reps) in zip(timed, results):
        row.ms, row.reps = ms, reps
        row.tflops = case.flops / (ms * 1e-3) / 1e12
        row.pct_floor = 100.0 * row.floor_ms / ms
    return [row for row, _ in prepared]


def fill_peer_ratios(rows: list[Row]) -> None:
    dense = next((r for r in rows if r.contender.startswith("dense mm") and r.ms), None)
    for r in rows:
        if dense is not None and r.kind == "ours" and r.ms:
            r.vs_dense = dense.ms / r.ms
    peers = [r for r in rows if r.kind == "peer" and r.ms and not is_wrong(r)]
    if not peers:
        return
    best = min(peers, key=lambda r: r.ms)
    best.notes.append("best peer")
    for r in rows:
        if r.kind == "ours" and r.ms:
            r.speedup_vs_best_peer = best.ms / r.ms
    bf16 = next((r for r in rows if r.contender == "ours:cute" and r.ms), None)
    for r in rows:
        if r.kind == "ours-mxfp8" and r.ms and bf16 is not None:
            r.vs_bf16 = bf16.ms / r.ms
            r.notes.append(f"xbf16 {r.vs_bf16:.2f}")


def run_all(plan, ceilings, device, flush, include_reference, quack, max_reps, table, only=(), mxfp8=False,
            checkpoint=lambda rows: None) -> list[Row]:
    """Every case of the plan; ``checkpoint(rows)`` after each (results survive a later crash)."""
    rows: list[Row] = []
    reported: set[str] = set()
    for shape, splits, layouts in plan:
        ops = make_operands(shape, device)
        for split in splits:
            sizes = make_splits(split, shape.tokens, shape.experts)
            offs = end_offsets(sizes, device)
            table.note(f"== {shape.name} K{shape.k} N{shape.n}: {split} splits over {shape.experts} experts: "
                       f"max {max(sizes)}, min {min(sizes)}, empty {sizes.count(0)}")
            for layout in layouts:
                case = make_case(shape, split, layout, sizes, ops, offs)
                case.expected = per_expert_loop(case.a, case.b, sizes, layout)
                contenders, skipped = build_contenders(case, include_reference, quack, mxfp8)
                if only:
                    contenders = [c for c in contenders if c.name.startswith(only)]
                case_rows = run_case(case, contenders, ceilings, device, flush, max_reps)
                fill_peer_ratios(case_rows)
                for r in case_rows:
                    table.row(r)
                new = [msg for msg in skipped if msg not in reported]
                if new:
                    table.note(f"   not run (said once): {'; '.join(new)}")
                    reported.update(new)
                rows.extend(case_rows)
                checkpoint(rows)
                case.expected = None
                del case
                free_memory(device)
        del ops
        free_memory(device)
    return rows


def build_plan(args, dry_run: bool):
    shapes = [QUICK_SHAPE] if args.quick else list(SHAPES)
    if args.shapes:
        shapes = [s for s in shapes if s.name in args.shapes.split(",")]
    if dry_run:
        shapes = [s.scaled_for_dry_run() for s in shapes]
    splits = ("uniform",) if args.quick else SPLITS
    layouts = ("forward",) if args.quick else LAYOUTS
    return [(s, splits, layouts) for s in shapes]


# --------------------------------------------------------------------------- host overhead


def direct_kernels(name: str, x, w, sizes, offs):
    """What backend `name` launches for a forward call, called directly (no validation/selection)."""
    if name == "torch":
        return lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    if name == "cublas":
        return lambda: per_expert_loop(x, w, sizes, "forward")
    if name == "cute":
        from cute_backend.sm90 import grouped_gemm as sm90

        schedule = sm90.schedule_for("forward", x.shape[0], w.shape[0], x.shape[0], w.shape[1], x.device)
        config = sm90.config_for("forward", torch.bfloat16, False, *schedule)
        out = torch.empty(x.shape[0], w.shape[1], dtype=torch.bfloat16, device=x.device)
        bound = sm90.work_bound(config, x.shape[0], w.shape[0], x.shape[0], w.shape[1])
        return lambda: sm90.launch(config, x, w, out, offs, bound)
    if name == "reference":
        def ref():
            a, b = x.double(), w.double()
            out = torch.empty(x.shape[0], w.shape[1], dtype=torch.float64, device=x.device)
            start = 0
            for g, m in enumerate(sizes):
                out[start:start + m] = a[start:start + m] @ b[g].T
                start += m
            return out.to(torch.bfloat16)
        return ref
    return None


def measure_host_overhead(device: torch.device, calls: int) -> list[dict]:
    """grouped.gemm(...) per-call host time minus the chosen backend's kernels called directly."""
    experts, tokens, dim = 8, 64, 128
    torch.manual_seed(SEED)
    x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16) * 0.1
    w = torch.randn(experts, dim, dim, device=device, dtype=torch.bfloat16) * 0.1
    sizes = uniform_splits(tokens, experts)
    offs = end_offsets(sizes, device)
    auto = grouped.explain(x, w, offsets=offs)
    print(f"auto choice for a tiny forward with an offsets tensor:\n{auto}")
    results = []
    runs = [("auto", auto.backend, {"offsets": offs})]
    for name, reason in auto.reasons.items():
        if reason is None:
            kwargs = {"offsets": offs} if BACKENDS[name].graph_safe else {"split_sizes": sizes}
            runs.append((name, name, kwargs))
    for label, name, kwargs in runs:
        direct = direct_kernels(name, x, w, sizes, offs)
        if direct is None:
            results.append({"call": label, "backend": name, "status": "skipped: no direct form known"})
            continue
        forced = None if label == "auto" else name
        try:
            ours_us = host_us_per_call(lambda: grouped.gemm(x, w, backend=forced, **kwargs), device, calls)
            direct_us = host_us_per_call(direct, device, calls)
        except Exception as e:  # noqa: BLE001
            results.append({"call": label, "backend": name, "status": f"error: {one_line(e)}"})
            continue
        splits = "offsets tensor" if "offsets" in kwargs else "host sizes"
        results.append({"call": label, "backend": name, "splits": splits, "status": "ok",
                        "grouped_us": ours_us, "direct_us": direct_us, "overhead_us": ours_us - direct_us})
    return results


# --------------------------------------------------------------------------- output


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


class Table:
    """Prints rows as they are measured and keeps the text for table.txt."""

    HEADER = (f"{'shape':<34} {'split':<7} {'layout':<7} {'contender':<24} {'ms':>9} {'TFLOP/s':>8} "
              f"{'%floor':>6} {'xpeer':>6} {'xdense':>6} {'relerr':>8}  status/notes")

    def __init__(self):
        self.lines = []
        self.last_case = None

    def emit(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def start(self) -> None:
        self.emit("")
        self.emit("xpeer = best peer ms / our ms (>1: ours faster); xdense = ms of one dense mm of the same "
                  "FLOPs / our ms; %floor = floor ms / ms; relerr vs the per-expert loop")
        self.emit(self.HEADER)

    def row(self, r: Row) -> None:
        case = (r.shape, r.k, r.n, r.split, r.layout)
        if case != self.last_case:
            self.emit("-" * len(self.HEADER))
            self.last_case = case
        shape = f"{r.shape} K{r.k} N{r.n} G{r.experts} M{r.m_total}"
        status = r.status if r.status != "ok" else ""
        notes = "; ".join([status, *r.notes]).strip("; ")
        self.emit(f"{shape:<34} {r.split:<7} {r.layout:<7} {r.contender:<24} {fmt(r.ms, '9.3f'):>9} "
                  f"{fmt(r.tflops, '8.1f'):>8} {fmt(r.pct_floor, '5.0f'):>6} "
                  f"{fmt(r.speedup_vs_best_peer, '6.2f'):>6} {fmt(r.vs_dense, '6.2f'):>6} "
                  f"{fmt(r.rel_err, '8.1e'):>8}  {notes}")

    def note(self, line: str) -> None:
        self.emit(line)


def write_json(path, info, ceilings, rows, overhead, quack_log, plan, elapsed_s) -> None:
    data = {
        **info,
        "ceilings": ceilings,
        "fp8_api": FP8_API_USED[0],
        "quack": quack_log,
        "plan": [{"shape": asdict(s), "splits": list(sp), "layouts": list(ly)} for s, sp, ly in plan],
        "split_sizes": {f"{s.experts}x{s.tokens}/{sp}": make_splits(sp, s.tokens, s.experts)
                        for s, splits, _ in plan for sp in splits},
        "rows": [asdict(r) for r in rows],
        "host_overhead": overhead,
        "elapsed_s": elapsed_s,
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


def write_png(path, rows: list[Row], title: str) -> str:
    """A bar chart of TFLOP/s per contender, one panel per layout; skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"PNG skipped: matplotlib not importable ({one_line(e)})"
    layouts = [ly for ly in LAYOUTS if any(r.layout == ly and r.tflops for r in rows)]
    if not layouts:
        return "PNG skipped: no timed rows"
    fig, axes = plt.subplots(len(layouts), 1, figsize=(16, 4.5 * len(layouts)), squeeze=False)
    for ax, layout in zip(axes[:, 0], layouts):
        contenders = list(dict.fromkeys(r.contender for r in rows if r.layout == layout and r.tflops))
        cases = list(dict.fromkeys(f"{r.shape}\nK{r.k} N{r.n}\n{r.split}" for r in rows if r.layout == layout))
        width = 0.8 / max(len(contenders), 1)
        for i, name in enumerate(contenders):
            values = []
            for case in cases:
                match = [r for r in rows if r.layout == layout and r.contender == name
                         and f"{r.shape}\nK{r.k} N{r.n}\n{r.split}" == case]
                values.append((match[0].tflops or 0.0) if match else 0.0)
            ax.bar([j + i * width for j in range(len(cases))], values, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, fontsize=7)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{layout} -- {title}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"PNG written: {path}"


def print_summary(info, ceilings, rows, overhead, quack_log, elapsed_s, out_files) -> None:
    """The compact last block: one line a case, host overhead, files."""
    print("\n=== SUMMARY " + "=" * 60)
    print(f"{info['gpu']} | torch {info['torch']} | mm {ceilings['matmul_tflops']:.0f} TFLOP/s | "
          f"copy {ceilings['copy_gbps']:.0f} GB/s | {elapsed_s:.0f} s")
    print(f"quack: {quack_log[-1]}")
    print(f"fp8 API: {FP8_API_USED[0] or 'none worked (see fp8 rows)'}")
    print(f"{'case':<27} {'lay':<5} {'best ours':<22} {'%fl':>4} {'best peer':<20} {'xpeer':>5} "
          f"{'xdense':>6} {'fp8ms':>7}")
    cases = list(dict.fromkeys((r.shape, r.k, r.n, r.split, r.layout) for r in rows))
    wrong = [f"{r.contender}@{r.shape}K{r.k}N{r.n}/{r.split}/{r.layout}" for r in rows if is_wrong(r)]
    for key in cases:
        group = [r for r in rows if (r.shape, r.k, r.n, r.split, r.layout) == key and r.ms]
        ours = [r for r in group if r.kind == "ours" and not is_wrong(r)]
        peers = [r for r in group if r.kind == "peer" and not is_wrong(r)]
        best_ours = min(ours, key=lambda r: r.ms) if ours else None
        best_peer = min(peers, key=lambda r: r.ms) if peers else None
        fp8 = next((r.ms for r in group if r.contender.startswith("fp8")), None)
        shape, k, n, split, layout = key
        ours_txt = f"{best_ours.contender[5:]} {best_ours.ms:.3f}" if best_ours else "-"
        peer_txt = f"{short(best_peer.contender)} {best_peer.ms:.3f}" if best_peer else "-"
        xpeer = best_peer.ms / best_ours.ms if best_ours and best_peer else None
        print(f"{shape + ' K' + str(k) + ' N' + str(n) + ' ' + split[:4]:<27} {layout[:5]:<5} {ours_txt:<22} "
              f"{fmt(best_ours.pct_floor if best_ours else None, '4.0f'):>4} {peer_txt:<20} "
              f"{fmt(xpeer, '5.2f'):>5} {fmt(best_ours.vs_dense if best_ours else None, '6.2f'):>6} "
              f"{fmt(fp8, '7.3f'):>7}")
    for o in overhead:
        if o["status"] == "ok":
            print(f"host overhead [{o['call']}->{o['backend']}, {o['splits']}]: grouped.gemm "
                  f"{o['grouped_us']:.1f} us - direct {o['direct_us']:.1f} us = {o['overhead_us']:.1f} us/call")
        else:
            print(f"host overhead [{o['call']}->{o['backend']}]: {o['status']}")
    mx = [r for r in rows if r.kind == "ours-mxfp8" and r.ms]
    if mx:
        print("MXFP8 (ours:cute on pre-quantized operands) against our BF16 kernel, same case:")
        for r in mx:
            print(f"  {r.shape + ' K' + str(r.k) + ' N' + str(r.n) + ' ' + r.split[:4]:<27} {r.layout[:5]:<5} "
                  f"{r.ms:8.3f} ms {fmt(r.tflops, '6.0f')} TFLOP/s {fmt(r.pct_floor, '4.0f')}% floor "
                  f"xbf16 {fmt(r.vs_bf16, '5.2f')}")
        for label, chosen in (("compute-bound shapes", [r for r in mx if r.shape != "decode"]),
                              ("decode", [r for r in mx if r.shape == "decode"])):
            ratios = [r.vs_bf16 for r in chosen if r.vs_bf16]
            if ratios:
                geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
                print(f"  {label}: xbf16 geomean {geo:.3f}, range {min(ratios):.2f}-{max(ratios):.2f} "
                      f"({len(ratios)} cases)")
    errors = sorted({f"{r.contender}: {r.status[:90]}" for r in rows if r.status.startswith("error")})
    for e in errors[:6]:
        print(f"ERROR {e}")
    if wrong:
        print(f"WRONG RESULTS ({len(wrong)}): {', '.join(wrong[:8])}")
    print(" | ".join(out_files))


def short(name: str) -> str:
    return {"torch._grouped_mm": "_grouped_mm", "per-expert mm loop": "mm loop"}.get(name, name)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one shape, uniform splits, forward only (smoke test)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, perf_counter timing: checks the script")
    p.add_argument("--out", default="./bench_out", help="directory for results.json, table.txt, bench.png")
    p.add_argument("--max-reps", type=int, default=MAX_REPS, help="timed repetitions per contender (max)")
    p.add_argument("--contenders", default="", help="comma-separated name prefixes to run (default: all)")
    p.add_argument("--shapes", default="", help="comma-separated shape names to run (default: all)")
    p.add_argument("--mxfp8", action="store_true",
                   help="also time our sm90 MXFP8 kernel (ours:cute mxfp8); run its GPU tests first "
                        "(tests/test_cute_block_scaled_gpu.py): a hang or fault there would cost the whole run")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or use --dry-run to check the script on the CPU")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    info = print_header(device)
    flush = l2_flusher(device)
    ceilings = measure_ceilings(device, flush, args.dry_run)

    quack_api, quack_log = find_quack()
    for line in quack_log:
        print(f"quack: {line}")
    info["fp8_signatures"] = fp8_signatures()
    for line in info["fp8_signatures"]:
        print(f"fp8: {line}")
    quack = (quack_api, "quack unavailable: " + quack_log[-1][:100])

    plan = build_plan(args, args.dry_run)
    max_reps = min(args.max_reps, 3) if args.dry_run else args.max_reps
    table = Table()
    table.start()
    only = tuple(name for name in args.contenders.split(",") if name)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")

    def checkpoint(rows):
        write_json(json_path, info, ceilings, rows, None, quack_log, plan, time.perf_counter() - t_start)

    rows = run_all(plan, ceilings, device, flush, args.quick or args.dry_run, quack, max_reps, table, only,
                   args.mxfp8, checkpoint)

    print("\nhost overhead (tiny forward: 8 experts, 64 tokens, 128x128):")
    overhead = measure_host_overhead(device, calls=100 if args.dry_run else 1000)

    elapsed = time.perf_counter() - t_start
    write_json(json_path, info, ceilings, rows, overhead, quack_log, plan, elapsed)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write("\n".join(table.lines) + "\n")
    png_msg = write_png(os.path.join(args.out, "bench.png"), rows, info["gpu"])
    print_summary(info, ceilings, rows, overhead, quack_log, elapsed, [f"JSON written: {json_path}", png_msg])


if __name__ == "__main__":
    main()
