"""splits_to_offsets in one launch: up to 8 prefix-sum outputs from one split-size tensor.

Output i holds the inclusive prefix sums of split_sizes x stride_i, with a
leading 0 when asked, as int32 or int64. One CTA of THREADS threads: each
thread sums a contiguous chunk of the split sizes in int64, a shared-memory
scan turns the chunk sums into chunk starts, then each thread walks its chunk
again writing every output.

Output dtype, stride and leading zero are run-time arguments, so one compile
per input dtype serves every call: the outputs arrive as int32 views of their
bytes, and an int64 output is written as two int32 words (little endian).
More than 8 outputs are served by several launches (grouped.offsets).

Host side here (``can_implement``, ``compile_config`` — no GPU needed when
CUTE_DSL_ARCH is set — and ``launch``); device code in offsets_kernel.py,
imported only to compile, so a warm process never imports cutlass. What both
sides compile in is in offsets_config.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import ARCH, CACHE, KernelSpec, compile_kernel
from .offsets_config import MAX_OUTPUTS, THREADS

INPUT_DTYPES = (torch.int32, torch.int64)


def can_implement(split_sizes: torch.Tensor, n_outputs: int) -> str | None:
    """None if the kernel can run this call, else why not."""
    if split_sizes.device.type != "cuda":
        return "split sizes are not on a CUDA device"
    if split_sizes.dtype not in INPUT_DTYPES:
        return f"split sizes must be int32 or int64, got {split_sizes.dtype}"
    if not 1 <= n_outputs <= MAX_OUTPUTS:
        return f"one launch writes 1 to {MAX_OUTPUTS} outputs, got {n_outputs}"
    return None


_SOURCES = tuple(str(Path(__file__).with_name(f)) for f in ("offsets.py", "offsets_config.py", "offsets_kernel.py"))


def _spec(input_dtype: torch.dtype) -> KernelSpec:
    return KernelSpec("splits_to_offsets", (str(input_dtype), THREADS, MAX_OUTPUTS), ARCH, _SOURCES)


def compile_config(input_dtype: torch.dtype):
    """Compile the kernel for one input dtype (a TVM-FFI compiled function)."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor

    from . import offsets_kernel as k

    in_type = {torch.int32: cutlass.Int32, torch.int64: cutlass.Int64}[input_dtype]
    n = cute.sym_int()
    splits = make_fake_compact_tensor(in_type, (n,))
    outs = [make_fake_compact_tensor(cutlass.Int32, (cute.sym_int(),), assumed_align=16) for _ in range(MAX_OUTPUTS)]
    scalars = [cutlass.Int64(0)] * MAX_OUTPUTS + [cutlass.Int32(0)] * 2
    return compile_kernel(k.splits_to_offsets_host, splits, *outs, *scalars)


def configs() -> list:
    """(spec, build) of every config the library can pick: one per input dtype."""
    return [(_spec(d), (lambda d=d: compile_config(d))) for d in INPUT_DTYPES]


def kernel(input_dtype: torch.dtype):
    return CACHE.get(_spec(input_dtype), lambda: compile_config(input_dtype))


def launch(split_sizes: torch.Tensor, outputs: list[torch.Tensor], strides, leading_zero) -> None:
    """Fill ``outputs`` (int32/int64 CUDA tensors of the right lengths) in one launch."""
    n = len(outputs)
    words = [o.view(torch.int32) for o in outputs]
    dummy = words[0]
    words += [dummy] * (MAX_OUTPUTS - n)
    is64 = sum(1 << i for i, o in enumerate(outputs) if o.dtype == torch.int64)
    lead = sum(1 << i for i, z in enumerate(leading_zero) if z)
    stride_args = list(strides) + [0] * (MAX_OUTPUTS - n)
    flags = is64 | (lead << MAX_OUTPUTS)
    stream = torch.cuda.current_stream(split_sizes.device).cuda_stream
    kernel(split_sizes.dtype)(split_sizes, *words, *stride_args, n, flags, stream)

