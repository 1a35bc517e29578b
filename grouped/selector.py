"""Backend choice: the preference table, forced backends, explanations, the decision log.

Automatic choice walks ``preference(problem)`` and takes the first backend whose
``supports(problem)`` is None. The table is the one place the order lives; where it
was measured, by scripts/bench.py (README's performance section, docs/performance.md).

A backend can be forced with ``backend=`` or the environment (grouped.env):
when it cannot serve, the call falls back to the automatic choice and
explain() says why, or raises with the reason when ``GROUPED_STRICT=1``.
Quantized formats never fall back to BF16: only backends that serve the
operands' format are ever considered.

Decisions are cached per (problem kind, forced backend, strict), so the cost
of a call is a dict lookup after the first. ``choose(call)`` then asks the
chosen backend whether it accepts this particular call (rules that depend on
the call's data, e.g. token counts); if not, the next backend that can serve
and accepts it runs, and the Decision says why. explain() goes through the
same step, so it names the backend the call would really run on.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

from . import env
from .backends import BACKENDS, Backend
from .formats import FORMATS
from .problem import GemmCall, Problem

# Per-expert cuBLAS GEMMs pay off only for a few large experts: a split taken from an H200 run of
# scripts/bench.py whose numbers were not kept; on Hopper it only orders the fallbacks behind cute.
LARGE_EXPERTS_MAX_GROUPS, LARGE_EXPERTS_MIN_ROWS = 16, 2048


def few_large_experts(sizes: tuple[int, ...]) -> bool:
    """Host split sizes of at most LARGE_EXPERTS_MAX_GROUPS experts averaging LARGE_EXPERTS_MIN_ROWS rows."""
    return len(sizes) <= LARGE_EXPERTS_MAX_GROUPS and sum(sizes) >= LARGE_EXPERTS_MIN_ROWS * len(sizes)


# Order of preference per (format, arch, problem class); "sm90" = Hopper,
# "sm100" = Blackwell, "cuda" = any other GPU, "cpu". On Hopper our cute kernel is
# one graph-safe launch that writes in place, within a few percent of the fastest of
# torch._grouped_mm, quack and the cuBLAS loop or ahead (geomean 1.02x over 42 cases, H100, README's
# table) and at 0.99x-1.13x the per-expert cuBLAS loop even for a few large experts
# (docs/performance.md), so it goes first. The sm100 and other-GPU BF16 rows were
# not measured: torch._grouped_mm where it exists, the cuBLAS loop for a few large experts.
_LARGE, _OTHER = "a few large experts, host split sizes", "many or small experts, or GPU split sizes"
_PREFERENCE: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("bf16", "sm90", _LARGE): ("cute", "cublas", "torch", "reference"),
    ("bf16", "sm90", _OTHER): ("cute", "torch", "cublas", "reference"),
    ("bf16", "sm100", _LARGE): ("cublas", "torch", "reference"),
    ("bf16", "sm100", _OTHER): ("torch", "cublas", "reference"),
    ("bf16", "cuda", _LARGE): ("cublas", "torch", "reference"),
    ("bf16", "cuda", _OTHER): ("torch", "cublas", "reference"),
    # The sm90 MXFP8 and NVFP4 kernels have compiled and passed their CPU checks but not yet run on
    # a GPU: they serve when asked for (backend="cute", GROUPED_BACKEND_MXFP8=cute, ...) and go
    # first once their GPU tests (tests/test_cute_block_scaled_gpu.py) pass on the lent GPU.
    **{(f, "sm90", c): ("reference", "cute") for f in ("mxfp8", "nvfp4") for c in (_LARGE, _OTHER)},
    **{(f, "sm100", c): ("cudnn", "reference") for f in ("mxfp8", "nvfp4") for c in (_LARGE, _OTHER)},
}


def _arch(problem: Problem) -> str:
    if problem.capability is None:
        return problem.device_type
    return {9: "sm90", 10: "sm100"}.get(problem.capability[0], "cuda")


def _problem_class(problem: Problem) -> str:
    return _LARGE if problem.large_experts else _OTHER


def preference(problem: Problem) -> tuple[str, ...]:
    return _PREFERENCE.get((problem.fmt, _arch(problem), _problem_class(problem)), ("reference",))


@dataclass
class Decision:
    """What explain() returns: the backend that runs, and every backend's verdict."""

    backend: str
    reasons: dict[str, str | None]  # name -> None if it could serve, else why not
    why: str
    problem: Problem = field(repr=False)
    note: str | None = None
    forced: bool = False  # the backend runs because backend= or the environment forced it

    def __str__(self) -> str:
        lines = [f"grouped GEMM ({self.problem.describe()}) -> {self.backend}: {self.why}"]
        if self.note:
            lines.append(f"  note: {self.note}")
        for name, reason in self.reasons.items():
            mark = "*" if name == self.backend else " "
            lines.append(f" {mark} {name:<10} {'can serve' if reason is None else 'no: ' + reason}")
        return "\n".join(lines)


_decisions: dict[tuple, Decision] = {}
_logged: set[tuple] = set()


def decide(problem: Problem, backend: str | None = None) -> Decision:
    """The backend for a problem (``backend`` or the environment may force one)."""
    settings = env.selection_settings()
    forced, source = (None if backend == "auto" else backend), "backend= argument"
    if forced is None:
        forced, source = settings["forced"][problem.fmt], "GROUPED_BACKEND* environment"
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {forced!r}")
    strict = settings["strict"]
    key = (problem, forced, source, strict)
    decision = _decisions.get(key)
    if decision is None:
        decision = _decisions[key] = _decide(problem, forced, source, strict)
    if settings["log"] and key not in _logged:
        _logged.add(key)
        print(f"[grouped] {problem.describe()} -> {decision.backend}: {decision.why}", file=sys.stderr)
    return decision


def choose(call: GemmCall, backend: str | None = None) -> Decision:
    """The backend for one checked call: ``decide`` for its kind, then the chosen backend's
    ``accepts(call)``; a refusal falls to the next backend that can serve and accepts the
    call (or raises when that backend was forced and GROUPED_STRICT=1)."""
    decision = decide(call.problem, backend)
    reason = BACKENDS[decision.backend].accepts(call)
    if reason is not None:
        decision = _next_accepting(call, decision, reason)
    if decision.backend == "reference" and call.problem.device_type == "cuda" and call.problem.fmt != "bf16":
        kernels = [f"{n}: {r}" if r else f"{n} serves it when asked for (backend={n!r})"
                   for n, r in decision.reasons.items() if n in _KERNEL_BACKENDS]
        _warn_once(f"grouped: {call.problem.describe()} runs on the fp64 reference backend (slow, syncs the host); "
                   + "; ".join(kernels))
    return decision


def _next_accepting(call: GemmCall, decision: Decision, reason: str) -> Decision:
    if decision.forced and env.selection_settings()["strict"]:
        raise ValueError(f"backend {decision.backend!r} cannot serve this call ({call.problem.describe()}): {reason}")
    reasons = {**decision.reasons, decision.backend: f"{reason} (this call)"}
    for name in preference(call.problem):
        if reasons[name] is None:
            other = BACKENDS[name].accepts(call)
            if other is None:
                why = f"{decision.backend} cannot serve this call ({reason}); next in the preference order"
                return _decision(name, reasons, why, call.problem)
            reasons[name] = f"{other} (this call)"
    detail = "; ".join(f"{n}: {r}" for n, r in reasons.items() if r)
    raise ValueError(f"no backend can serve this call ({call.problem.describe()}): {detail}")


_KERNEL_BACKENDS = ("cute", "cudnn")  # what serves quantized formats on a GPU
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _decide(problem: Problem, forced: str | None, source: str, strict: bool) -> Decision:
    reasons = {name: b.supports(problem) for name, b in BACKENDS.items()}
    if forced is not None and reasons[forced] is None:
        return _decision(forced, reasons, f"forced by the {source}", problem, forced=True)
    if forced is not None and strict:
        raise ValueError(f"backend {forced!r} cannot serve this call ({problem.describe()}): {reasons[forced]}")
    for name in preference(problem):
        if reasons[name] is None:
            why = f"first that can serve in the preference order for {_problem_class(problem)} on {_arch(problem)}"
            if forced is not None:
                why = f"forced backend {forced!r} cannot serve ({reasons[forced]}); {why}"
            return _decision(name, reasons, why, problem)
    detail = "; ".join(f"{n}: {r}" for n, r in reasons.items() if r)
    raise ValueError(f"no backend can serve this call ({problem.describe()}): {detail}")


def _decision(name: str, reasons, why: str, problem: Problem, *, forced: bool = False) -> Decision:
    backend: Backend = BACKENDS[name]
    return Decision(name, reasons, why, problem, backend.note(problem), forced)


def clear_cache() -> None:
    """Forget cached decisions (and which ones were logged)."""
    _decisions.clear()
    _logged.clear()


def availability(device_type: str, capability: tuple[int, int] | None) -> dict[str, dict[str, str | None]]:
    """format -> backend -> None (available) or why not, for a device."""
    table = {}
    for fmt in FORMATS:
        row = {}
        for name, b in BACKENDS.items():
            if fmt not in b.formats:
                row[name] = f"does not serve {fmt}"
            else:
                row[name] = b.unavailable(device_type, capability)
        table[fmt] = row
    return table
