"""Device code of splits_to_offsets (host side: offsets.py; shared constants: offsets_config.py)."""

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64

from .offsets_config import MAX_OUTPUTS, THREADS


@cute.kernel
def splits_to_offsets_kernel(splits: cute.Tensor, outs: tuple, strides: tuple, n_out: Int32, flags: Int32):
    tid, _, _ = cute.arch.thread_idx()
    n = cute.size(splits.shape[0])
    chunk = (n + THREADS - 1) // THREADS
    begin = cutlass.min(tid * chunk, n)
    end = cutlass.min(begin + chunk, n)

    # 1. this thread's chunk sum
    local = Int64(0)
    for j in cutlass.range(begin, end):
        local += Int64(splits[j])

    # 2. inclusive scan of chunk sums in shared memory (Hillis-Steele), then exclusive start
    smem = cutlass.memory.SmemAllocator()
    sums = smem.allocate_tensor(Int64, cute.make_layout(THREADS), byte_alignment=16)
    sums[tid] = local
    cute.arch.barrier()
    offset = 1
    for _ in cutlass.range_constexpr(THREADS.bit_length() - 1):
        value = sums[tid]
        if tid >= offset:
            value += sums[tid - offset]
        cute.arch.barrier()
        sums[tid] = value
        cute.arch.barrier()
        offset *= 2
    running = sums[tid] - local

    # 3. write every output: value = prefix * stride, as int32 or two int32 words
    for i in cutlass.range_constexpr(MAX_OUTPUTS):
        if i < n_out:
            is64 = (flags >> i) & 1
            lead = (flags >> (MAX_OUTPUTS + i)) & 1
            out = outs[i]
            if tid == 0 and lead == 1:
                out[0] = Int32(0)
                if is64 == 1:
                    out[1] = Int32(0)
            prefix = running
            for j in cutlass.range(begin, end):
                prefix += Int64(splits[j])
                value = prefix * strides[i]
                position = j + lead
                if is64 == 1:
                    out[2 * position] = Int32(value & 0xFFFFFFFF)
                    out[2 * position + 1] = Int32(value >> 32)
                else:
                    out[position] = Int32(value)


@cute.jit
def splits_to_offsets_host(
    splits: cute.Tensor,
    o0: cute.Tensor, o1: cute.Tensor, o2: cute.Tensor, o3: cute.Tensor,
    o4: cute.Tensor, o5: cute.Tensor, o6: cute.Tensor, o7: cute.Tensor,
    s0: Int64, s1: Int64, s2: Int64, s3: Int64, s4: Int64, s5: Int64, s6: Int64, s7: Int64,
    n_out: Int32, flags: Int32, stream,
):
    splits_to_offsets_kernel(
        splits, (o0, o1, o2, o3, o4, o5, o6, o7), (s0, s1, s2, s3, s4, s5, s6, s7), n_out, flags
    ).launch(grid=(1, 1, 1), block=(THREADS, 1, 1), stream=stream)
