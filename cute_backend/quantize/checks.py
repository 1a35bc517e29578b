"""Argument checks of the quantize host functions: ``can_implement_*`` say why a call cannot run."""

from __future__ import annotations

import torch

from .config import COL_THREADS, FORMATS, TABLE_COLS, FormatFacts

INPUT_DTYPES = (torch.bfloat16, torch.float32)
DATA_DTYPE = {"mxfp8": torch.float8_e4m3fn, "nvfp4": torch.uint8}  # uint8 is taken for either
SCALE_DTYPE = {"mxfp8": torch.uint8, "nvfp4": torch.float8_e4m3fn}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_format(fmt) -> str | None:
    """None if the kernels are written for ``fmt``, else why not."""
    if not isinstance(fmt, FormatFacts):
        return f"fmt must be a FormatFacts (grouped.quantize.kernel_facts), got {type(fmt).__name__} {fmt!r:.80}"
    if FORMATS.get(fmt.name) != (fmt.block_size, fmt.elements_per_byte):
        supported = ", ".join(f"{name} (blocks of {b}, {e} a byte)" for name, (b, e) in FORMATS.items())
        return f"fmt must be one of {supported}, got {fmt}"
    return None


def _check_x(x, fmt: FormatFacts, *, rowwise: bool) -> str | None:
    if not isinstance(x, torch.Tensor):
        return f"x must be a torch.Tensor, got {type(x).__name__}"
    if x.device.type != "cuda":
        return f"x must be on a CUDA device, got {x.device}"
    if x.dtype not in INPUT_DTYPES:
        return f"x must be bf16 or fp32, got {x.dtype}"
    if x.dim() != 2:
        return f"x must be 2-D, got shape {tuple(x.shape)}"
    if not x.is_contiguous():
        return "x must be contiguous"
    if rowwise:
        if x.shape[1] % fmt.block_size:
            return f"x's last dim {x.shape[1]} is not a multiple of the {fmt} block size {fmt.block_size}"
        if x.data_ptr() % 16:
            return "x must start 16-byte aligned"
    return None


def _check_bytes(name: str, t, allowed: tuple, device, *, align: int) -> str | None:
    if not isinstance(t, torch.Tensor):
        return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if t.device != device:
        return f"{name} is on {t.device}, x on {device}"
    if t.dtype not in allowed:
        return f"{name} must have dtype {' or '.join(str(d) for d in allowed)}, got {t.dtype}"
    if not t.is_contiguous():
        return f"{name} must be contiguous"
    if t.data_ptr() % align:
        return f"{name} must start {align}-byte aligned"
    return None


def _check_columnwise_outputs(x, fmt: FormatFacts, data: tuple, scale: tuple) -> str | None:
    """Columnwise data and scale buffers ((name, tensor) each): any contiguous bytes of the right dtype."""
    (data_name, data_t), (scale_name, scale_t) = data, scale
    return _check_bytes(data_name, data_t, (DATA_DTYPE[fmt.name], torch.uint8), x.device, align=16) or _check_bytes(
        scale_name, scale_t, (SCALE_DTYPE[fmt.name], torch.uint8), x.device, align=1
    )


def _check_rowwise_outputs(x, fmt: FormatFacts, data: tuple, scale: tuple, scale_align: int) -> str | None:
    """The rowwise data and scale buffers ((name, tensor) each) for x: dtype (or uint8), device,
    alignment (data 16 bytes, scale ``scale_align``) and shape."""
    rows, k = x.shape
    for (name, t), dtype, shape, align in (
        (data, DATA_DTYPE[fmt.name], (rows, k // fmt.elements_per_byte), 16),
        (scale, SCALE_DTYPE[fmt.name], (rows, k // fmt.block_size), scale_align),
    ):
        reason = _check_bytes(name, t, (dtype, torch.uint8), x.device, align=align)
        if reason:
            return reason
        if tuple(t.shape) != shape:
            return f"{name} must have shape {shape} for x of shape {tuple(x.shape)} ({fmt}), got {tuple(t.shape)}"
    return None


def check_global_scale(name: str, s, n: int, device, fmt: FormatFacts) -> str | None:
    if fmt.name == "mxfp8":
        return None if s is None else f"{name} is for NVFP4 only; MXFP8 has no per-tensor scale"
    if not isinstance(s, torch.Tensor):
        return f"NVFP4 needs {name}, a ({n},) fp32 tensor of per-tensor scales S"
    if s.device != device or s.dtype != torch.float32 or tuple(s.shape) != (n,) or not s.is_contiguous():
        return (
            f"{name} must be a contiguous ({n},) fp32 tensor on {device}, "
            f"got shape {tuple(s.shape)}, {s.dtype} on {s.device}"
        )
    return None


def _check_groups(groups, x) -> str | None:
    if not isinstance(groups, torch.Tensor):
        return f"groups must be the (G, {TABLE_COLS}) int64 table of group_table(), got {type(groups).__name__}"
    if (
        groups.device != x.device or groups.dtype != torch.int64 or groups.dim() != 2
        or groups.shape[1] != TABLE_COLS or not groups.is_contiguous()
    ):
        return (
            f"groups must be a contiguous (G, {TABLE_COLS}) int64 tensor on {x.device} (see group_table), "
            f"got shape {tuple(groups.shape)}, {groups.dtype} on {groups.device}"
        )
    if groups.data_ptr() % 16:
        return "groups must start 16-byte aligned"
    return None


def can_implement_rowwise(x, fmt, data, scale, row_scale=None) -> str | None:
    """None if quantize_rowwise can run this call, else why not."""
    reason = check_format(fmt) or _check_x(x, fmt, rowwise=True) or _check_rowwise_outputs(
        x, fmt, ("data", data), ("scale", scale), 1
    )
    return reason or check_global_scale("row_scale", row_scale, x.shape[0], x.device, fmt)


def can_implement_columnwise(x, fmt, data, scale, groups, col_scale=None) -> str | None:
    """None if quantize_columnwise can run this call, else why not."""
    reason = (check_format(fmt) or _check_x(x, fmt, rowwise=False) or _check_groups(groups, x)
              or _check_columnwise_outputs(x, fmt, ("data", data), ("scale", scale)))
    if reason:
        return reason
    if data.numel() % 4:
        return f"data must hold a multiple of 4 bytes, got {data.numel()}"
    grid_blocks = ceil_div(x.shape[0], fmt.block_size) + groups.shape[0]
    if grid_blocks >= 2**31 or ceil_div(x.shape[1], COL_THREADS) >= 2**16:
        return f"x of shape {tuple(x.shape)} is too large for one launch"
    return check_global_scale("col_scale", col_scale, groups.shape[0], x.device, fmt)


def can_implement_both(x, fmt, row_data, row_scale, col_data, col_scale, groups,
                       row_scale_s=None, col_scale_s=None) -> str | None:
    """None if quantize_both can run this call, else why not."""
    reason = check_format(fmt) or _check_x(x, fmt, rowwise=True) or _check_groups(groups, x) or _check_rowwise_outputs(
        x, fmt, ("row_data", row_data), ("row_scale", row_scale), 4
    ) or _check_columnwise_outputs(x, fmt, ("col_data", col_data), ("col_scale", col_scale))
    if reason:
        return reason
    rows, k = x.shape
    if rows * k >= 2**62 or groups.shape[0] >= 2**31:
        return f"x of shape {tuple(x.shape)} is too large for one launch"
    if fmt.name == "mxfp8":
        if row_scale_s is not None or col_scale_s is not None:
            return "row_scale_s / col_scale_s are for NVFP4 only; MXFP8 has no per-tensor scale"
        return None
    reason = check_global_scale("col_scale_s", col_scale_s, groups.shape[0], x.device, fmt)
    if reason or row_scale_s is None:
        return reason
    return check_global_scale("row_scale_s", row_scale_s, rows, x.device, fmt)


def can_implement_amax(x, fmt, groups, global_scale) -> str | None:
    """None if group_amax can run this call, else why not."""
    reason = check_format(fmt)
    if reason:
        return reason
    if fmt.name != "nvfp4":
        return f"group_amax is NVFP4's (its per-tensor scale S), got {fmt}"
    reason = _check_x(x, fmt, rowwise=False) or _check_groups(groups, x)
    if reason:
        return reason
    if x.shape[1] % 16 or x.data_ptr() % 16:
        return "x's last dim must be a multiple of 16 and x 16-byte aligned"
    return check_global_scale("global_scale", global_scale, groups.shape[0], x.device, fmt)
