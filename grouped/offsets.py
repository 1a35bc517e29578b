"""Split sizes to offsets: the prefix sums every grouped GEMM needs.

A grouped GEMM gets its groups as split sizes ``m_0 .. m_{G-1}`` (rows per
expert).  Kernels and their callers want those as offsets instead, often in
several forms at once:

* per-expert row offsets (stride 1, with a leading zero: group ``g`` is rows
  ``offsets[g]:offsets[g + 1]``, the form ``torch._grouped_mm`` takes as
  cumulative ends without the leading zero);
* byte or element offsets for pointer arithmetic (stride = row size in bytes
  or elements, int64 so large buffers stay exact);
* the padded offsets Blackwell kernels take (split sizes already rounded up by
  the caller, prefix-summed with the stride those kernels expect).

:func:`splits_to_offsets` makes all of them from one split-size tensor, on the
device that tensor lives on, without a host sync, so it can be captured in a
CUDA graph.  On a Hopper GPU with the CuTe DSL toolchain it is one kernel
launch (cute_backend/offsets.py, up to 8 outputs a launch); elsewhere plain
torch (a cumsum, a multiply and a cast per output), with the same results.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import kernels
from .buffers import ALIGN_BYTES, ceil_to

__all__ = ["splits_to_offsets"]

_NAME = "splits_to_offsets"
_OUT_DTYPES = (torch.int32, torch.int64)
_INT64_MAX = torch.iinfo(torch.int64).max


def _fail(msg: str) -> ValueError:
    return ValueError(f"{_NAME}: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_args(split_sizes, strides, include_leading_zero, dtypes) -> torch.Tensor:
    """Validate the arguments; return split_sizes as a 1-D int32/int64 tensor."""
    if isinstance(split_sizes, (list, tuple)):
        bad = [x for x in split_sizes if not _is_int(x)]
        if bad:
            raise _fail(f"split_sizes as a list must hold Python ints, got {bad[0]!r}")
        split_sizes = torch.tensor(list(split_sizes), dtype=torch.int64)
    elif not isinstance(split_sizes, torch.Tensor):
        raise _fail(f"split_sizes must be a 1-D int32/int64 tensor or a list of ints, "
                    f"got {type(split_sizes).__name__}")
    if split_sizes.dtype not in (torch.int32, torch.int64):
        raise _fail(f"split_sizes must be a tensor of dtype torch.int32 or torch.int64, "
                    f"got {split_sizes.dtype}")
    if split_sizes.dim() != 1:
        raise _fail(f"split_sizes must be 1-D, got shape {tuple(split_sizes.shape)}")

    seqs = {"strides": strides, "include_leading_zero": include_leading_zero,
            "dtypes": dtypes}
    for name, seq in seqs.items():
        if not isinstance(seq, (list, tuple)):
            raise _fail(f"{name} must be a list or tuple (one entry per output), "
                        f"got {type(seq).__name__}")
    lengths = {name: len(seq) for name, seq in seqs.items()}
    if len(set(lengths.values())) != 1:
        raise _fail("strides, include_leading_zero and dtypes must have the same length, "
                    f"got lengths {lengths['strides']}, {lengths['include_leading_zero']} "
                    f"and {lengths['dtypes']}")
    if lengths["strides"] == 0:
        raise _fail("at least one output is needed, got empty strides, "
                    "include_leading_zero and dtypes")

    for i, (s, z, d) in enumerate(zip(strides, include_leading_zero, dtypes)):
        if not _is_int(s) or not 0 <= s <= _INT64_MAX:
            raise _fail(f"strides[{i}] must be a Python int in [0, 2**63 - 1], got {s!r}")
        if not isinstance(z, bool):
            raise _fail(f"include_leading_zero[{i}] must be a bool, got {z!r}")
        if d not in _OUT_DTYPES:
            raise _fail(f"dtypes[{i}] must be torch.int32 or torch.int64, got {d}")
    return split_sizes


def _check_values(split_sizes: torch.Tensor, strides, dtypes) -> None:
    """Host-side checks: negative sizes and outputs too large for their dtype (CPU only)."""
    sizes = split_sizes.tolist()
    for g, m in enumerate(sizes):
        if m < 0:
            raise _fail(f"split_sizes must be non-negative, got {m} at index {g}")
    total = sum(sizes)  # Python int: exact however large
    for i, (s, d) in enumerate(zip(strides, dtypes)):
        max_value = total * s
        if max_value > torch.iinfo(d).max:
            raise _fail(f"output {i} would reach {max_value}, which does not fit in {d} "
                        f"(max {torch.iinfo(d).max}); use torch.int64 for it")


def _empty_outputs(lengths, dtypes, device, bulk_allocate) -> list[torch.Tensor]:
    if not bulk_allocate:
        return [torch.empty(n, dtype=d, device=device) for n, d in zip(lengths, dtypes)]
    starts, nbytes = [], 0
    for n, d in zip(lengths, dtypes):
        nbytes = ceil_to(nbytes, ALIGN_BYTES)
        starts.append(nbytes)
        nbytes += n * d.itemsize
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return [buf[o:o + n * d.itemsize].view(d) for o, n, d in zip(starts, lengths, dtypes)]


def splits_to_offsets(
    split_sizes: torch.Tensor | Sequence[int],
    *,
    strides: Sequence[int],
    include_leading_zero: Sequence[bool],
    dtypes: Sequence[torch.dtype],
    bulk_allocate: bool = False,
) -> list[torch.Tensor]:
    """Prefix sums of ``split_sizes``, scaled, in one or more forms.

    Output ``i`` is ``cumsum(split_sizes) * strides[i]`` (inclusive), with a 0
    prepended when ``include_leading_zero[i]`` (length N + 1, else N), of dtype
    ``dtypes[i]``, on ``split_sizes``' device.

    Args:
        split_sizes: 1-D int32 or int64 tensor of N sizes (CPU or CUDA), or a
            list/tuple of Python ints (made an int64 CPU tensor). N = 0 is valid.
        strides: one Python int >= 0 per output (1 for row offsets, the row
            size in bytes for byte offsets, ...).
        include_leading_zero: one bool per output.
        dtypes: one of torch.int32 / torch.int64 per output.
        bulk_allocate: if True, all outputs are views into a single uint8
            allocation, each starting at a 16-byte-aligned byte offset (one
            allocation instead of n_out; handy for passing to one kernel).

    The sums are always computed in int64 and cast at the end, so int64
    outputs are exact past 2**31.

    Checks: argument types, dtypes and lengths are always checked (ValueError).
    When ``split_sizes`` is on the CPU the values are checked too: a negative
    size, or an output whose largest value does not fit its dtype, raises
    ValueError.  On CUDA the values are NOT checked, because that would need a
    device-to-host sync and the function must work during CUDA graph capture:
    negative sizes are summed as given (garbage in, garbage out) and int32
    outputs that exceed 2**31 - 1 wrap around.  Callers validate on the host,
    where they have the sizes.
    """
    split_sizes = _check_args(split_sizes, strides, include_leading_zero, dtypes)
    if torch.compiler.is_compiling():  # one grouped::splits_to_offsets op, values checked when it runs
        from .custom_ops import splits_to_offsets_in_graph

        return splits_to_offsets_in_graph(split_sizes, strides=strides, include_leading_zero=include_leading_zero,
                                          dtypes=dtypes)
    if split_sizes.device.type == "cpu":
        _check_values(split_sizes, strides, dtypes)

    n = split_sizes.numel()
    lengths = [n + int(z) for z in include_leading_zero]
    outs = _empty_outputs(lengths, dtypes, split_sizes.device, bulk_allocate)

    if kernels.usable(split_sizes) and n > 0:
        try:
            _offsets_on_gpu(split_sizes, outs, strides, include_leading_zero)
            return outs
        except Exception as e:
            if not kernels.fall_back(e):
                raise
    csum = torch.cumsum(split_sizes, 0, dtype=torch.int64)
    for out, s, z in zip(outs, strides, include_leading_zero):
        body = out
        if z:
            out[:1].zero_()
            body = out[1:]
        body.copy_(csum if s == 1 else csum * s)  # int64 -> dtype; wraps on CUDA
    return outs


def _offsets_on_gpu(split_sizes, outs, strides, include_leading_zero) -> None:
    from cute_backend import offsets as offsets_kernel

    step = offsets_kernel.MAX_OUTPUTS
    for i in range(0, len(outs), step):  # one launch per 8 outputs
        offsets_kernel.launch(split_sizes, outs[i : i + step], strides[i : i + step],
                              include_leading_zero[i : i + step])
