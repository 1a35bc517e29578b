"""sm90 grouped GEMM (BF16, MXFP8, NVFP4): configs, checks, compile entry and launch (no cutlass import).

Device code and the algorithm: grouped_gemm_kernel.py. One compile per
``GemmConfig`` serves every token count, split, N, K, expert count and row
stride (all symbolic); the group end offsets are read on the GPU.

Argument conventions (torch tensors, as grouped/problem.py names them):
=========  =================  ==========================  ===================
ragged     a                  b                           c
=========  =================  ==========================  ===================
"m"        X or dY (T, K)     W (G, N_w, K_w) contiguous  Y or dX (T, N)
"k"        dY (T, M)          X (T, N)                    dW (G, M, N)
=========  =================  ==========================  ===================
b_major "k" reads W as (N_w rows, K_w contraction) (forward); "mn" as
(K_w rows, N_w contraction) (dgrad). TMA needs every row stride and base
16-byte aligned, unit stride along the last dim and no empty operand.

Block-scaled operands (``GemmConfig.fmt`` set; MXFP8, NVFP4) come as their
stored bytes, viewed as uint8, with the contraction dim last, and their compact
block scales (one byte a block, E8M0 or E4M3) beside them; NVFP4 also passes
each operand's per-tensor scales S as (G,) fp32:
=========  ======================  ==============================  ===========
ragged     a, scale_a              b, scale_b                      c
=========  ======================  ==============================  ===========
"m"        (T, Ks), (T, K/blk)     (G, R, Ks), (G, R, K/blk)        (T, R)
"k"        (M, Ps), (M, P/blk)     (N, Ps), (N, P/blk)              (G, M, N)
=========  ======================  ==============================  ===========
Ks = K stored columns (K for MXFP8, K/2 for NVFP4's packed codes); forward: R = N
(W rowwise); dgrad: R = K (W stored (G, K, N), blocks along N); wgrad: P = the
token dim with each group zero-padded to the block. ``weight_only``: a is a bf16
(T, K) activation with no scales (forward, NVFP4 weights).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import ARCH, CACHE, KernelSpec, compile_kernel
from ..device import sm_count
from ..facts import FormatFacts

OUT_DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
LAYOUTS = ("forward", "dgrad", "wgrad")
BLOCK_SCALED_FORMATS = ("mxfp8", "nvfp4")  # what the kernel decodes (block_decode.py)
WEIGHT_ONLY_FORMAT = "nvfp4"  # the format a bf16 activation may meet (weight-only GEMMs)


@dataclass(frozen=True)
class GemmConfig:
    ragged: str  # "m" (forward, dgrad) or "k" (wgrad)
    b_major: str  # "k" (forward), "mn" (dgrad, wgrad)
    out: str  # "bf16" or "fp32"
    accumulate: bool = False  # wgrad: add into an fp32 c
    tile_m: int = 128
    tile_n: int = 192
    cluster_m: int = 1  # CTAs of a cluster, sharing (multicasting) the B tile (schedule_for)
    dynamic: bool = False  # work items claimed from a global counter, not a fixed walk (schedule_for)
    fmt: FormatFacts | None = None  # block-scaled operands (MXFP8, NVFP4), decoded to bf16 in the kernel
    weight_only: bool = False  # A a bf16 activation, B block-scaled (NVFP4 forward)


# Clusters of two CTAs share (multicast) the B tile: fewer L2 -> SM bytes, but in ragged M a
# group with an odd number of row tiles has one tile computed for nothing. Interleaved A/B on an
# H100 (all benchmark shapes): wgrad with 2 never slower (up to 4% faster); forward and dgrad with
# 2 up to 6% faster at 2048-4096 rows an expert (DeepSeek-V3, Mixtral), the same at 512 with
# uniform splits, 5% slower with skewed ones (Qwen3) and 10-15% slower at 8 (decode).
CLUSTER_ROWS_PER_GROUP = 1024  # ragged M: clusters of two from this many rows an expert on average
# Dynamic scheduling (one-CTA clusters) balances work items of unequal cost, which the static walk
# cannot. Interleaved A/B on an H100 against the static schedule, all benchmark shapes: wgrad whose
# experts have fewer output tiles than there are SMs 1.32x faster with a skewed split (Qwen3-30B
# 768->2048: a large expert's tiles no longer stack on half of the SMs), 1% slower with a uniform
# one; calls with at most one row tile of tokens an expert on average (decode) 1-13% faster.
# Elsewhere it was slower (long-K wgrad up to 21%, mostly the lost multicast; forward and dgrad of
# large experts up to 27%).
DYNAMIC_ROWS_PER_GROUP = 128  # dynamic scheduling up to this many rows an expert on average


def schedule_for(layout: str, tokens: int, groups: int, m: int, n: int, device: torch.device) -> tuple[int, bool]:
    """(cluster_m, dynamic) for a call: its token count, experts, output rows m and columns n (wgrad:
    one expert's) are known on the host; the split sizes need not be."""
    expert_tiles = -(-m // GemmConfig.tile_m) * -(-n // GemmConfig.tile_n)
    if tokens <= DYNAMIC_ROWS_PER_GROUP * groups or (layout == "wgrad" and expert_tiles < sm_count(device)):
        return 1, True
    return (2 if layout == "wgrad" or tokens >= CLUSTER_ROWS_PER_GROUP * groups else 1), False


@functools.lru_cache(maxsize=None)
def config_for(layout: str, out_dtype: torch.dtype, accumulate: bool, cluster_m: int, dynamic: bool,
               fmt: FormatFacts | None = None, weight_only: bool = False) -> GemmConfig:
    ragged, b_major = {"forward": ("m", "k"), "dgrad": ("m", "mn"), "wgrad": ("k", "mn")}[layout]
    if fmt is not None:  # stored with the contraction dim last: every operand K-major
        b_major = "k"
    return GemmConfig(ragged, b_major, OUT_DTYPES[out_dtype], accumulate, cluster_m=cluster_m, dynamic=dynamic,
                      fmt=fmt, weight_only=weight_only)


def configs_for_layouts(block_scaled_formats=()) -> list[GemmConfig]:
    """Every config the backend can pick: bf16, each of ``block_scaled_formats`` (FormatFacts), and
    NVFP4 weights with bf16 activations (forward)."""
    kinds = [(None, False, LAYOUTS)]
    for fmt in block_scaled_formats:
        kinds.append((fmt, False, LAYOUTS))
        if fmt.name == WEIGHT_ONLY_FORMAT:
            kinds.append((fmt, True, ("forward",)))
    out = []
    for fmt, weight_only, layouts in kinds:
        for layout in layouts:
            schedules = [(2, False), (1, True)] if layout == "wgrad" else [(1, False), (2, False), (1, True)]
            for cluster_m, dynamic in schedules:
                for dtype in OUT_DTYPES:
                    out.append(config_for(layout, dtype, False, cluster_m, dynamic, fmt, weight_only))
                if layout == "wgrad":
                    out.append(config_for(layout, torch.float32, True, cluster_m, dynamic, fmt))
    return list(dict.fromkeys(out))  # block-scaled forward and dgrad share their configs


_SOURCES = (*(str(Path(__file__).with_name(name)) for name in ("grouped_gemm.py", "grouped_gemm_kernel.py",
                                                                 "decode_warps.py", "block_decode.py")),
            str(Path(__file__).parents[1] / "ptx.py"))


def _spec(config: GemmConfig) -> KernelSpec:
    return KernelSpec("sm90_grouped_gemm", tuple(sorted(vars(config).items())), ARCH, _SOURCES)


def compile_config(config: GemmConfig):
    """Compile one config for sm_90a (no GPU needed when CUTE_DSL_ARCH is set)."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_tensor

    from .grouped_gemm_kernel import GroupedGemmSm90

    bf16 = cutlass.BFloat16
    out_type = {"bf16": bf16, "fp32": cutlass.Float32}[config.out]
    tokens, groups = cute.sym_int(), cute.sym_int()

    def row_major(dtype, rows, cols):
        elements = 16 // (dtype.width // 8)
        stride = cute.sym_int64(divisibility=elements)
        return make_fake_tensor(dtype, (rows, cols), (stride, 1), assumed_align=16)

    operand = cutlass.Uint8 if config.fmt is not None else bf16  # block-scaled: the stored bytes
    per_16_bytes = 16 // (operand.width // 8)
    if config.ragged == "m":
        a = row_major(bf16 if config.weight_only else operand, tokens, cute.sym_int())
        n_w, k_w = cute.sym_int(), cute.sym_int()
        b = make_fake_tensor(operand, (groups, n_w, k_w), (cute.sym_int64(divisibility=per_16_bytes),
                             cute.sym_int64(divisibility=per_16_bytes), 1), assumed_align=16)
        c = row_major(out_type, tokens, cute.sym_int())
    else:
        a = row_major(operand, cute.sym_int() if config.fmt is not None else tokens, cute.sym_int())
        b = row_major(operand, cute.sym_int() if config.fmt is not None else tokens, cute.sym_int())
        elements = 16 // (out_type.width // 8)
        c = make_fake_tensor(
            out_type,
            (groups, cute.sym_int(), cute.sym_int()),
            (cute.sym_int64(divisibility=elements), cute.sym_int64(divisibility=elements), 1),
            assumed_align=16,
        )
    unused = make_fake_compact_tensor(cutlass.Uint8, (cute.sym_int(),))  # an argument the config does not read
    scale_a = scale_b = tensor_scale_a = tensor_scale_b = unused
    if config.fmt is not None:  # compact scales, one byte a block, blocks along the last dim
        if not config.weight_only:
            scale_a = make_fake_tensor(cutlass.Uint8, (cute.sym_int(), cute.sym_int()), (cute.sym_int64(), 1))
        if config.ragged == "m":
            scale_b = make_fake_tensor(cutlass.Uint8, (groups, cute.sym_int(), cute.sym_int()),
                                       (cute.sym_int64(), cute.sym_int64(), 1))
        else:
            scale_b = make_fake_tensor(cutlass.Uint8, (cute.sym_int(), cute.sym_int()), (cute.sym_int64(), 1))
        if config.fmt.name == "nvfp4":  # per-group fp32 S (a per-tensor S comes as a stride-0 view)
            tensor_scale_b = make_fake_tensor(cutlass.Float32, (groups,), (cute.sym_int64(),))
            if not config.weight_only:  # a bf16 activation has no S
                tensor_scale_a = make_fake_tensor(cutlass.Float32, (groups,), (cute.sym_int64(),))
    ends = make_fake_compact_tensor(cutlass.Int32, (groups,))
    counter = make_fake_compact_tensor(cutlass.Int32, (cute.sym_int(),))  # (1,); static configs get ends
    gemm = GroupedGemmSm90(config.ragged, config.b_major, config.accumulate, config.tile_m, config.tile_n,
                           config.cluster_m, config.dynamic, config.fmt, config.weight_only)
    return compile_kernel(gemm, a, b, c, scale_a, scale_b, tensor_scale_a, tensor_scale_b, ends, counter,
                          cutlass.Int32(1))


def configs(formats=()) -> list:
    """(spec, build) of every config, for CI's compile check; formats: FormatFacts of the
    block-scaled formats the library has (those the kernel decodes are compiled)."""
    block_scaled = [f for f in formats if f.name in BLOCK_SCALED_FORMATS]
    return [(_spec(c), (lambda c=c: compile_config(c))) for c in configs_for_layouts(block_scaled)]


_KERNELS: dict[GemmConfig, object] = {}  # a dict hit costs less than building the cache key a call


def kernel(config: GemmConfig):
    function = _KERNELS.get(config)
    if function is None:
        function = _KERNELS[config] = CACHE.get(_spec(config), lambda: compile_config(config))
    return function


def _tma_strides(t: torch.Tensor) -> torch.Tensor:
    """The same elements with every size-1 dim given the stride of a packed dim: TMA checks the
    alignment of all strides, and torch leaves any stride on a size-1 dim."""
    if all(size > 1 for size in t.shape[:-1]):
        return t
    strides, inner = list(t.stride()), t.shape[-1]
    for d in range(t.dim() - 2, -1, -1):
        if t.shape[d] == 1:
            strides[d] = inner
        inner = strides[d] * t.shape[d]
    return t.as_strided(t.shape, strides)


def launch(config: GemmConfig, a, b, c, ends: torch.Tensor, max_work: int, scale_a=None, scale_b=None,
           tensor_scale_a=None, tensor_scale_b=None) -> None:
    """Run one grouped GEMM on the current stream. ``ends``: (G,) int32 end offsets on the GPU;
    ``max_work``: an upper bound on the number of work items (``work_bound``; sizes the
    persistent grid, one cluster an item at a time); block-scaled operands: a, b as uint8 (a
    bf16 activation as it is), their block scales as uint8, NVFP4's S as (G,) fp32 (see the module
    doc). Operands must be non-empty and aligned (the cute backend checks)."""
    ctas = config.cluster_m * max(1, min(sm_count(a.device) // config.cluster_m, max_work))
    stream = torch.cuda.current_stream(a.device).cuda_stream
    # the dynamic scheduler's claim counter: a fresh zero every call (graph-safe, and no two calls,
    # e.g. on two streams, share one); a static walk reads none, so it gets any int32 tensor
    counter = torch.zeros(1, dtype=torch.int32, device=a.device) if config.dynamic else ends
    unused = ends.view(torch.uint8)  # for the arguments this config does not read
    scales = [unused if t is None else t for t in (scale_a, scale_b, tensor_scale_a, tensor_scale_b)]
    kernel(config)(_tma_strides(a), _tma_strides(b), _tma_strides(c), *scales, ends, counter, ctas, stream)


def work_bound(config: GemmConfig, tokens: int, groups: int, m: int, n: int) -> int:
    """Work items (blocks of cluster_m x tile_m rows by tile_n columns) of the call at most:
    ragged M (tokens + G (block - 1)) / block x N tiles."""
    tiles_n = -(-n // config.tile_n)
    block = config.tile_m * config.cluster_m
    if config.ragged == "m":
        return (tokens + groups * (block - 1)) // block * tiles_n
    return groups * -(-m // block) * tiles_n
