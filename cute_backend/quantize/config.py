"""What the quantize host modules and device modules share (neither imports the other).

The host modules put these values in each kernel's config (its KernelSpec, hence its cache
key); the device modules compile them in. No cutlass or torch import: a warm process reads it.
"""

from __future__ import annotations

from ..facts import FormatFacts  # noqa: F401 (the facts every kernel config carries)

# The formats the kernels are written for: name -> (block size, elements a byte).
FORMATS = {"mxfp8": (32, 1), "nvfp4": (16, 2)}
DATA_ALIGN = {"mxfp8": 16, "nvfp4": 8}  # bytes: where a columnwise block's data may start

# The group table: one int64 row a group (the package doc says what each column holds).
TABLE_COLS = 8
ROW_START, ROWS, BLOCK_START, DATA_OFFSET, DATA_STRIDE, SCALE_OFFSET, SCALE_STRIDE = range(7)

ROW_THREADS = 128  # rowwise.py: threads a CTA, one block each
COL_THREADS = 128  # columnwise.py: threads a CTA, one column each

# Both directions in one pass over x (quantize_both). Every kernel's tile spans TILE_ROWS rows:
# TILE_ROWS / block padded blocks of the group table.
TILE_ROWS = 128
# fused_rowcol.py (fp32 x): shared-memory tiles of TILE_ROWS x TILE_COLS, TILE_STAGES cp.async
# stages deep, TILE_THREADS threads a CTA.
TILE_COLS = 64
TILE_STAGES = 2
TILE_THREADS = 128
# fused_rowcol_mxfp8_bf16.py: register tiles, a lane holding ROWS_PER_LANE rows x COLS_PER_LANE
# columns, REGISTER_TILE_WARPS warps a CTA side by side in columns.
ROWS_PER_LANE = 16
COLS_PER_LANE = 8
REGISTER_TILE_WARPS = 4
REGISTER_TILE_COLS = 32 // (TILE_ROWS // ROWS_PER_LANE) * COLS_PER_LANE * REGISTER_TILE_WARPS  # a CTA's 128
# fused_rowcol_nvfp4_bf16.py: a warp quantizes a TILE_ROWS x WARP_TILE_COLS tile on its own, in
# shared memory; WARP_TILE_WARPS warps a CTA.
WARP_TILE_COLS = 64
WARP_TILE_WARPS = 1

# amax.py (group_amax): tiles of AMAX_ROWS (two NVFP4 blocks) x AMAX_COLS, AMAX_THREADS a CTA.
AMAX_ROWS = 32
AMAX_COLS = 256
AMAX_THREADS = 128
