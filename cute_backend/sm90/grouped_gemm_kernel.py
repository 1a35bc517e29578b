"""Device code of the sm90 grouped GEMM (host side: grouped_gemm.py).

One persistent, warp-specialized kernel serves the three GEMMs of a grouped
linear layer (see grouped/problem.py), for group g with rows/tokens
[start_g, start_g + len_g) of the token-major operands:

- ragged M (forward, dgrad): C[start_g + i, :] = A[start_g + i, :] @ B_g^T
  A (T, K) K-major; B (N, K, G) K-major (forward: W) or N-major (dgrad: W^T);
  C (T, N) with any 16-byte aligned row stride.
- ragged K (wgrad): C_g = A_g^T @ B_g over the group's tokens
  A (T, M) and B (T, N) token-major (so M-/N-major operands); C (G, M, N),
  written, or added to (fp32, TMA reduce-add) when accumulating.

Warp roles (384 threads): warp 0 issues TMA loads into a ring of shared
memory stages; two consumer warpgroups take turns ("pingpong"): each runs
wgmma on every other 128 x tile_n tile of its CTA and then stores it through
its own shared memory buffers with TMA, so one warpgroup's epilogue overlaps
the other's mainloop (short-K tiles, e.g. wgrad with many experts, spend a
large share of their time in the epilogue). Every role walks the same
(group, tile) sequence and decodes each work item from the group end offsets in
global memory (``_locate``), so one compile serves every split and nothing is
read on the host (graph-safe). The sequence is either
- static: CTA b takes one work item a round of grid items, item b on even
  rounds and grid - 1 - b on odd ones (``_work``), every role computing it; or
- dynamic (clusters of one CTA only): the load warp claims each next item from
  a global counter (one atomic add; the host zeroes the counter every call) and
  publishes it to the consumer warpgroups through a small ring of shared memory
  slots. A CTA that drew cheap items takes more, which balances items of
  unequal cost: wgrad tiles of experts with many and with few tokens, or tiles
  that mostly store their output.

Clusters of ``cluster_m`` CTAs (2: as quack's default on sm90) take
neighbouring row tiles of one column tile: a work item is then a block of
cluster_m x tile_m rows, CTA r of the cluster computing its row tile r. They
share the B tile: each CTA loads 1/cluster_m of it and multicasts it to all
(half the L2 -> SM traffic for B), so a stage is free only once the consumers
of every CTA of the cluster have released it. A cluster's row tile past its
group (an odd number of row tiles) runs the mainloop on rows that are never
stored (the multicast needs every CTA).

Group boundaries without per-group TMA descriptors: the ragged dim of a TMA
view is re-expressed with extra dims so that the TMA bound check stops at the
group's end (the "ragged TMA" encoding of Triton's ``ragged_tma.py``):
- stores (ragged M output) use one extra dim and a base pointer moved back by
  BIG rows: row r of group g is coordinate (BIG - len_g + r, ..., start_g + len_g),
  in bounds exactly for r < len_g, so a tile never writes past its group;
- loads (ragged K operands) use two extra dims whose strides wrap around the
  64-bit address space instead of moving the base pointer (a moved pointer must
  stay mapped for loads): tokens past the group's end read as zeros.
Ragged M loads need neither: rows past a group's end only feed output rows
that are never stored, and rows past T are zero-filled by TMA.

A last column tile narrower than tile_n (N = 4096: 64 of its 192 columns) runs the full wgmma,
and its epilogue skips the subtiles wholly past N. Narrower wgmmas for such tiles (64 / 128
columns, 3% less MMA work at N = 4096) were tried and made the long-K shapes with N = 4096 up to
20% slower (Mixtral 4096->28672 dgrad, H100), likely because the CTAs that get the cheap tiles
drift out of step with the rest and the L2 reuse of the operand slices read in lockstep is lost.

Block-scaled operands (MXFP8, NVFP4; ``fmt`` set): every operand is stored with
its contraction dim last (grouped.quantize's storage rule), so all of them are
K-major, and the wgrad operands are (M, P) and (N, P) with each group's tokens
at a block-aligned (padded) offset. The load warp brings raw tiles into a
second ring of stages, and the producer warpgroup's other three warps decode
them into the bf16 stages the consumers multiply, unchanged (decode_warps.py;
the numerics: block_decode.py). A weight-only GEMM (``weight_only``: a bf16
activation with NVFP4 weights) copies A's raw tile and decodes B's. NVFP4's
per-tensor scales fold into the epilogue: C = acc / (S_a S_b) for the tile's
group (``_tensor_scale``).
"""

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Boolean, Float32, Int32, Int64, Uint8, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.tensor_utils import LayoutEnum

from ..ptx import div_rn
from .decode_warps import DECODE_THREADS, DECODE_WARPS, Codec, DecodeWarps

BIG = 2**30  # size of a ragged dim; past any real extent
MAX = 2**31 - 1  # size of the extra dims
WRAP = 2**64 // BIG  # BIG * WRAP == 2**64: addresses wrap to the true base
TILE_K = 64
BAND_M = 16  # row tiles per raster band (see _locate)
THREADS_PER_WARPGROUP = 128
CONSUMER_WARPGROUPS = 2
LOAD_WARP = 0
PRODUCER_REGISTERS, CONSUMER_REGISTERS = 40, 232
# block-scaled: the decode warps need more (128 x 64 + 256 x 224 = 64K registers)
DECODING_PRODUCER_REGISTERS, DECODING_CONSUMER_REGISTERS = 64, 224
EPI_COLUMNS = 32  # the epilogue stores 128 x 32 subtiles
# Per warpgroup: one subtile buffer, written once its previous TMA store has read it (the other
# warpgroup's mainloop runs meanwhile). Two cost a pipeline stage (bf16 out: 4 stages, not 5;
# fp32: 3, not 4) and were slower in two interleaved H100 runs: Qwen3-30B shapes 5-8%, all 42
# benchmark cases 1.6-1.8% (geometric mean).
EPI_BUFFERS = 1
SMEM_BYTES = 227 * 1024
WORK_SLOTS = 4  # dynamic scheduling: work items the load warp may claim ahead of the consumers
# Block-scaled operands: warps 1-3 of the producer warpgroup decode (decode_warps.py); MMA_STAGES
# decoded bf16 stages, the rest of shared memory holds raw stages (up to MAX_LOAD_STAGES).
MMA_STAGES = 3
MAX_LOAD_STAGES = 6


def ragged_store_view(t: cute.Tensor) -> cute.Tensor:
    """(rows, cols) -> (BIG, cols, MAX) view for TMA stores that stop at a group's end."""
    stride = t.stride[0]
    base = cute.domain_offset((-BIG, 0), t).iterator  # BIG rows before the real base (never dereferenced)
    return cute.make_tensor(base, cute.make_layout((BIG, t.shape[1], MAX), stride=(stride, 1, stride)))


def ragged_load_view(t: cute.Tensor) -> cute.Tensor:
    """Token-major (tokens, cols) -> (cols, BIG, MAX, MAX) view for TMA loads that read zeros
    past a group's end (cols is the contiguous dim)."""
    stride = t.stride[0]
    layout = cute.make_layout((t.shape[1], BIG, MAX, MAX), stride=(1, stride, WRAP - stride, stride))
    return cute.make_tensor(t.iterator, layout)


def group_rows(view: cute.Tensor, start: Int32, length: Int32, ragged_mode: int) -> cute.Tensor:
    """The 2-D coordinate view of one group's rows of a ragged TMA tensor (see the module doc)."""
    if const_expr(cute.rank(view) == 3):  # store view: (BIG, cols, MAX)
        return cute.domain_offset((BIG - length, 0), view[None, None, start + length])
    offset = (0, BIG - length) if const_expr(ragged_mode == 1) else (BIG - length, 0)
    return cute.domain_offset(offset, view[None, None, BIG, start + length])


def accumulator_subtiles(acc: cute.Tensor, columns: int) -> cute.Tensor:
    """A wgmma accumulator ((2, 2, N/8), M, 1) viewed as ((2, 2, 2), M, (columns/16, N/columns)):
    the last mode picks the epilogue subtile of ``columns`` columns (all rows of the tile)."""
    (s_col, s_row, s_n8), s_m = acc.layout.stride[0], acc.layout.stride[1]
    per_subtile = columns // 16
    subtiles = acc.layout.shape[0][2] // (2 * per_subtile)
    layout = cute.make_layout(
        ((2, 2, 2), acc.layout.shape[1], (per_subtile, subtiles)),
        stride=((s_col, s_row, s_n8), s_m, (2 * s_n8, 2 * per_subtile * s_n8)),
    )
    return cute.make_tensor(acc.iterator, layout)


@cute.jit
def warp_inclusive_sum(x: Int32, lane: Int32) -> Int32:
    for i in cutlass.range_constexpr(5):
        other = cute.arch.shuffle_sync_up(x, 1 << i)
        if lane >= (1 << i):
            x = x + other
    return x


class GroupedGemmSm90(DecodeWarps):
    """Persistent warp-specialized grouped GEMM; see the module doc."""

    def __init__(self, ragged: str, b_major: str, accumulate: bool, tile_m: int, tile_n: int, cluster_m: int,
                 dynamic: bool = False, fmt=None, weight_only: bool = False):
        """fmt: None for bf16 operands, or the FormatFacts of block-scaled ones (MXFP8, NVFP4);
        weight_only: A is a bf16 activation, only B is block-scaled (NVFP4 forward)."""
        # a warpgroup holds a whole tile's fp32 accumulator: tile_n registers a thread
        assert ragged in ("m", "k") and b_major in ("k", "mn") and tile_m == 128 and tile_n in (128, 192)
        assert cluster_m in (1, 2) and not (dynamic and cluster_m > 1)
        assert fmt is None or (fmt.name in ("mxfp8", "nvfp4") and b_major == "k")
        assert not weight_only or (fmt is not None and fmt.name == "nvfp4" and ragged == "m")
        self.fmt = fmt
        self.block_scaled = fmt is not None
        self.weight_only = weight_only
        # NVFP4's per-tensor scales S fold into the epilogue: C *= 1 / (S_a S_b) per group
        self.tensor_scaled = fmt is not None and fmt.name == "nvfp4"
        if self.block_scaled:
            self.a_codec, self.b_codec = Codec.of(fmt, bf16=weight_only), Codec.of(fmt, bf16=False)
        self.work_slots = WORK_SLOTS
        self.dynamic = dynamic
        self.cluster_m = cluster_m
        self.ragged = ragged
        self.b_major = b_major
        self.accumulate = accumulate
        self.tile_shape_mnk = (tile_m, tile_n, TILE_K)
        self.acc_dtype = Float32
        self.threads = (1 + CONSUMER_WARPGROUPS) * THREADS_PER_WARPGROUP
        self.consumer_threads = CONSUMER_WARPGROUPS * THREADS_PER_WARPGROUP

    # ------------------------------------------------------------------ host

    @cute.jit
    def __call__(self, a: cute.Tensor, b: cute.Tensor, c: cute.Tensor, scale_a: cute.Tensor, scale_b: cute.Tensor,
                 tensor_scale_a: cute.Tensor, tensor_scale_b: cute.Tensor, ends: cute.Tensor, counter: cute.Tensor,
                 max_ctas: Int32, stream):
        """a, b, c as torch hands them (see grouped_gemm.py); scale_a, scale_b: block-scaled operands'
        compact scales, one byte a block along the contraction dim; tensor_scale_a, tensor_scale_b:
        NVFP4's per-group fp32 scales S (G,); ends: (G,) int32 group end offsets; counter: an int32
        zero, the dynamic scheduler's claim counter (static: not read). Arguments a call does not
        need are not read."""
        self.a_dtype, self.b_dtype, self.c_dtype = a.element_type, b.element_type, c.element_type
        self.raw_a_dtype, self.raw_b_dtype = Uint8, Uint8
        if const_expr(self.block_scaled):
            self.raw_a_dtype, self.raw_b_dtype = a.element_type, b.element_type
            self.a_dtype = self.b_dtype = BFloat16  # what the MMA multiplies, once decoded
        mScaleB = scale_b
        if const_expr(self.ragged == "m"):
            # a (T, K); b the weight (G, N_w, K_w); c (T, N)
            g_s, r_s, c_s = b.stride
            b_view = (b.shape[1], b.shape[2]) if self.b_major == "k" else (b.shape[2], b.shape[1])
            b_stride = (r_s, c_s) if self.b_major == "k" else (c_s, r_s)
            mB = cute.make_tensor(b.iterator, cute.make_layout((*b_view, b.shape[0]), stride=(*b_stride, g_s)))
            mA, mC = a, ragged_store_view(c)
            self.a_layout = LayoutEnum.ROW_MAJOR
            self.b_layout = LayoutEnum.ROW_MAJOR if self.b_major == "k" else LayoutEnum.COL_MAJOR
            problem_m, problem_n, problem_k = 0, c.shape[1], a.shape[1]
            if const_expr(self.block_scaled):  # a's stored columns -> elements of the contraction
                problem_k = a.shape[1] * (TILE_K // self.a_codec.raw_elements(TILE_K))
        elif const_expr(self.block_scaled):
            # a (M, P), b (N, P): contraction-major, each group's tokens at a block-aligned offset; c (G, M, N)
            mA, mB = a, b
            g_s, m_s, n_s = c.stride
            mC = cute.make_tensor(
                c.iterator, cute.make_layout((c.shape[1], c.shape[2], c.shape[0]), stride=(m_s, n_s, g_s)))
            self.a_layout = self.b_layout = LayoutEnum.ROW_MAJOR
            problem_m, problem_n, problem_k = c.shape[1], c.shape[2], 0
            # scale_b (N, P/block) seen as one group's (1, N, P/block), as ragged M's (G, N, K/block)
            mScaleB = cute.make_tensor(
                scale_b.iterator, cute.make_layout((1, *scale_b.shape), stride=(0, *scale_b.stride)))
        else:
            # a (T, M), b (T, N) token-major; c (G, M, N)
            mA, mB = ragged_load_view(a), ragged_load_view(b)
            g_s, m_s, n_s = c.stride
            mC = cute.make_tensor(
                c.iterator, cute.make_layout((c.shape[1], c.shape[2], c.shape[0]), stride=(m_s, n_s, g_s)))
            self.a_layout = self.b_layout = LayoutEnum.COL_MAJOR
            problem_m, problem_n, problem_k = c.shape[1], c.shape[2], 0
        self.c_layout = LayoutEnum.ROW_MAJOR
        self._setup()

        load_a_layout, load_b_layout = self.a_smem_layout, self.b_smem_layout
        if const_expr(self.block_scaled):
            load_a_layout, load_b_layout = self.raw_a_layout, self.raw_b_layout
        tma_a, tma_tensor_a = self._tma_load(mA, load_a_layout, (self.tile_shape_mnk[0], self._load_k("a")))
        tma_b, tma_tensor_b = self._tma_load(mB, load_b_layout, (self.tile_shape_mnk[1], self._load_k("b")),
                                             self.cluster_m)
        store_op = (cpasync.CopyReduceBulkTensorTileS2GOp() if const_expr(self.accumulate)
                    else cpasync.CopyBulkTensorTileS2GOp())
        tma_c, tma_tensor_c = cpasync.make_tiled_tma_atom(
            store_op, mC, cute.slice_(self.epi_smem_layout, (None, None, 0)), self.epi_tile
        )

        @cute.struct
        class SharedStorage:
            ab_barriers: cute.struct.MemRange[Int64, self.ab_stages * 2]
            work_barriers: cute.struct.MemRange[Int64, WORK_SLOTS * 2]
            work_slots: cute.struct.MemRange[Int32, WORK_SLOTS]
            load_barriers: cute.struct.MemRange[Int64, self.load_stages * 2]
            sA: cute.struct.Align[cute.struct.MemRange[self.a_dtype, cute.cosize(self.a_smem_layout)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[self.b_dtype, cute.cosize(self.b_smem_layout)], 1024]
            sC: cute.struct.Align[cute.struct.MemRange[self.c_dtype, cute.cosize(self.epi_smem_layout)], 1024]
            # block-scaled: raw stages (one byte each for bf16 operands, never used)
            sA_raw: cute.struct.Align[cute.struct.MemRange[self.raw_a_dtype, cute.cosize(self.raw_a_layout)], 1024]
            sB_raw: cute.struct.Align[cute.struct.MemRange[self.raw_b_dtype, cute.cosize(self.raw_b_layout)], 1024]

        self.shared_storage = SharedStorage
        self.kernel(
            tma_a, tma_tensor_a, tma_b, tma_tensor_b, tma_c, tma_tensor_c, scale_a, mScaleB, tensor_scale_a,
            tensor_scale_b, ends, counter, problem_m, problem_n, problem_k,
            self.tiled_mma, self.a_smem_layout, self.b_smem_layout, self.epi_smem_layout, self.raw_a_layout,
            self.raw_b_layout,
        # one CTA: no cluster attribute (a launch with clusters of one measured ~20% slower, H100)
        ).launch(grid=(max_ctas, 1, 1), block=(self.threads, 1, 1), min_blocks_per_mp=1, stream=stream,
                 cluster=(self.cluster_m, 1, 1) if const_expr(self.cluster_m > 1) else None)

    def _setup(self):
        tile_m, tile_n, _ = self.tile_shape_mnk
        # one warpgroup's MMA: it covers the 128-row tile as two rows of 64 x tile_n wgmma
        self.tiled_mma = sm90_utils.make_trivial_tiled_mma(
            self.a_dtype, self.b_dtype, self.a_layout.sm90_mma_major_mode(), self.b_layout.sm90_mma_major_mode(),
            self.acc_dtype, (1, 1, 1), tiler_mn=(64, tile_n),
        )
        self.epi_tile = (tile_m, EPI_COLUMNS)
        ab_bytes = (tile_m + tile_n) * TILE_K * self.a_dtype.width // 8
        epi_bytes = cute.size(self.epi_tile) * self.c_dtype.width // 8 * EPI_BUFFERS * CONSUMER_WARPGROUPS
        self.ab_stages = (SMEM_BYTES - 1024 - epi_bytes) // ab_bytes
        self.load_stages = 1  # raw stages (block-scaled operands; one unused element otherwise)
        raw_shapes = ((1, 1), (1, 1))  # (rows, stored elements a row) of A's and B's raw tiles
        if const_expr(self.block_scaled):
            self.ab_stages = MMA_STAGES
            raw_bytes = tile_m * self.a_codec.raw_bytes(TILE_K) + tile_n * self.b_codec.raw_bytes(TILE_K)
            free_bytes = SMEM_BYTES - 3 * 1024 - epi_bytes - MMA_STAGES * ab_bytes
            self.load_stages = min(MAX_LOAD_STAGES, free_bytes // raw_bytes)
            raw_shapes = ((tile_m, self._load_k("a")), (tile_n, self._load_k("b")))
        (a_rows, a_k), (b_rows, b_k) = raw_shapes
        self.raw_a_layout = cute.make_layout((a_rows, a_k, self.load_stages), stride=(a_k, 1, a_rows * a_k))
        self.raw_b_layout = cute.make_layout((b_rows, b_k, self.load_stages), stride=(b_k, 1, b_rows * b_k))
        self.a_smem_layout = sm90_utils.make_smem_layout_a(
            self.a_layout, self.tile_shape_mnk, self.a_dtype, self.ab_stages)
        self.b_smem_layout = sm90_utils.make_smem_layout_b(
            self.b_layout, self.tile_shape_mnk, self.b_dtype, self.ab_stages)
        self.epi_smem_layout = sm90_utils.make_smem_layout_epi(
            self.c_dtype, self.c_layout, self.epi_tile, EPI_BUFFERS * CONSUMER_WARPGROUPS
        )

    def _load_k(self, operand: str) -> int:
        """Stored elements a k-tile of an operand spans (its raw tile's width; TILE_K for bf16)."""
        if not self.block_scaled:
            return TILE_K
        return (self.a_codec if operand == "a" else self.b_codec).raw_elements(TILE_K)

    @staticmethod
    def _tma_load(tensor, smem_layout_staged, tile, multicast: int = 1):
        op = cpasync.CopyBulkTensorTileG2SOp() if multicast == 1 else cpasync.CopyBulkTensorTileG2SMulticastOp()
        return cpasync.make_tiled_tma_atom(
            op, tensor, cute.slice_(smem_layout_staged, (None, None, 0)), tile, num_multicast=multicast
        )

    # ------------------------------------------------------------------ work decoding

    @cute.jit
    def _locate(self, work: Int32, group_base: Int32, tiles_before: Int32, ends: cute.Tensor, problem_m: Int32,
                tiles_n: Int32):
        """Decode work item ``work`` -> (valid, group, tile_m, tile_n, start, length, group_base,
        tiles_before), tile_m the index of the item's block of cluster_m row tiles. Ragged M:
        groups have ceil(len / block) x tiles_n items; one warp scans 32 groups at a time (prefix
        sum of item counts, ballot), resuming from the window of the previous item since a
        cluster's items only increase. Ragged K: every group has the same items."""
        num_groups = cute.size(ends.shape[0])
        tile_m = self.tile_shape_mnk[0] * self.cluster_m
        group = Int32(num_groups)
        tile_in_group = Int32(0)
        if const_expr(self.ragged == "k"):
            tiles_m = (problem_m + tile_m - 1) // tile_m
            per_group = tiles_m * tiles_n
            group = work // per_group
            tile_in_group = work - group * per_group
        else:
            lane = cute.arch.lane_idx()
            searching = group_base < num_groups
            while searching:
                g = group_base + lane
                begin, end = Int32(0), Int32(0)
                if g < num_groups:
                    end = ends[g]
                    if g > 0:
                        begin = ends[g - 1]
                tiles = (end - begin + tile_m - 1) // tile_m * tiles_n
                inclusive = warp_inclusive_sum(tiles, lane)
                window = cute.arch.shuffle_sync(inclusive, 31)
                if work < tiles_before + window:
                    before = cute.arch.popc(cute.arch.vote_ballot_sync(tiles_before + inclusive <= work))
                    group = group_base + before
                    tile_in_group = work - tiles_before - cute.arch.shuffle_sync(inclusive - tiles, before)
                    searching = Boolean(False)
                else:
                    tiles_before = tiles_before + window
                    group_base = group_base + 32
                    searching = group_base < num_groups
        valid = group < num_groups
        start, length = Int32(0), Int32(0)
        if valid:
            end = ends[group]
            if group > 0:
                start = ends[group - 1]
            length = end - start
        # Raster inside a group: bands of BAND_M row tiles, row tile fastest inside a band, so the
        # ~132 tiles in flight cover about 16 x 8 tiles (2048 x 2048 of the output) and read each
        # operand tile from DRAM about once (walking a wide N first would re-read all of B[g]
        # for every row of tiles).
        rows = problem_m if const_expr(self.ragged == "k") else length
        band_m = BAND_M // self.cluster_m
        band = tile_in_group // (band_m * tiles_n)
        in_band = tile_in_group - band * band_m * tiles_n
        band_rows = cutlass.max(cutlass.min(band_m, (rows + tile_m - 1) // tile_m - band * band_m), 1)
        tile_n_idx = in_band // band_rows
        tile_m_idx = band * band_m + in_band - tile_n_idx * band_rows
        return valid, group, tile_m_idx, tile_n_idx, start, length, group_base, tiles_before

    def _work(self, item: Int32, cluster: Int32, clusters: Int32) -> Int32:
        """The cluster's item-th work item: rounds of ``clusters`` items, the clusters in order on
        even rounds and in reverse on odd ones, so a run of costly tiles (an expert with many tokens,
        wgrad) is spread over the clusters rather than stacked on the first ones each round. Items
        of one cluster only increase, as ``_locate`` needs."""
        return item * clusters + cluster + (item % 2) * (clusters - 1 - 2 * cluster)

    @cute.jit
    def _producer_work(self, item: Int32, cluster: Int32, clusters: Int32, counter: cute.Tensor, work_pipeline,
                       work_state, work_slots: cute.Tensor) -> Int32:
        """The load warp's next work item: claimed from the global counter and published to the
        consumers (dynamic; claims past the last item decode as invalid, ending every role's walk),
        or the cluster's item-th (static). The caller advances work_state."""
        work = Int32(0)
        if const_expr(self.dynamic):
            work_pipeline.producer_acquire(work_state)
            if cute.arch.lane_idx() == 0:
                work = cute.arch.atomic_add(counter.iterator, Int32(1))
                work_slots[work_state.index] = work
                work_pipeline.producer_commit(work_state)
            work = cute.arch.shuffle_sync(work, 0)
        else:
            work = self._work(item, cluster, clusters)
        return work

    @cute.jit
    def _consumer_work(self, item: Int32, cluster: Int32, clusters: Int32, work_pipeline, work_state,
                       work_slots: cute.Tensor) -> Int32:
        """A consumer warpgroup's next work item: the one the load warp published (dynamic), or the
        cluster's item-th (static). The caller advances work_state."""
        work = Int32(0)
        if const_expr(self.dynamic):
            work_pipeline.consumer_wait(work_state)
            work = work_slots[work_state.index]
            work_pipeline.consumer_release(work_state)
        else:
            work = self._work(item, cluster, clusters)
        return work

    def _k_tiles(self, length: Int32, problem_k: Int32) -> Int32:
        contraction = length if const_expr(self.ragged == "k") else problem_k
        if const_expr(self.block_scaled and self.ragged == "k"):  # the group's blocks, zero-padded
            contraction = self._padded(length)
        return (contraction + TILE_K - 1) // TILE_K

    def _padded(self, length: Int32) -> Int32:
        block = self.fmt.block_size
        return (length + block - 1) // block * block

    @cute.jit
    def _k_origin(self, ends: cute.Tensor, group: Int32) -> Int32:
        """Where a group's contraction starts in a block-scaled wgrad operand: the sum of the
        block-padded sizes of the groups before it (one warp, 32 groups at a time). 0 otherwise."""
        origin = Int32(0)
        if const_expr(self.block_scaled and self.ragged == "k"):
            lane = cute.arch.lane_idx()
            for base in cutlass.range(0, group, 32, unroll=1):
                g = base + lane
                size = Int32(0)
                if g < group:
                    size = ends[g]
                    if g > 0:
                        size = size - ends[g - 1]
                origin = origin + self._padded(size)
            for i in cutlass.range_constexpr(5):
                origin = origin + cute.arch.shuffle_sync_bfly(origin, 1 << i)
        return origin

    def _operand_tiles(self, mA, mB, group, tile_m_idx, tile_n_idx, start, length, k_origin):
        """This tile's A (tile_m, TILE_K, k) and B (tile_n, TILE_K, k) coordinate tensors."""
        tile_m, tile_n, _ = self.tile_shape_mnk
        if const_expr(self.ragged == "m"):
            a_rows = cute.domain_offset((start, 0), mA)
            b_group = mB[None, None, group]
        elif const_expr(self.block_scaled):  # the group's first stored column
            a_rows = cute.domain_offset((0, self.a_codec.raw_elements(k_origin)), mA)
            b_group = cute.domain_offset((0, self.b_codec.raw_elements(k_origin)), mB)
        else:
            a_rows = group_rows(mA, start, length, ragged_mode=1)
            b_group = group_rows(mB, start, length, ragged_mode=1)
        gA = cute.local_tile(a_rows, (tile_m, self._load_k("a")), (tile_m_idx, None))
        gB = cute.local_tile(b_group, (tile_n, self._load_k("b")), (tile_n_idx, None))
        return gA, gB

    def _tensor_scale(self, tensor_scale_a: cute.Tensor, tensor_scale_b: cute.Tensor, group: Int32) -> Float32:
        """NVFP4: a group's 1 / (S_a S_b) (1 / S_b for a bf16 activation), what its dequantized
        product is of the decoded one; 1 otherwise. Two divisions: S_a S_b overflows fp32 for
        operands whose amaxes multiply to under ~2e-32, where the quotient is still a number."""
        alpha = Float32(1.0)
        if const_expr(self.tensor_scaled):
            alpha = div_rn(alpha, tensor_scale_b[group])
            if const_expr(not self.weight_only):
                alpha = div_rn(alpha, tensor_scale_a[group])
        return alpha

    def _output_tile(self, mC, group, tile_m_idx, tile_n_idx, start, length):
        tile_m, tile_n, _ = self.tile_shape_mnk
        if const_expr(self.ragged == "m"):
            c_group = group_rows(mC, start, length, ragged_mode=0)
        else:
            c_group = mC[None, None, group]
        return cute.local_tile(c_group, (tile_m, tile_n), (tile_m_idx, tile_n_idx))

    # ------------------------------------------------------------------ per-K-slice hooks

    def _load_k_slice(self, tma_a, tAgA, tAsA, tma_b, tBgB, tBsB, k_tile, stage, barrier, b_mcast_mask):
        cute.copy(tma_a, tAgA[(None, k_tile)], tAsA[(None, stage)], tma_bar_ptr=barrier)
        if const_expr(self.cluster_m == 1):
            cute.copy(tma_b, tBgB[(None, k_tile)], tBsB[(None, stage)], tma_bar_ptr=barrier)
        else:  # this CTA's share of the B tile, to every CTA of the cluster
            cute.copy(tma_b, tBgB[(None, k_tile)], tBsB[(None, stage)], tma_bar_ptr=barrier, mcast_mask=b_mcast_mask)

    @cute.jit
    def _mma_k_slice(self, tiled_mma, acc, tCrA, tCrB, stage):
        for k_block in cutlass.range_constexpr(cute.size(tCrA, mode=[2])):
            coord = (None, None, k_block, stage)
            cute.gemm(tiled_mma, acc, tCrA[coord], tCrB[coord], acc)

    # ------------------------------------------------------------------ device

    @cute.kernel
    def kernel(
        self, tma_a: cute.CopyAtom, mA: cute.Tensor, tma_b: cute.CopyAtom, mB: cute.Tensor,
        tma_c: cute.CopyAtom, mC: cute.Tensor, scale_a: cute.Tensor, scale_b: cute.Tensor, tensor_scale_a: cute.Tensor,
        tensor_scale_b: cute.Tensor, ends: cute.Tensor, counter: cute.Tensor, problem_m: Int32, problem_n: Int32,
        problem_k: Int32,
        tiled_mma: cute.TiledMma, a_smem_layout: cute.ComposedLayout, b_smem_layout: cute.ComposedLayout,
        epi_smem_layout: cute.ComposedLayout, raw_a_layout: cute.Layout, raw_b_layout: cute.Layout,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        block, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        cluster, clusters = block // self.cluster_m, grid // self.cluster_m
        rank = Int32(0)  # the CTA's row tile within the cluster's block of rows
        b_mcast_mask = None
        if const_expr(self.cluster_m > 1):
            rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
            cta_layout = cute.make_layout((self.cluster_m, 1, 1))
            b_mcast_mask = cute.make_layout_image_mask(cta_layout, cta_layout.get_flat_coord(rank), mode=0)
        if warp_idx == LOAD_WARP:
            cpasync.prefetch_descriptor(tma_a)
            cpasync.prefetch_descriptor(tma_b)
            cpasync.prefetch_descriptor(tma_c)

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        if const_expr(self.block_scaled):
            # TMA -> raw stages -> the decode warps (of every CTA the B tile is multicast to) ...
            load_pipeline = pipeline.PipelineTmaAsync.create(
                barrier_storage=storage.load_barriers.data_ptr(),
                num_stages=self.load_stages,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
                consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, DECODE_WARPS * self.cluster_m),
                tx_count=cute.size_in_bytes(self.raw_a_dtype, cute.slice_(raw_a_layout, (None, None, 0)))
                + cute.size_in_bytes(self.raw_b_dtype, cute.slice_(raw_b_layout, (None, None, 0))),
                cta_layout_vmnk=cute.make_layout((1, self.cluster_m, 1, 1)),
                defer_sync=True,
            )
            # ... -> decoded bf16 stages -> the consumer warpgroup whose tile it is (every thread arrives)
            ab_pipeline = pipeline.PipelineAsync.create(
                barrier_storage=storage.ab_barriers.data_ptr(),
                num_stages=self.ab_stages,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, DECODE_THREADS),
                consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, THREADS_PER_WARPGROUP),
                defer_sync=True,
            )
        else:
            stage_bytes = (cute.size_in_bytes(self.a_dtype, cute.slice_(a_smem_layout, (None, None, 0)))
                           + cute.size_in_bytes(self.b_dtype, cute.slice_(b_smem_layout, (None, None, 0))))
            ab_pipeline = pipeline.PipelineTmaAsync.create(
                barrier_storage=storage.ab_barriers.data_ptr(),
                num_stages=self.ab_stages,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
                # the warps of one warpgroup, of every CTA that writes into this one's stages
                consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 4 * self.cluster_m),
                tx_count=stage_bytes,
                cta_layout_vmnk=cute.make_layout((1, self.cluster_m, 1, 1)),
                defer_sync=True,
            )
            load_pipeline = ab_pipeline
        # dynamic scheduling: the load warp claims each work item (one thread) and publishes it to
        # both consumer warpgroups and the decode warps (every thread reads it, then arrives)
        walkers = self.consumer_threads + (DECODE_THREADS if const_expr(self.block_scaled) else 0)
        work_pipeline = pipeline.PipelineAsync.create(
            barrier_storage=storage.work_barriers.data_ptr(),
            num_stages=WORK_SLOTS,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, walkers),
            defer_sync=True,
        )
        work_slots = storage.work_slots.get_tensor(cute.make_layout(WORK_SLOTS))
        pipeline.pipeline_init_arrive(cluster_shape_mn=(self.cluster_m, 1), is_relaxed=True)
        sA = storage.sA.get_tensor(a_smem_layout.outer, swizzle=a_smem_layout.inner)
        sB = storage.sB.get_tensor(b_smem_layout.outer, swizzle=b_smem_layout.inner)
        sC = storage.sC.get_tensor(epi_smem_layout.outer, swizzle=epi_smem_layout.inner)
        sA_load, sB_load = sA, sB
        if const_expr(self.block_scaled):
            sA_load, sB_load = storage.sA_raw.get_tensor(raw_a_layout), storage.sB_raw.get_tensor(raw_b_layout)
        tiles_n = (problem_n + self.tile_shape_mnk[1] - 1) // self.tile_shape_mnk[1]
        pipeline.pipeline_init_wait(cluster_shape_mn=(self.cluster_m, 1))

        warp_group = cute.arch.make_warp_uniform(tidx // THREADS_PER_WARPGROUP)
        if warp_group == 0:
            cute.arch.setmaxregister_decrease(DECODING_PRODUCER_REGISTERS if const_expr(self.block_scaled)
                                              else PRODUCER_REGISTERS)
        # Each role claims or reads its next work item and advances its states in its own loop body:
        # the DSL carries across loop iterations what the body itself assigns or advances, so moving
        # that into a shared helper changes the generated code (seen in the dynamic configs' PTX).
        if warp_idx == LOAD_WARP:
            state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.load_stages if const_expr(
                self.block_scaled) else self.ab_stages)
            work_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, WORK_SLOTS)
            item, group_base, tiles_before = Int32(0), Int32(0), Int32(0)
            work = self._producer_work(item, cluster, clusters, counter, work_pipeline, work_state, work_slots)
            work_state.advance()
            valid, group, tm, tn, start, length, group_base, tiles_before = self._locate(
                work, group_base, tiles_before, ends, problem_m, tiles_n)
            while valid:
                k_origin = self._k_origin(ends, group)
                gA, gB = self._operand_tiles(mA, mB, group, tm * self.cluster_m + rank, tn, start, length, k_origin)
                tAsA, tAgA = cpasync.tma_partition(tma_a, 0, cute.make_layout(1), cute.group_modes(sA_load, 0, 2),
                                                   cute.group_modes(gA, 0, 2))
                tBsB, tBgB = cpasync.tma_partition(tma_b, rank, cute.make_layout(self.cluster_m),
                                                   cute.group_modes(sB_load, 0, 2), cute.group_modes(gB, 0, 2))
                for k_tile in cutlass.range(self._k_tiles(length, problem_k), unroll=1):
                    load_pipeline.producer_acquire(state)
                    self._load_k_slice(tma_a, tAgA, tAsA, tma_b, tBgB, tBsB, k_tile, state.index,
                                       load_pipeline.producer_get_barrier(state), b_mcast_mask)
                    load_pipeline.producer_commit(state)
                    state.advance()
                item += 1
                work = self._producer_work(item, cluster, clusters, counter, work_pipeline, work_state, work_slots)
                work_state.advance()
                valid, group, tm, tn, start, length, group_base, tiles_before = self._locate(
                    work, group_base, tiles_before, ends, problem_m, tiles_n)
            load_pipeline.producer_tail(state)

        if const_expr(self.block_scaled):
            if warp_group == 0 and warp_idx != LOAD_WARP:
                self._decode_loop(tidx - 32, cluster, clusters, rank, ends, counter, work_pipeline, work_slots,
                                  load_pipeline, ab_pipeline, sA_load, sB_load, sA, sB, mA, mB, scale_a, scale_b,
                                  problem_m, problem_n, problem_k, tiles_n)

        if warp_group > 0:
            cute.arch.setmaxregister_increase(DECODING_CONSUMER_REGISTERS if const_expr(self.block_scaled)
                                              else CONSUMER_REGISTERS)
            consumer = warp_group - 1  # runs work items consumer, consumer + 2, ... of this CTA
            wg_tidx = tidx % THREADS_PER_WARPGROUP
            store_warp = warp_group * 4  # its first warp issues its TMA stores
            epilogue_barrier = pipeline.NamedBarrier(barrier_id=1 + consumer, num_threads=THREADS_PER_WARPGROUP)
            first_buffer = consumer * EPI_BUFFERS
            # Mainloops take turns: a warpgroup starts a tile once the other has issued all of its
            # own, so the stages it skips are at most one ring phase ahead of the producer (mbarrier
            # waits only tell phase parity). The epilogues need no order: separate buffers.
            my_turn = pipeline.NamedBarrier(barrier_id=3 + consumer, num_threads=self.consumer_threads)
            next_turn = pipeline.NamedBarrier(barrier_id=4 - consumer, num_threads=self.consumer_threads)
            if consumer == 1:
                next_turn.arrive()  # warpgroup 0 goes first

            thr_mma = tiled_mma.get_slice(0)  # one warpgroup's tiled MMA
            tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
            tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
            acc = cute.make_rmem_tensor(thr_mma.partition_shape_C(self.tile_shape_mnk[:2]), self.acc_dtype)

            # epilogue: registers -> shared memory (stmatrix for 16-bit) -> TMA store; fp32 output
            # keeps the stmatrix partition and stores with plain shared-memory stores
            r2s_atom = sm90_utils.get_smem_store_op(self.c_layout, self.c_dtype, self.acc_dtype)
            c_order = cute.make_copy_atom(cute.nvgpu.warp.StMatrix8x8x16bOp(False, 4), cutlass.Float16)
            tiled_r2s = cute.make_tiled_copy_S(r2s_atom, cute.make_tiled_copy_C_atom(c_order, tiled_mma))
            thr_r2s = tiled_r2s.get_slice(wg_tidx)
            tRS_sC = thr_r2s.partition_D(sC)
            acc_subtiles = accumulator_subtiles(acc, EPI_COLUMNS)
            fragment_shape = cute.shape(thr_r2s.partition_S(sC))[:3]
            tRS_f32 = cute.make_rmem_tensor(fragment_shape, self.acc_dtype)
            tRS_out = cute.make_rmem_tensor(fragment_shape, self.c_dtype)
            read_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.ab_stages)
            release_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.ab_stages)
            work_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, WORK_SLOTS)
            item, group_base, tiles_before = Int32(0), Int32(0), Int32(0)
            work = self._consumer_work(item, cluster, clusters, work_pipeline, work_state, work_slots)
            work_state.advance()
            valid, group, tm, tn, start, length, group_base, tiles_before = self._locate(
                work, group_base, tiles_before, ends, problem_m, tiles_n)
            while valid:
                k_tiles = self._k_tiles(length, problem_k)
                if item % CONSUMER_WARPGROUPS == consumer:
                    my_turn.arrive_and_wait()
                    acc.fill(0.0)
                    tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
                    warpgroup.fence()
                    for k_tile in cutlass.range(k_tiles, unroll=1):
                        ab_pipeline.consumer_wait(read_state)
                        self._mma_k_slice(tiled_mma, acc, tCrA, tCrB, read_state.index)
                        warpgroup.commit_group()
                        warpgroup.wait_group(1)  # the previous slice's wgmma is done: free its stage
                        if k_tile > 0:
                            ab_pipeline.consumer_release(release_state)
                            release_state.advance()
                        read_state.advance()
                    next_turn.arrive()
                    warpgroup.wait_group(0)
                    if k_tiles > 0:
                        ab_pipeline.consumer_release(release_state)
                        release_state.advance()

                    # accumulating into an expert with no tokens changes nothing: skip its store
                    store = Boolean(True)
                    if const_expr(self.accumulate):
                        store = k_tiles > 0
                    if store:
                        alpha = self._tensor_scale(tensor_scale_a, tensor_scale_b, group)
                        gC = self._output_tile(mC, group, tm * self.cluster_m + rank, tn, start, length)
                        gC_epi = cute.zipped_divide(gC, self.epi_tile)
                        bSG_sC, bSG_gC = cpasync.tma_partition(
                            tma_c, 0, cute.make_layout(1), cute.group_modes(sC, 0, 2), gC_epi)
                        columns_left = problem_n - tn * self.tile_shape_mnk[1]
                        for epi in cutlass.range_constexpr(cute.size(gC_epi, mode=[1])):
                            if epi * EPI_COLUMNS < columns_left:  # a subtile wholly past N stores nothing
                                buffer = first_buffer + epi % EPI_BUFFERS
                                if warp_idx == store_warp:  # this buffer's previous store has read it
                                    cute.arch.cp_async_bulk_wait_group(EPI_BUFFERS - 1, read=True)
                                epilogue_barrier.arrive_and_wait()
                                cute.autovec_copy(tiled_r2s.retile(acc_subtiles[None, None, (None, epi)]), tRS_f32)
                                if const_expr(self.tensor_scaled):
                                    tRS_out.store((tRS_f32.load() * alpha).to(self.c_dtype))
                                else:
                                    tRS_out.store(tRS_f32.load().to(self.c_dtype))
                                cute.copy(tiled_r2s, tRS_out, tRS_sC[(None, None, None, buffer)])
                                cute.arch.fence_proxy("async.shared", space="cta")
                                epilogue_barrier.arrive_and_wait()
                                if warp_idx == store_warp:
                                    cute.copy(tma_c, bSG_sC[(None, buffer)], bSG_gC[(None, (0, epi))])
                                    cute.arch.cp_async_bulk_commit_group()
                else:  # the other warpgroup's tile: skip its stages
                    read_state.advance(k_tiles)
                    release_state.advance(k_tiles)
                item += 1
                work = self._consumer_work(item, cluster, clusters, work_pipeline, work_state, work_slots)
                work_state.advance()
                valid, group, tm, tn, start, length, group_base, tiles_before = self._locate(
                    work, group_base, tiles_before, ends, problem_m, tiles_n)
            if warp_idx == store_warp:
                cute.arch.cp_async_bulk_wait_group(0, read=True)
