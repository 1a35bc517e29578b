"""Splits: how a token tensor's rows divide into experts, as one value.

Given as host split sizes (a list or a CPU tensor), as split sizes on the GPU, or as inclusive
end offsets on the GPU. A Splits is built once per call (grouped.gemm builds it from its
arguments) or once per layer step (GroupedLinear / GroupedMLP pass theirs to every GEMM), and
everything that needs the grouping asks it:

- ``sizes``: the host sizes, or None when they live on the GPU;
- ``end_offsets(dtype)``: inclusive ends on the operands' device, made once and kept;
- ``host_sizes(rows)``: the sizes on the host (one sync when they live on the GPU);
- ``counts()``: the sizes on the device;
- ``row_groups(rows)``: each row's expert (``num_groups`` past the split total), no sync.

What a Splits holds is its own: host sizes are copied into a tuple and GPU sizes turned into new
end offsets when it is built, so a later change to the caller's list or tensor cannot reach a
backward that runs after it. End offsets the caller gives (``offsets=``) are used as they are.
"""

from __future__ import annotations

import torch

from .quantize import split_sizes_to_list

OFFSET_DTYPES = (torch.int32, torch.int64)


class Splits:
    __slots__ = ("num_groups", "device", "sizes", "_ends", "_synced")

    def __init__(self, num_groups: int, device: torch.device, *, sizes: tuple[int, ...] | None = None,
                 ends: torch.Tensor | None = None):
        self.num_groups, self.device, self.sizes = num_groups, device, sizes
        self._synced: tuple[int, ...] | None = None  # GPU sizes, read to the host once asked for
        self._ends: dict[torch.dtype, torch.Tensor] = {} if ends is None else {ends.dtype: ends}

    @classmethod
    def of(cls, split_sizes=None, offsets=None, *, rows: int, num_groups: int | None, device: torch.device,
           ) -> "Splits":
        """Check and hold the grouping of ``rows`` token rows: exactly one of ``split_sizes`` (a
        Splits, a list of ints, or a 1-D int tensor on the CPU or ``device``) and ``offsets``
        (inclusive end offsets, same forms). ``num_groups``: the expert count the call implies,
        None when only the split sizes tell it."""
        if isinstance(split_sizes, Splits) and offsets is None:
            split_sizes.check(rows, num_groups, device)
            return split_sizes
        if (split_sizes is None) == (offsets is None):
            raise ValueError("give exactly one of split_sizes and offsets")
        given, name = (split_sizes, "split_sizes") if offsets is None else (offsets, "offsets")
        if isinstance(given, torch.Tensor) and given.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} must be on the CPU or a CUDA device, got a tensor on {given.device}")
        if isinstance(given, torch.Tensor) and given.device.type == "cuda":
            if given.dim() != 1 or given.dtype not in OFFSET_DTYPES:
                raise ValueError(
                    f"{name} must be a 1-D int32/int64 tensor, got {given.dtype} of shape {tuple(given.shape)}")
            if given.device != device:
                raise ValueError(f"{name} is on {given.device}, the operands on {device}")
            g = given.shape[0]
            if num_groups is not None and g != num_groups:
                raise ValueError(f"{name} has {g} entries, expected one per expert ({num_groups})")
            ends = given if offsets is not None else torch.cumsum(given, 0, dtype=torch.int32)
            return cls(g, device, ends=ends)
        if offsets is not None:
            ends = split_sizes_to_list(offsets, rows=2**62, argument="offsets")
            if any(b < a for a, b in zip(ends, ends[1:])):
                raise ValueError(f"offsets must be non-decreasing end offsets, got {list(ends)}")
            given, name = [e - s for s, e in zip((0, *ends), ends)], "offsets (as split sizes)"
        sizes = split_sizes_to_list(given, rows=rows, argument=name)
        g = len(sizes) if num_groups is None else num_groups
        if len(sizes) != g:
            raise ValueError(f"{name} has {len(sizes)} entries, expected one per expert ({g})")
        return cls(g, device, sizes=sizes)

    def check(self, rows: int, num_groups: int | None, device: torch.device) -> None:
        """A Splits built for another call must fit this one."""
        if num_groups is not None and num_groups != self.num_groups:
            raise ValueError(f"split_sizes has {self.num_groups} entries, expected one per expert ({num_groups})")
        if self.device != device:
            raise ValueError(f"split_sizes were built for {self.device}, the operands are on {device}")
        if self.sizes is not None and sum(self.sizes) > rows:
            raise ValueError(f"split_sizes sum to {sum(self.sizes)}, past the {rows} rows of the tensor")

    @property
    def on_device(self) -> bool:
        """The sizes live on the GPU (no host copy was given)."""
        return self.sizes is None

    def end_offsets(self, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """Inclusive ends (G,) on the device, made once per dtype (no sync)."""
        ends = self._ends.get(dtype)
        if ends is None:
            if self._ends:
                ends = next(iter(self._ends.values())).to(dtype)
            else:
                running = torch.tensor(self.sizes, dtype=torch.int64).cumsum(0).to(dtype)
                ends = running.to(self.device, non_blocking=True)
            self._ends[dtype] = ends
        return ends

    def counts(self) -> torch.Tensor:
        """The sizes (G,) as int64 on the device (no sync)."""
        ends = self.end_offsets(torch.int64)
        return torch.diff(ends, prepend=ends.new_zeros(1))

    def host_sizes(self, rows: int) -> tuple[int, ...]:
        """The sizes on the host, checked to fit a tensor of ``rows`` rows; one sync, once, when they
        live on the GPU (whose values nothing checked before)."""
        if self.sizes is not None:
            return self.sizes
        if self._synced is None:
            ends = [0, *self.end_offsets(torch.int64).tolist()]
            self._synced = split_sizes_to_list([e - s for s, e in zip(ends, ends[1:])], rows=2**62)
        if sum(self._synced) > rows:
            raise ValueError(f"split_sizes (on the GPU) sum to {sum(self._synced)}, past the {rows} rows of the tensor")
        return self._synced

    def total(self):
        """sum of the sizes: a Python int for host sizes, a 0-d device tensor otherwise (no sync)."""
        return sum(self.sizes) if self.sizes is not None else self.end_offsets(torch.int64)[-1]

    def row_groups(self, rows: int) -> torch.Tensor:
        """Each row's expert index on the device (num_groups for rows past the total), no sync."""
        ends = self.end_offsets(torch.int32)
        return torch.searchsorted(ends, torch.arange(rows, device=ends.device, dtype=torch.int32), right=True)

    def __repr__(self) -> str:
        what = f"sizes={list(self.sizes)}" if self.sizes is not None else "on the GPU"
        return f"Splits({self.num_groups} experts, {what})"
