"""quantize_both's compiled entries (device code): one a format, with quantize_both's arguments,
launching the kernel its spec names (``kernel``, compiled in):

- "tiles": shared-memory CTA tiles (fused_rowcol.py), any input; ``unit`` is the neighbouring
  column tiles a CTA takes in a row;
- "register-tiles" (MXFP8) / "warp-tiles" (NVFP4): the bf16 kernels; ``unit`` is the row tiles a
  band of their tile order.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64

from . import fused_rowcol, fused_rowcol_mxfp8_bf16, fused_rowcol_nvfp4_bf16


@cute.jit
def both_mxfp8_host(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, col_data_bytes: Int64, col_scale_bytes: Int64,
    unit: Int32, grid_ctas: Int32, facts: cutlass.Constexpr, kernel: cutlass.Constexpr, stream,
):
    outputs = (row_data, row_scale, col_data, col_scale)
    if cutlass.const_expr(kernel == "tiles"):  # no per-tensor scales: the table stands in for them
        scalars = (n_groups, steps, m_rows, k_cols, Int32(0), col_data_bytes, col_scale_bytes, unit)
        fused_rowcol.launch(x, table, *outputs, table, table, scalars, grid_ctas, stream, facts)
    else:
        scalars = (n_groups, steps, m_rows, k_cols, col_data_bytes, col_scale_bytes, unit)
        fused_rowcol_mxfp8_bf16.launch(x, table, *outputs, scalars, grid_ctas, stream, facts)


@cute.jit
def both_nvfp4_host(
    x: cute.Tensor, table: cute.Tensor, row_data: cute.Tensor, row_scale: cute.Tensor,
    col_data: cute.Tensor, col_scale: cute.Tensor, s_row: cute.Tensor, s_col: cute.Tensor,
    n_groups: Int32, steps: Int32, m_rows: Int64, k_cols: Int64, row_s_mode: Int32,
    col_data_bytes: Int64, col_scale_bytes: Int64, unit: Int32, grid_ctas: Int32, facts: cutlass.Constexpr,
    kernel: cutlass.Constexpr, stream,
):
    outputs = (row_data, row_scale, col_data, col_scale)
    scalars = (n_groups, steps, m_rows, k_cols, row_s_mode, col_data_bytes, col_scale_bytes, unit)
    if cutlass.const_expr(kernel == "tiles"):
        fused_rowcol.launch(x, table, *outputs, s_row, s_col, scalars, grid_ctas, stream, facts)
    else:
        fused_rowcol_nvfp4_bf16.launch(x, table, *outputs, s_row, s_col, scalars, grid_ctas, stream, facts)
