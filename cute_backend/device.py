"""The GPU a launch runs on."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (an index-less device: the current one); cached,
    since persistent grids are sized by it on every launch."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
