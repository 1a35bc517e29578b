"""GroupedTensor: one set of flat buffers holding N member tensors.

Members are 2-D, (m_i, K) with a shared K and first dims that may differ
(per-expert token chunks, or per-expert weights where all m_i are equal). For a
block-scaled format the buffers are:

- ``data`` / ``scale``: rowwise (blocks along K), member i stored exactly as
  ``grouped.quantize(x_i, fmt)`` stores it: (m_i, K) data, (m_i, K/block) scales;
- ``columnwise_data`` / ``columnwise_scale`` (optional): blocks along the
  member's first dim, stored as ``grouped.quantize(x_i, fmt, axis=0,
  split_sizes=[m_i])`` stores it: transposed, (K, pad(m_i)) with the member
  zero-padded to a multiple of the block;
- ``global_scale``: NVFP4's per-member S, shape (N,), shared by both directions
  (it depends only on the member's amax).

For BF16 only ``data`` exists (rowwise, in the member dtype). Every member's
region starts 16-byte aligned. ``split()`` gives per-member views of the
buffers (no copy); ``quantize_`` rewrites the buffers in place, and leaves them
unchanged when a device-side ``noop_flag`` is nonzero, without a host sync, so a
CUDA graph can replay it every step and keep the cached values when the source
did not change.

The class knows formats only through their descriptor (grouped.formats).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import kernels
from .buffers import ALIGN_BYTES, ceil_to
from .formats import Format, get_format
from .quantize import KERNEL_INPUT_DTYPES, QuantizedTensor, kernel_facts, quantize, split_sizes_to_list

STORAGE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # bf16 storage, and what quantize_ reads


def _member_shapes(shapes) -> list[tuple[int, ...]]:
    """Member shapes as int tuples; anything that is not a non-negative int (2.9, True, "8") raises."""
    try:
        members = [tuple(s) for s in shapes]
    except TypeError:
        raise ValueError(f"GroupedTensor: shapes must be a sequence of (m_i, K) pairs, got {shapes!r:.80}") from None
    for s in members:
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in s):
            raise ValueError(f"GroupedTensor: member shapes must hold non-negative ints, got {s}")
    return members


@dataclass(frozen=True)
class _Region:
    """A member's slice of a flat byte buffer: offset, view shape and dtype."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * self.dtype.itemsize

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


def _plan(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> tuple[list[_Region], int]:
    """Lay regions of the given shapes one after another, each 16-byte aligned."""
    regions, offset = [], 0
    for shape in shapes:
        region = _Region(offset, shape, dtype)
        regions.append(region)
        offset = ceil_to(offset + region.nbytes, ALIGN_BYTES)
    return regions, offset


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The members as one (R, K) tensor: a view when they follow each other in memory
    (the experts of one weight, the splits of one token tensor), else a concatenation."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    consecutive = all(
        t.is_contiguous() and t.dtype == first.dtype and t.untyped_storage().data_ptr() == storage for t in tensors
    ) and all(a.data_ptr() + a.numel() * a.element_size() == b.data_ptr() for a, b in zip(tensors, tensors[1:]))
    if consecutive:
        rows = sum(t.shape[0] for t in tensors)
        return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))
    return torch.cat(tensors)


class GroupedTensor:
    """N member tensors of shape (m_i, K) in one set of buffers (see module doc)."""

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        fmt: str | Format = "bf16",
        *,
        rowwise: bool = True,
        columnwise: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        self.fmt = get_format(fmt)
        self.shapes = _member_shapes(shapes)
        self._check_shapes()
        if not (rowwise or columnwise):
            raise ValueError("GroupedTensor: at least one of rowwise and columnwise must be True")
        if columnwise and not self.fmt.quantized:
            raise ValueError(
                f"GroupedTensor: columnwise storage is for block-scaled formats, not {self.fmt.name}"
            )
        self.rowwise, self.columnwise = rowwise, columnwise
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" -> "cuda:<current>"
            self.device = torch.device("cuda", torch.cuda.current_device())
        if not self.fmt.quantized and dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"GroupedTensor: dtype must be one of {STORAGE_DTYPES} for {self.fmt.name} storage, got {dtype}")
        self.dtype = dtype if not self.fmt.quantized else None

        self.data = self.scale = self.columnwise_data = self.columnwise_scale = None
        self.global_scale = None
        self._tables: tuple | None = None  # member sizes and columnwise group table on the device (GPU path)
        self._regions: dict[str, list[_Region]] = {}
        for name, shapes_, region_dtype in self._buffer_specs():
            regions, nbytes = _plan(shapes_, region_dtype)
            self._regions[name] = regions
            setattr(self, name, torch.zeros(nbytes, dtype=torch.uint8, device=self.device))
        if self.fmt.has_global_scale:
            self.global_scale = torch.ones(len(self.shapes), dtype=torch.float32, device=self.device)

    def _check_shapes(self):
        if not self.shapes:
            raise ValueError("GroupedTensor: shapes must name at least one member")
        if any(len(s) != 2 or min(s) < 0 for s in self.shapes):
            raise ValueError(f"GroupedTensor: every member shape must be 2-D (m_i, K), got {self.shapes}")
        widths = {s[1] for s in self.shapes}
        if len(widths) != 1:
            raise ValueError(f"GroupedTensor: members must share their last dim, got {sorted(widths)}")
        (k,) = widths
        if self.fmt.quantized and k % self.fmt.block_size:
            raise ValueError(
                f"GroupedTensor: the last dim {k} is not a multiple of the {self.fmt.name} "
                f"block size {self.fmt.block_size}"
            )

    def _pad(self, m: int) -> int:
        return ceil_to(m, self.fmt.block_size)

    def _buffer_specs(self):
        """(buffer name, per-member stored shapes, dtype) for each buffer this tensor has."""
        f = self.fmt
        if not f.quantized:
            return [("data", self.shapes, self.dtype)]
        specs = []
        if self.rowwise:
            specs.append(("data", [(m, f.packed_len(k)) for m, k in self.shapes], f.data_dtype))
            specs.append(("scale", [(m, k // f.block_size) for m, k in self.shapes], f.scale_dtype))
        if self.columnwise:
            padded = [(k, self._pad(m)) for m, k in self.shapes]
            specs.append(("columnwise_data", [(k, f.packed_len(p)) for k, p in padded], f.data_dtype))
            specs.append(("columnwise_scale", [(k, p // f.block_size) for k, p in padded], f.scale_dtype))
        return specs

    # ---- construction from values -------------------------------------------------------

    @classmethod
    def from_tensor(
        cls,
        x: torch.Tensor,
        split_sizes,
        fmt: str | Format = "bf16",
        *,
        rowwise: bool = True,
        columnwise: bool = False,
    ) -> "GroupedTensor":
        """Members are consecutive row ranges of x (rows past the split total are dropped)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"GroupedTensor.from_tensor: x must be a 2-D tensor, got {x!r:.60}")
        sizes = split_sizes_to_list(split_sizes, rows=x.shape[0])
        grouped = cls(
            [(m, x.shape[1]) for m in sizes], fmt, rowwise=rowwise, columnwise=columnwise,
            dtype=x.dtype, device=x.device,
        )
        grouped.quantize_(list(torch.split(x[: sum(sizes)], list(sizes))))
        return grouped

    @property
    def num_members(self) -> int:
        return len(self.shapes)

    # ---- views ------------------------------------------------------------------------------

    def split(self, *, columnwise: bool = False) -> list:
        """Per-member views of the buffers: tensors (BF16) or QuantizedTensors."""
        if not self.fmt.quantized:
            return [r.view(self.data) for r in self._regions["data"]]
        if columnwise and not self.columnwise:
            raise ValueError("GroupedTensor.split: this tensor has no columnwise storage")
        if not columnwise and not self.rowwise:
            raise ValueError("GroupedTensor.split: this tensor has no rowwise storage")
        prefix = "columnwise_" if columnwise else ""
        data, scale = getattr(self, prefix + "data"), getattr(self, prefix + "scale")
        views = []
        for i, shape in enumerate(self.shapes):
            s = self.global_scale
            if s is not None:
                s = s[i : i + 1] if columnwise else s[i]
            views.append(
                QuantizedTensor(
                    data=self._regions[prefix + "data"][i].view(data),
                    scale=self._regions[prefix + "scale"][i].view(scale),
                    global_scale=s,
                    fmt=self.fmt,
                    axis=0 if columnwise else -1,
                    shape=torch.Size(shape),
                    split_sizes=(shape[0],) if columnwise else None,
                )
            )
        return views

    def stacked(self, *, columnwise: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The members' quantized data and scales as two (sum of rows, cols) uint8 tensors, views of
        the buffers, when the members' regions follow each other with no alignment gap and share
        their width (else None). Rows: m_i rowwise; K per member columnwise (stored transposed)."""
        prefix = "columnwise_" if columnwise else ""
        views = []
        for name in (prefix + "data", prefix + "scale"):
            regions = self._regions[name]
            widths = {r.shape[1] * r.dtype.itemsize for r in regions}
            if len(widths) != 1 or any(b.offset != a.offset + a.nbytes for a, b in zip(regions, regions[1:])):
                return None
            rows, width, start = sum(r.shape[0] for r in regions), widths.pop(), regions[0].offset
            views.append(getattr(self, name)[start: start + rows * width].view(rows, width))
        return views[0], views[1]

    def dequantize(self) -> list[torch.Tensor]:
        """fp32 value of every member (from rowwise storage where present)."""
        if not self.fmt.quantized:
            return [t.float() for t in self.split()]
        return [q.dequantize() for q in self.split(columnwise=not self.rowwise)]

    # ---- in-place update -----------------------------------------------------------------

    def quantize_(self, tensors: Sequence[torch.Tensor], noop_flag: torch.Tensor | None = None):
        """Write the members' new values into the existing buffers, in place.

        ``noop_flag``: a scalar tensor (CPU or on the buffers' device); where it
        is nonzero the buffers keep their old contents. Read on the device, so
        no host sync.
        """
        tensors = list(tensors)
        if len(tensors) != self.num_members:
            raise ValueError(f"quantize_: expected {self.num_members} tensors, got {len(tensors)}")
        for i, (t, shape) in enumerate(zip(tensors, self.shapes)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"quantize_: tensors[{i}] must have shape {shape}, got {got}")
            if t.device != self.device:
                raise ValueError(f"quantize_: tensors[{i}] is on {t.device}, the buffers on {self.device}")
            if t.dtype not in STORAGE_DTYPES:
                raise ValueError(f"quantize_: tensors[{i}] must be one of {STORAGE_DTYPES}, got {t.dtype}")
        keep = None
        if noop_flag is not None:
            if not isinstance(noop_flag, torch.Tensor) or noop_flag.numel() != 1:
                raise ValueError(f"quantize_: noop_flag must be a one-element tensor, got {noop_flag!r:.60}")
            keep = noop_flag.reshape(()).to(self.device) != 0

        def write(dst: torch.Tensor, src: torch.Tensor):
            src = src.to(dst.dtype)
            dst.copy_(src if keep is None else torch.where(keep, dst, src))

        if not self.fmt.quantized:
            for dst, t in zip(self.split(), tensors):
                write(dst, t)
            return self
        if kernels.usable(tensors[0]) and self._rowwise_gap_free():
            try:
                self._quantize_on_gpu(tensors, keep)
                return self
            except Exception as e:
                if not kernels.fall_back(e):
                    raise
        directions = [c for c, on in ((False, self.rowwise), (True, self.columnwise)) if on]
        for columnwise in directions:
            for i, (dst, t) in enumerate(zip(self.split(columnwise=columnwise), tensors)):
                # A member's stored form is exactly what grouped.quantize gives for it.
                args = dict(axis=0, split_sizes=[t.shape[0]]) if columnwise else {}
                q = quantize(t, self.fmt, **args)
                write(dst.data.view(torch.uint8), q.data.view(torch.uint8))
                write(dst.scale.view(torch.uint8), q.scale.view(torch.uint8))
                if self.global_scale is not None and columnwise == directions[0]:
                    write(self.global_scale[i], q.global_scale.reshape(()))
        return self

    def _rowwise_gap_free(self) -> bool:
        """Rowwise regions follow each other with no alignment gap: one (R, K) array."""
        if not self.rowwise:
            return True
        return all(r.nbytes % ALIGN_BYTES == 0 for name in ("data", "scale") for r in self._regions[name][:-1])

    def _quantize_on_gpu(self, tensors: list[torch.Tensor], keep: torch.Tensor | None) -> None:
        """All members in one pass (cute_backend/quantize.py): one launch for both directions, plus
        one amax pass for NVFP4.

        With a noop flag the kernels write temporaries that replace the buffers
        only where the flag is zero (torch.where: no host sync).
        """
        from cute_backend import quantize as kernel

        fmt = self.fmt
        facts = kernel_facts(fmt)
        rows = _stacked(tensors)
        if rows.dtype not in KERNEL_INPUT_DTYPES:
            rows = rows.float()
        k = rows.shape[1]
        counts, table = self._device_tables()
        s = None
        if fmt.has_global_scale:  # each member's S from its finite amax, one pass, into its buffer
            s = self.global_scale if keep is None else torch.empty_like(self.global_scale)
            kernel.group_amax(rows, facts, table, s)
        names = [n for n, on in (("data", self.rowwise), ("scale", self.rowwise), ("columnwise_data", self.columnwise),
                                 ("columnwise_scale", self.columnwise)) if on]
        target = {n: getattr(self, n) if keep is None else torch.empty_like(getattr(self, n)) for n in names}
        r = rows.shape[0]
        if self.rowwise:
            row_data = target["data"][: r * k // fmt.elements_per_byte].view(r, -1)
            row_scale = target["scale"][: r * k // fmt.block_size].view(r, -1)
        if self.rowwise and self.columnwise:  # one pass over the input for both directions
            kernel.quantize_both(rows, facts, row_data, row_scale, target["columnwise_data"],
                                 target["columnwise_scale"], table, None, s)
        elif self.rowwise:
            row_s = None if s is None else s.repeat_interleave(counts, output_size=r)
            kernel.quantize_rowwise(rows, facts, row_data, row_scale, row_s)
        else:
            kernel.quantize_columnwise(rows, facts, target["columnwise_data"], target["columnwise_scale"], table, s)
        if keep is not None:
            for n in names:
                getattr(self, n).copy_(torch.where(keep, getattr(self, n), target[n]))
            if s is not None:
                self.global_scale.copy_(torch.where(keep, self.global_scale, s))

    def _device_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Member sizes and the kernels' group table (member rows; columnwise regions), built once.

        Built on the first call, so a CUDA graph that captures quantize_ later
        copies nothing from the host.
        """
        if self._tables is None:
            from cute_backend import quantize as kernel

            sizes = [m for m, _ in self.shapes]
            if self.columnwise:
                data, scale = self._regions["columnwise_data"], self._regions["columnwise_scale"]
                table = kernel.group_table(
                    sizes, kernel_facts(self.fmt), device=self.device,
                    data_offsets=[r.offset for r in data], data_strides=[r.shape[1] * r.dtype.itemsize for r in data],
                    scale_offsets=[r.offset for r in scale], scale_strides=[r.shape[1] for r in scale],
                )
            else:  # only the member rows matter (NVFP4's amax)
                table = kernel.group_table(sizes, kernel_facts(self.fmt), device=self.device, data_row_bytes=0,
                                           scale_row_bytes=0)
            self._tables = (torch.tensor(sizes, device=self.device), table)
        return self._tables

    def __repr__(self) -> str:
        parts = [f"{len(self.shapes)} members", self.fmt.name, str(self.device)]
        if self.fmt.quantized:
            parts.append("+".join(d for d, on in (("rowwise", self.rowwise), ("columnwise", self.columnwise)) if on))
        return f"GroupedTensor({', '.join(parts)})"
