"""The decode warps of the sm90 grouped GEMM (device code; a mixin of GroupedGemmSm90).

With block-scaled operands the producer warpgroup's three spare warps sit between the load warp
and the consumers: for every k-tile, in the order the load warp loads them and the consumers
multiply them, they wait for the raw stage, decode it into a bf16 stage in the swizzled layout
wgmma reads (block_decode.py: the numerics), make their stores visible to the async proxy and
release the raw stage. The consumers run unchanged on the bf16 stages.

A stage's work is cut in units of one scale block of one row (16 elements of a bf16 activation,
copied as they are, for a weight-only GEMM); thread t takes units t, t + 96, ..., A's rows first,
so a warp never mixes A and B. Every unit's scale byte comes from global memory (compact scales,
L1-cached: a row's scales for consecutive stages share cache lines), the next unit's asked for
before this one is decoded. A unit past a group's end (wgrad: groups at block-padded offsets) or
past the tensor decodes to zero, so a tile may read its neighbour's bytes.
"""

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Boolean, Int32, Int64, Uint32, const_expr

from ..ptx import ld, mul_bf16x2, sel, st
from .block_decode import decode_e2m1x8, decode_e4m3x4, e2m1_tables, e4m3_factor, e8m0_factors

DECODE_WARPS = 3
DECODE_THREADS = DECODE_WARPS * 32
CHUNK = 16  # bytes a vector load or store moves
BF16_BYTES = 2


@dataclass(frozen=True)
class Codec:
    """How one operand's raw tile becomes bf16: ``name`` "mxfp8", "nvfp4" or "bf16" (copied as it
    is); ``block`` elements a unit (its scale block), ``elements_per_byte`` of the stored form."""

    name: str
    block: int
    elements_per_byte: int

    @staticmethod
    def of(fmt, bf16: bool) -> "Codec":
        return Codec("bf16", 16, 1) if bf16 else Codec(fmt.name, fmt.block_size, fmt.elements_per_byte)

    def raw_elements(self, elements):
        """Elements of the stored tensor (bytes, or bf16 values) that hold ``elements`` of the operand."""
        return elements if self.name == "bf16" else elements // self.elements_per_byte

    def raw_bytes(self, elements: int) -> int:
        return elements * BF16_BYTES if self.name == "bf16" else elements // self.elements_per_byte


class DecodeWarps:
    """The decode role; GroupedGemmSm90 sets tile_shape_mnk, fmt, a_codec, b_codec, load_stages,
    ab_stages, work_slots, cluster_m and ragged, and provides the work walk (_locate, ...)."""

    @cute.jit
    def _decode_loop(self, thread: Int32, cluster: Int32, clusters: Int32, rank: Int32, ends: cute.Tensor,
                     counter: cute.Tensor, work_pipeline, work_slots: cute.Tensor, load_pipeline, ab_pipeline,
                     sA_raw: cute.Tensor, sB_raw: cute.Tensor, sA: cute.Tensor, sB: cute.Tensor, mA: cute.Tensor,
                     mB: cute.Tensor, scale_a: cute.Tensor, scale_b: cute.Tensor, problem_m: Int32,
                     problem_n: Int32, problem_k: Int32, tiles_n: Int32):
        """Every work item's k-tiles, raw stage -> bf16 stage (``thread`` 0..95)."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        load_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.load_stages)
        mma_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.ab_stages)
        work_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.work_slots)
        item, group_base, tiles_before = Int32(0), Int32(0), Int32(0)
        work = self._consumer_work(item, cluster, clusters, work_pipeline, work_state, work_slots)
        work_state.advance()
        valid, group, tm, tn, start, length, group_base, tiles_before = self._locate(
            work, group_base, tiles_before, ends, problem_m, tiles_n)
        a_rows, b_rows = Int32(cute.size(mA, mode=[0])), Int32(cute.size(mB, mode=[0]))
        while valid:
            k_origin = self._k_origin(ends, group)
            a_row0 = (tm * self.cluster_m + rank) * tile_m
            contraction_end = problem_k  # elements of the contraction that exist
            if const_expr(self.ragged == "m"):
                a_row0 = a_row0 + start
            else:
                contraction_end = k_origin + self._padded(length)
            # each operand's (first row, rows there, scales of its first row, scale row stride)
            a_side = (a_row0, a_rows, scale_a.iterator.toint() + Int64(a_row0) * Int64(scale_a.stride[0]),
                      Int64(scale_a.stride[0]))
            b_row0 = tn * tile_n
            b_side = (b_row0, b_rows, scale_b.iterator.toint() + Int64(group) * Int64(scale_b.stride[0])
                      + Int64(b_row0) * Int64(scale_b.stride[1]), Int64(scale_b.stride[1]))
            for k_tile in cutlass.range(self._k_tiles(length, problem_k), unroll=1):
                first_element = k_origin + k_tile * tile_k
                load_pipeline.consumer_wait(load_state)
                ab_pipeline.producer_acquire(mma_state)
                self._decode_stage(thread, sA_raw, sB_raw, sA, sB, load_state.index, mma_state.index, a_side, b_side,
                                   first_element, contraction_end)
                cute.arch.fence_proxy("async.shared", space="cta")  # the bf16 stores, seen by wgmma
                ab_pipeline.producer_commit(mma_state)
                cute.arch.sync_warp()  # every lane has read the raw stage before one lane frees it
                load_pipeline.consumer_release(load_state)
                load_state.advance()
                mma_state.advance()
            item += 1
            work = self._consumer_work(item, cluster, clusters, work_pipeline, work_state, work_slots)
            work_state.advance()
            valid, group, tm, tn, start, length, group_base, tiles_before = self._locate(
                work, group_base, tiles_before, ends, problem_m, tiles_n)

    @cute.jit
    def _decode_stage(self, thread: Int32, sA_raw, sB_raw, sA, sB, load_index: Int32, mma_index: Int32, a_side,
                      b_side, first_element: Int32, contraction_end: Int32):
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        a_units = tile_m * (tile_k // self.a_codec.block)
        units = a_units + tile_n * (tile_k // self.b_codec.block)
        raw = (sA_raw.iterator.toint() + load_index * (tile_m * self.a_codec.raw_bytes(tile_k)),
               sB_raw.iterator.toint() + load_index * (tile_n * self.b_codec.raw_bytes(tile_k)))
        bf16 = (sA.iterator.toint() + mma_index * (tile_m * tile_k * BF16_BYTES),
                sB.iterator.toint() + mma_index * (tile_n * tile_k * BF16_BYTES))
        rounds = (units + DECODE_THREADS - 1) // DECODE_THREADS
        scale_byte = self._unit_scale(thread, a_units, units, a_side, b_side, first_element, contraction_end)
        for i in cutlass.range_constexpr(rounds):
            unit = thread + i * DECODE_THREADS
            this_byte = scale_byte
            if const_expr(i + 1 < rounds):
                scale_byte = self._unit_scale(unit + DECODE_THREADS, a_units, units, a_side, b_side, first_element,
                                              contraction_end)
            if unit < a_units:  # the same for a whole warp: a_units is a multiple of 32
                place = (self.a_codec, unit, raw[0], bf16[0], a_side)
                first, second, twice = self._factors(*place, this_byte, first_element, contraction_end)
                if twice:  # an MXFP8 scale past 2^7: its factor in two multiplies (rare: a branch)
                    self._decode_unit(*place, first, second)
                else:
                    self._decode_unit(*place, first, None)
            elif unit < units:
                place = (self.b_codec, unit - a_units, raw[1], bf16[1], b_side)
                first, second, twice = self._factors(*place, this_byte, first_element, contraction_end)
                if twice:
                    self._decode_unit(*place, first, second)
                else:
                    self._decode_unit(*place, first, None)

    def _unit_place(self, codec: Codec, unit: Int32):
        """(row of its operand's tile, block of the stage) of a unit of that operand."""
        blocks_per_row = self.tile_shape_mnk[2] // codec.block
        return unit // blocks_per_row, unit % blocks_per_row

    def _present(self, codec: Codec, row: Int32, j: Int32, side, first_element: Int32, contraction_end: Int32):
        """Whether a unit's block exists: its row inside the operand, its elements inside the group's."""
        return (side[0] + row < side[1]) & (first_element + j * codec.block < contraction_end)

    def _unit_scale(self, unit, a_units: int, units: int, a_side, b_side, first_element, contraction_end):
        """A unit's scale byte (zero where the block does not exist or the operand has no scales)."""
        in_a = unit < a_units
        row, j = self._unit_place(self.a_codec, unit)
        row_b, j_b = self._unit_place(self.b_codec, unit - a_units)
        row, j = sel(in_a, row, row_b, Int32), sel(in_a, j, j_b, Int32)
        block = sel(in_a, self.a_codec.block, self.b_codec.block, Int32)
        scales, stride = sel(in_a, a_side[2], b_side[2], Int64), sel(in_a, a_side[3], b_side[3], Int64)
        row0, rows = sel(in_a, a_side[0], b_side[0], Int32), sel(in_a, a_side[1], b_side[1], Int32)
        present = (unit < units) & (row0 + row < rows) & (first_element + j * block < contraction_end)
        if const_expr(self.a_codec.name == "bf16"):  # a bf16 activation has no scales
            present = present & (unit >= a_units)
        address = scales + Int64(row) * stride + Int64((first_element + j * block) // block)
        return ld("global", address, bits=8, pred=present)[0]

    def _factors(self, codec: Codec, unit: Int32, raw, bf16, side, scale_byte, first_element, contraction_end):
        """A unit's bf16x2 factors: (first, second, whether the second applies); zero for a block
        that is not there; unused for a bf16 activation."""
        row, j = self._unit_place(codec, unit)
        present = self._present(codec, row, j, side, first_element, contraction_end)
        if codec.name == "mxfp8":
            return e8m0_factors(scale_byte, present, self.fmt.nan_scale)
        first = e4m3_factor(scale_byte, present, self.fmt.nan_scale) if codec.name == "nvfp4" else Uint32(0)
        return first, Uint32(0), Boolean(False)

    def _decode_unit(self, codec: Codec, unit: Int32, raw: Int32, bf16: Int32, side, first: Uint32, second):
        """One block of one row: raw bytes -> bf16 at that row of the 128-byte-swizzled stage (16-byte
        chunk c of a row lives at chunk c ^ (row % 8)), times ``first`` (and ``second``)."""
        tile_k = self.tile_shape_mnk[2]
        row, j = self._unit_place(codec, unit)
        src = raw + row * codec.raw_bytes(tile_k) + j * codec.raw_bytes(codec.block)
        dst = bf16 + row * (tile_k * BF16_BYTES)
        swizzle = (row % 8) * CHUNK
        first_chunk = j * (codec.block * BF16_BYTES // CHUNK)
        if codec.name == "bf16":
            for c in range(codec.block * BF16_BYTES // CHUNK):
                st("shared", dst + (((first_chunk + c) * CHUNK) ^ swizzle), ld("shared", src + c * CHUNK, 4))
        elif codec.name == "nvfp4":
            out = []
            for w in ld("shared", src, 2):  # 16 codes in 8 bytes
                out += decode_e2m1x8(w, first, e2m1_tables(self.fmt.e2m1_values))
            for c in range(2):
                st("shared", dst + (((first_chunk + c) * CHUNK) ^ swizzle), out[4 * c: 4 * c + 4])
        else:
            self._decode_mxfp8(src, dst, first_chunk, swizzle, first, second)

    def _decode_mxfp8(self, src: Int32, dst: Int32, first_chunk, swizzle, first: Uint32, second):
        """32 E4M3 bytes -> 64 bytes of bf16, times ``first`` (and ``second`` when the scale needs two)."""
        for half in range(2):  # 16 bytes in, 32 out
            out = []
            for w in ld("shared", src + half * CHUNK, 4):
                out += decode_e4m3x4(w, first)
            if const_expr(second is not None):
                out = [mul_bf16x2(o, second) for o in out]
            for q in range(2):
                chunk = first_chunk + 2 * half + q
                st("shared", dst + ((chunk * CHUNK) ^ swizzle), out[4 * q: 4 * q + 4])
