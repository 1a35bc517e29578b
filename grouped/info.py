"""``python -m grouped info``: what this machine has and what each backend can do here."""

from __future__ import annotations

from importlib import metadata

import torch

from . import __version__, kernels, selector


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_of_this_machine() -> tuple[str, tuple[int, int] | None, str]:
    """(device type, compute capability, description) of the best device here."""
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(0)
        return "cuda", cap, f"{torch.cuda.get_device_name(0)} (sm{cap[0]}{cap[1]})"
    return "cpu", None, "none (CPU only)"


def _kernel_path(device_type: str, cap) -> str:
    reason = kernels.unavailable(device_type, cap)
    return "CuTe DSL kernels" if reason is None else f"torch reference path ({reason})"


def _kernel_cache_status() -> str:
    if kernels.missing_packages():
        return "kernel cache: not used (the CuTe DSL toolchain is not installed)"
    from cute_backend.cache import status

    return status()


def _probe_kernels(device_type: str, cap) -> None:
    """On a GPU the kernels could run on, build or load one (splits_to_offsets) so a machine
    where they cannot be built says so here, not on the first real call."""
    if kernels.unavailable(device_type, cap) is None:
        from .offsets import splits_to_offsets

        splits_to_offsets(torch.ones(2, dtype=torch.int32, device="cuda"), strides=[1], include_leading_zero=[False],
                          dtypes=[torch.int32])


def report() -> str:
    device_type, cap, gpu = device_of_this_machine()
    _probe_kernels(device_type, cap)
    lines = [
        f"grouped {__version__}",
        f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, GPU: {gpu}",
        f"nvidia-cutlass-dsl {_package_version('nvidia-cutlass-dsl')}, "
        f"nvidia-cudnn-frontend {_package_version('nvidia-cudnn-frontend')}",
        _kernel_cache_status(),
        f"splits_to_offsets: {_kernel_path(device_type, cap)}",
        f"quantize, GroupedTensor.quantize_: {_kernel_path(device_type, cap)}",
        "",
        f"backends on this machine ({device_type}):",
    ]
    table = selector.availability(device_type, cap)
    names = list(next(iter(table.values())))
    width = max(len(n) for n in names) + 2
    for fmt, row in table.items():
        lines.append(f"  {fmt}:")
        for name in names:
            reason = row[name]
            lines.append(f"    {name:<{width}}{'available' if reason is None else 'unavailable: ' + reason}")
    lines.append("")
    lines.append("note: the cudnn (Blackwell) path has not run on hardware here; it refuses experts whose")
    lines.append("      token counts are not multiples of 256 (forward/dgrad) or 128 (wgrad).")
    return "\n".join(lines)
