"""Benchmark of the memory-bound CuTe DSL kernels against the torch path, on one GPU.

    python scripts/bench_kernels.py

1. the copy-bandwidth ceiling (a device-to-device copy, bytes read + written);
2. quantize a 32768 x 7168 bf16 tensor: MXFP8 rowwise + columnwise, NVFP4
   rowwise + columnwise; the two single-direction kernels, the fused one-pass
   kernel, and the library path (GroupedTensor.quantize_, with NVFP4's amax
   pass), against the torch reference path; achieved GB/s counting the bytes
   each moves (x read once per pass, outputs written once) and its share of
   the copy ceiling;
3. splits_to_offsets for 256 experts and 6 outputs: launches counted with the
   torch profiler, time per call over CUDA-graph replays, against the torch path;
4. the first call in a fresh process with a warm disk cache (no compile).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import grouped  # noqa: E402
from grouped import kernels  # noqa: E402


def time_ms(fn, reps: int = 20, batch: int = 5) -> float:
    """Median GPU time of one fn() in ms: CUDA events around ``batch`` back-to-back calls, with one
    call queued ahead of the start event so the GPU is busy from it on (host time a call, when
    shorter than the kernel, overlaps the work queued before it instead of being counted)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / batch)
    return sorted(times)[len(times) // 2]


def copy_gbps() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def torch_path(fn):
    """Run fn with the kernels switched off (the torch reference path)."""
    saved = kernels._device_ok
    kernels._device_ok = lambda index: False
    try:
        return fn()
    finally:
        kernels._device_ok = saved


def bench_quantize(copy: float) -> list[str]:
    from cute_backend import quantize as qk
    from grouped.quantize import kernel_facts

    m, k = 32768, 7168
    x = (torch.randn(m, k, device="cuda") * torch.exp2(torch.randint(-8, 8, (m, 1), device="cuda").float())).bfloat16()
    lines = []
    for fmt in ("mxfp8", "nvfp4"):
        f = grouped.get_format(fmt)
        facts = kernel_facts(f)  # what the kernels compile in
        epb, block = f.elements_per_byte, f.block_size
        row_data = torch.empty(m, k // epb, dtype=f.data_dtype, device="cuda")
        row_scale = torch.empty(m, k // block, dtype=f.scale_dtype, device="cuda")
        col_data = torch.empty(k, m // epb, dtype=f.data_dtype, device="cuda")
        col_scale = torch.empty(k, m // block, dtype=f.scale_dtype, device="cuda")
        table = qk.group_table([m], facts, device="cuda", data_row_bytes=m // epb, scale_row_bytes=m // block)
        s = torch.ones(m, device="cuda") if fmt == "nvfp4" else None
        s_col = s[:1] if s is not None else None
        cache = grouped.GroupedTensor([(m, k)], fmt, rowwise=True, columnwise=True, device="cuda")

        def separate():  # two kernels, each reading x
            qk.quantize_rowwise(x, facts, row_data, row_scale, s)
            qk.quantize_columnwise(x, facts, col_data, col_scale, table, s_col)

        def fused():  # one pass over x for both directions
            qk.quantize_both(x, facts, row_data, row_scale, col_data, col_scale, table, None, s_col)

        def public():  # the library path: GroupedTensor.quantize_ (NVFP4: + the amax pass and S)
            cache.quantize_([x])

        out_bytes = 2 * (m * k // epb + m * k // block)
        once = x.numel() * 2 + out_bytes  # x read once, both outputs written once
        amax = x.numel() * 2 if fmt == "nvfp4" else 0
        ms_t = time_ms(lambda: torch_path(public), reps=3)
        for label, fn, nbytes in (("separate kernels", separate, once + x.numel() * 2), ("fused kernel", fused, once),
                                  ("GroupedTensor", public, once + amax)):
            ms = time_ms(fn)
            gbps = nbytes / ms / 1e6
            lines.append(f"quantize {fmt} row+col {m}x{k} {label:<17} {ms:8.3f} ms {gbps:7.0f} GB/s "
                         f"{100 * gbps / copy:5.1f}% of copy; torch path {ms_t:8.3f} ms ({ms_t / ms:5.1f}x)")
    return lines


def bench_offsets() -> list[str]:
    sizes = torch.randint(0, 512, (256,), dtype=torch.int32, device="cuda")
    args = dict(strides=[1, 1, 7168, 4096, 2, 1], include_leading_zero=[True, False, True, False, True, False],
                dtypes=[torch.int32, torch.int32, torch.int64, torch.int64, torch.int32, torch.int64])
    lines = []
    for label, runner in (("kernel", lambda f: f()), ("torch", torch_path)):
        call = lambda: runner(lambda: grouped.splits_to_offsets(sizes, **args))  # noqa: E731
        call()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        launches = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call()
        torch.cuda.current_stream().wait_stream(stream)
        graph, calls = torch.cuda.CUDAGraph(), 100
        with torch.cuda.graph(graph):
            for _ in range(calls):
                call()
        us = time_ms(graph.replay) * 1e3 / calls
        lines.append(f"splits_to_offsets 256 experts, 6 outputs, {label:<6}: {len(launches)} launch(es), "
                     f"{us:6.2f} us a call over graph replays")
    return lines


_FIRST_CALL = """
import sys, time, torch
import grouped
x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
w = torch.randn(8, 2048, 7168, device="cuda", dtype=torch.bfloat16)
sizes = torch.randint(0, 100, (256,), dtype=torch.int32, device="cuda")
ends = torch.tensor([512 * (g + 1) for g in range(8)], dtype=torch.int32, device="cuda")
calls = {
    "splits_to_offsets": lambda: grouped.splits_to_offsets(
        sizes, strides=[1], include_leading_zero=[True], dtypes=[torch.int32]),
    "quantize mxfp8": lambda: grouped.quantize(x, "mxfp8"),
    "bf16 grouped GEMM (cute)": lambda: grouped.gemm(x, w, offsets=ends, backend="cute"),
}
torch.cuda.synchronize()
t0 = time.perf_counter()
calls[sys.argv[1]]()
torch.cuda.synchronize()
print(f"{(time.perf_counter() - t0) * 1e3:.1f} {'cutlass' in sys.modules} {'tvm_ffi' in sys.modules}")
"""
FIRST_CALLS = ("splits_to_offsets", "quantize mxfp8", "bf16 grouped GEMM (cute)")


def bench_first_call() -> list[str]:
    """Each kernel as the first call of a fresh process (its own process, so each pays the runtime
    load); the disk caches are warmed by an earlier process: the kernel cache, and Python's bytecode
    (written as on any machine where PYTHONDONTWRITEBYTECODE is not set; pip byte-compiles what it
    installs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    lines = []
    for name in FIRST_CALLS:
        args = [sys.executable, "-c", _FIRST_CALL, name]
        try:
            subprocess.run(args, env=env, check=True, capture_output=True)  # warm the cache
            done = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            stderr = (e.stderr if isinstance(e.stderr, str) else e.stderr.decode(errors="replace")).strip()
            lines.append(f"first call, fresh process: {name} FAILED (exit {e.returncode}): {stderr[-400:]}")
            continue
        ms, cutlass, tvm_ffi = done.stdout.split()
        lines.append(f"first call, fresh process, warm disk cache: {name} {ms} ms (imported: cutlass {cutlass}, "
                     f"tvm_ffi {tvm_ffi})")
    return lines


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark times our Hopper kernels")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    reason = kernels.unavailable("cuda", torch.cuda.get_device_capability())
    if reason:
        sys.exit(f"kernels unavailable: {reason}")
    copy = copy_gbps()
    print(f"copy bandwidth: {copy:.0f} GB/s (bytes read + written)", flush=True)
    for part in (lambda: bench_quantize(copy), bench_offsets, bench_first_call):
        print("\n".join(part()), flush=True)  # each part as it ends: a later failure keeps what was measured


if __name__ == "__main__":
    main()
