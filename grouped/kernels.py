"""Whether our CuTe DSL kernels (cute_backend) can run for a device, and why not.

One predicate serves the quantize / splits_to_offsets wiring, the cute GEMM
backend and ``python -m grouped info``. It only looks for the packages; it
never imports them (``import grouped`` stays light). When a kernel turns out
not to build or load here (no C compiler, say), ``fall_back`` records why:
from then on ``unavailable`` says so, the callers take their torch path or the
next backend, and one warning tells the user what to fix (GROUPED_STRICT=1
raises instead).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from . import env

REQUIRED_PACKAGES = {"cutlass": "nvidia-cutlass-dsl", "tvm_ffi": "apache-tvm-ffi"}
_failure: str | None = None  # why a kernel could not be built or loaded in this process


@functools.lru_cache(maxsize=None)
def missing_packages() -> tuple[str, ...]:
    return tuple(pkg for module, pkg in REQUIRED_PACKAGES.items() if importlib.util.find_spec(module) is None)


def unavailable(device_type: str, capability: tuple[int, int] | None) -> str | None:
    """None if the sm90 CuTe DSL kernels can run on such a device, else why not."""
    if device_type != "cuda" or capability is None or capability[0] != 9:
        return "needs a Hopper GPU (sm90)"
    missing = missing_packages()
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'grouped-gemm[kernels]')"
    return _failure


def usable(t: torch.Tensor) -> bool:
    """True when a tensor's device can run the kernels (cached per device)."""
    return _failure is None and t.is_cuda and _device_ok(
        t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_ok(index: int) -> bool:
    return unavailable("cuda", torch.cuda.get_device_capability(index)) is None


def fall_back(error: BaseException) -> bool:
    """Whether ``error`` says our kernels cannot be built or loaded here (cute_backend's
    KernelUnavailable). If so it is recorded and warned about once, and the caller takes its
    other path; GROUPED_STRICT=1 raises it instead."""
    global _failure
    if type(error).__name__ != "KernelUnavailable":
        return False
    if env.flag("GROUPED_STRICT"):
        raise error
    if _failure is None:
        _failure = f"our CuTe DSL kernels cannot be built or loaded here: {error}"
        warnings.warn(f"grouped: {_failure}. Falling back to the torch path / the next backend.", RuntimeWarning,
                      stacklevel=3)
        from . import selector

        selector.clear_cache()  # decisions that named the cute backend
    return True
