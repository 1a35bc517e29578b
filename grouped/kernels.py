"""Whether our CuTe DSL kernels (cute_backend) can run for a device, and why not.

One predicate serves the quantize / splits_to_offsets wiring, the cute GEMM
backend and ``python -m grouped info``. It only looks for the packages; it
never imports them (``import grouped`` stays light).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

REQUIRED_PACKAGES = {"cutlass": "nvidia-cutlass-dsl", "tvm_ffi": "apache-tvm-ffi"}


@functools.lru_cache(maxsize=None)
def _missing_packages() -> tuple[str, ...]:
    return tuple(pkg for module, pkg in REQUIRED_PACKAGES.items() if importlib.util.find_spec(module) is None)


def unavailable(device_type: str, capability: tuple[int, int] | None) -> str | None:
    """None if the sm90 CuTe DSL kernels can run on such a device, else why not."""
    if device_type != "cuda" or capability is None or capability[0] != 9:
        return "needs a Hopper GPU (sm90)"
    missing = _missing_packages()
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'grouped-gemm[kernels]')"
    return None


def usable(t: torch.Tensor) -> bool:
    """True when a tensor's device can run the kernels (cached per device)."""
    return t.is_cuda and _device_ok(t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_ok(index: int) -> bool:
    return unavailable("cuda", torch.cuda.get_device_capability(index)) is None
