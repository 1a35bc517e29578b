"""Inline PTX our kernels are built from (device code).

Exactness hangs on instructions the DSL would not pick by itself: correctly rounded fp32
``mul.rn`` / ``div.rn`` (no ftz, never contracted into an fma). Memory operations are asm with
side effects, so they stay in program order around barriers; their addresses are plain
integers (Int64 global, Int32 shared). Values travel as fp32 bit patterns (Uint32).
"""

import struct

import cutlass
from cutlass import Float32, Int32, Int64, Uint32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass.experimental import primitives as prims


def fp32_bits(value: float) -> int:
    """The bit pattern of fp32(value) (round to nearest), for constants."""
    return struct.unpack("<I", struct.pack("<f", value))[0]


def fp32_hex(value: float) -> str:
    """fp32(value) as a PTX float literal."""
    return f"0f{fp32_bits(value):08X}"


# ---- scalars (branch-free, traced inline) --------------------------------------------------


def f32(bits) -> Float32:
    return prims.mov_b32(Uint32(bits), target_type=Float32)


def u32(value) -> Uint32:
    return prims.mov_b32(Float32(value), target_type=Uint32)


def sel(cond, a, b, ty):
    return ty(cutlass.select_(cond, ty(a), ty(b)))


def pred(cond) -> Int32:
    return sel(cond, 1, 0, Int32)


def split64(v):
    v = Int64(v)
    return [Uint32(v & Int64(0xFFFFFFFF)), Uint32(v >> Int64(32))]


def join64(lo, hi) -> Int64:
    return (Int64(hi) << Int64(32)) | Int64(lo)


# ---- asm plumbing --------------------------------------------------------------------------


def asm(res_type, ptx: str, constraints: str, args, loc, ip):
    """Pure asm: the compiler may move or drop it."""
    return llvm.inline_asm(res_type, args, ptx, constraints, has_side_effects=False, is_align_stack=False,
                           loc=loc, ip=ip)


def asm_words(n: int, ptx: str, constraints: str, args, loc, ip, *, side_effects: bool = True):
    """asm returning n 32-bit words (a list of Uint32)."""
    if n == 1:
        value = llvm.inline_asm(T.i32(), args, ptx, constraints, has_side_effects=side_effects,
                                is_align_stack=False, loc=loc, ip=ip)
        return [Uint32(value)]
    struct_type = llvm.StructType.get_literal([T.i32()] * n)
    res = llvm.inline_asm(struct_type, args, ptx, constraints, has_side_effects=side_effects, is_align_stack=False,
                          loc=loc, ip=ip)
    return [Uint32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(n)]


def _void_asm(ptx: str, constraints: str, args, loc, ip):
    llvm.inline_asm(None, args, ptx, constraints, has_side_effects=True, is_align_stack=False, loc=loc, ip=ip)


def _binary(ptx: str, ty, a, b, loc, ip):
    """Pure asm ``ptx`` of two ``ty`` operands (Float32 or Uint32) with one result."""
    reg, ir_type = ("f", T.f32()) if ty is Float32 else ("r", T.i32())
    args = [ty(a).ir_value(loc=loc, ip=ip), ty(b).ir_value(loc=loc, ip=ip)]
    return ty(asm(ir_type, ptx, f"={reg},{reg},{reg}", args, loc, ip))


# ---- arithmetic ------------------------------------------------------------------------------


def _binary_op(ptx: str, ty, doc: str):
    """A DSL op: pure asm ``ptx`` of two ``ty`` operands with one result."""

    @dsl_user_op
    def op(a, b, *, loc=None, ip=None):
        return _binary(ptx, ty, a, b, loc, ip)

    op.__doc__ = doc
    return op


mul_rn = _binary_op("mul.rn.f32 $0, $1, $2;", Float32, "fp32 a * b, round to nearest even, subnormals kept.")
div_rn = _binary_op("div.rn.f32 $0, $1, $2;", Float32, "IEEE fp32 a / b, round to nearest even, subnormals kept.")
max_u16x2 = _binary_op("max.u16x2 $0, $1, $2;", Uint32, "Both halves: unsigned 16-bit maxima.")
hmax_abs = _binary_op("max.NaN.xorsign.abs.bf16x2 $0, $1, $2;", Uint32,
                      "Both halves: max(|a|, |b|) of bf16 pairs (NaN if either is NaN); sign bits undefined.")


@dsl_user_op
def prmt(a, b, selector, *, loc=None, ip=None) -> Uint32:
    """The bytes of a (0-3) and b (4-7) picked by selector's four low nibbles (an int, or a Uint32
    register: a table lookup)."""
    if isinstance(selector, int):
        return _binary(f"prmt.b32 $0, $1, $2, {selector};", Uint32, a, b, loc, ip)
    args = [Uint32(x).ir_value(loc=loc, ip=ip) for x in (a, b, selector)]
    return Uint32(asm(T.i32(), "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", args, loc, ip))


# ---- memory ------------------------------------------------------------------------------------

_ADDRESS = {"global": ("l", Int64), "shared": ("r", Int32)}  # constraint and type of an address


def _guarded(predicate, first: int, loc, ip):
    """(operands, constraints, PTX lines, guard) of an optional predicate, operand ``first``."""
    if predicate is None:
        return [], [], [], ""
    return [Int32(predicate).ir_value(loc=loc, ip=ip)], ["r"], [".reg .pred p;", f"setp.ne.b32 p, ${first}, 0;"], "@p "


def _vector(regs: list[str]) -> tuple[str, str]:
    """(vector suffix, operand) of an access to 1, 2 or 4 registers."""
    return {1: "", 2: ".v2", 4: ".v4"}[len(regs)], regs[0] if len(regs) == 1 else "{" + ", ".join(regs) + "}"


@dsl_user_op
def st(space: str, addr, values, bits: int = 32, pred=None, *, loc=None, ip=None):
    """Store to ``space`` ("global" or "shared") at addr: ``values`` one word, or a list of 1, 2 or 4
    words (a vector store, n * 4-byte aligned); ``bits`` 8 or 16 store the low byte / half of one
    word. With ``pred``, only where it is nonzero."""
    words = list(values) if isinstance(values, (list, tuple)) else [values]
    n = len(words)
    assert bits == 32 or n == 1
    constraint, addr_type = _ADDRESS[space]
    p_args, p_cons, lines, guard = _guarded(pred, 1, loc, ip)
    srcs = [f"${1 + len(p_args) + i}" for i in range(n)]
    if bits == 32:
        vec, operand = _vector(srcs)
        lines.append(f"{guard}st.{space}{vec}.b32 [$0], {operand};")
    else:
        lines += [".reg .b16 v;", f"cvt.u16.u32 v, {srcs[0]};", f"{guard}st.{space}.b{bits} [$0], v;"]
    args = [addr_type(addr).ir_value(loc=loc, ip=ip)] + p_args + [Uint32(w).ir_value(loc=loc, ip=ip) for w in words]
    _void_asm("{\n" + "\n".join(lines) + "\n}", ",".join([constraint] + p_cons + ["r"] * n), args, loc, ip)


@dsl_user_op
def ld(space: str, addr, n: int = 1, bits: int = 32, pred=None, ld: str | None = None, *, loc=None, ip=None):
    """n (1, 2 or 4) consecutive words from ``space`` at addr (n * 4-byte aligned), or with ``bits`` 8
    one byte zero-extended. With ``pred``, loaded only where it is nonzero, zeros elsewhere. ``ld``:
    the load instruction with its cache operators (default ld.global.nc, the read-only path, or
    ld.shared)."""
    assert bits == 32 or n == 1
    ld = ld or ("ld.global.nc" if space == "global" else "ld.shared")
    constraint, addr_type = _ADDRESS[space]
    p_args, p_cons, lines, guard = _guarded(pred, n + 1, loc, ip)
    outs = [f"${i}" for i in range(n)]
    if pred is not None:
        lines += [f"mov.b32 {o}, 0;" for o in outs]
    if bits == 32:
        vec, operand = _vector(outs)
        lines.append(f"{guard}{ld}{vec}.b32 {operand}, [${n}];")
    else:
        lines += [".reg .b16 v;", "mov.b16 v, 0;", f"{guard}{ld}.b8 v, [${n}];", "cvt.u32.u16 $0, v;"]
    args = [addr_type(addr).ir_value(loc=loc, ip=ip)] + p_args
    return asm_words(n, "{\n" + "\n".join(lines) + "\n}", ",".join(["=r"] * n + [constraint] + p_cons), args,
                     loc, ip)


@dsl_user_op
def cp_async16(smem_addr, gmem_addr, src_bytes, cache: str = "cg", *, loc=None, ip=None):
    """16 bytes global -> shared, asynchronously; src_bytes 0 writes zeros and reads nothing. ``cache``
    "cg" bypasses L1 (each 32-byte sector its own L2 request), "ca" goes through L1 (one L2 request
    a 128-byte line)."""
    args = [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int64(gmem_addr).ir_value(loc=loc, ip=ip),
            Int32(src_bytes).ir_value(loc=loc, ip=ip)]
    _void_asm(f"cp.async.{cache}.shared.global [$0], [$1], 16, $2;", "r,l,r", args, loc, ip)


@dsl_user_op
def red_max_u32(gmem_addr, value, *, loc=None, ip=None):
    args = [Int64(gmem_addr).ir_value(loc=loc, ip=ip), Uint32(value).ir_value(loc=loc, ip=ip)]
    _void_asm("red.relaxed.gpu.global.max.u32 [$0], $1;", "l,r", args, loc, ip)


@dsl_user_op
def atom_add_u32(gmem_addr, value, *, loc=None, ip=None) -> Uint32:
    """Atomic add at gpu scope, acquire-release; returns the old value."""
    args = [Int64(gmem_addr).ir_value(loc=loc, ip=ip), Uint32(value).ir_value(loc=loc, ip=ip)]
    return asm_words(1, "atom.acq_rel.gpu.global.add.u32 $0, [$1], $2;", "=r,l,r", args, loc, ip)[0]


@dsl_user_op
def fence_gpu(*, loc=None, ip=None):
    _void_asm("fence.acq_rel.gpu;", "", [], loc, ip)


# ---- warp collectives (every lane of the warp takes part) -------------------------------------


@dsl_user_op
def warp_max_u32(value, *, loc=None, ip=None) -> Uint32:
    args = [Uint32(value).ir_value(loc=loc, ip=ip)]
    return asm_words(1, "redux.sync.max.u32 $0, $1, 0xffffffff;", "=r,r", args, loc, ip)[0]


@dsl_user_op
def shfl_bfly(value, mask: int, *, loc=None, ip=None) -> Uint32:
    args = [Uint32(value).ir_value(loc=loc, ip=ip)]
    return asm_words(1, f"shfl.sync.bfly.b32 $0, $1, {mask}, 31, 0xffffffff;", "=r,r", args, loc, ip)[0]


@dsl_user_op
def shfl_idx(value, src_lane, *, loc=None, ip=None) -> Uint32:
    args = [Uint32(value).ir_value(loc=loc, ip=ip), Int32(src_lane).ir_value(loc=loc, ip=ip)]
    return asm_words(1, "shfl.sync.idx.b32 $0, $1, $2, 31, 0xffffffff;", "=r,r,r", args, loc, ip)[0]


def _vote(mode: str, predicate, loc, ip) -> Int32:
    ptx = ("{\n.reg .pred p;\nsetp.ne.b32 p, $1, 0;\n"
           f"vote.sync.{mode}.pred p, p, 0xffffffff;\nselp.b32 $0, 1, 0, p;\n}}")
    return Int32(asm_words(1, ptx, "=r,r", [Int32(predicate).ir_value(loc=loc, ip=ip)], loc, ip)[0])


@dsl_user_op
def vote_all(predicate, *, loc=None, ip=None) -> Int32:
    """1 where predicate != 0 in every lane of the warp, else 0."""
    return _vote("all", predicate, loc, ip)


@dsl_user_op
def vote_any(predicate, *, loc=None, ip=None) -> Int32:
    """1 where predicate != 0 in some lane of the warp, else 0."""
    return _vote("any", predicate, loc, ip)


@dsl_user_op
def mul_bf16x2(a, b, *, loc=None, ip=None) -> Uint32:
    """Both bf16 halves a * b, round to nearest (exact for a power-of-two b)."""
    return _binary("mul.rn.bf16x2 $0, $1, $2;", Uint32, a, b, loc, ip)
