"""The backend registry: one adapter a backend, in the order explain() lists them."""

from __future__ import annotations

from ..env import BACKEND_NAMES
from .base import Backend
from .cublas import CublasBackend
from .cudnn import CudnnBackend
from .cute import CuteBackend
from .reference import ReferenceBackend
from .torch_grouped_mm import TorchBackend

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (ReferenceBackend(), CublasBackend(), TorchBackend(), CuteBackend(), CudnnBackend())
}
assert tuple(BACKENDS) == BACKEND_NAMES, "env.BACKEND_NAMES must list the registered backends"

__all__ = ["BACKENDS", "Backend"]
