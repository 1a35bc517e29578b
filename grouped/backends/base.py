"""What a backend adapter is: a name, the formats it serves, one predicate, a run.

``supports(problem)`` returns None when the backend can serve the problem kind
and a reason in words otherwise, so the selector can explain every choice and
every refusal. ``accepts(call)`` asks the same of one checked call, for rules
that depend on its data (split sizes, row counts, buffer strides): the selector
asks it before its choice is final, so explain() never names a backend that the
same call then refuses. Adapters import their kernels lazily, inside ``run``.
"""

from __future__ import annotations

from ..problem import GemmCall, Problem


class Backend:
    name: str = ""
    formats: tuple[str, ...] = ()
    graph_safe: bool = False  # runs under CUDA graph capture with split sizes on the GPU

    def unavailable(self, device_type: str, capability: tuple[int, int] | None) -> str | None:
        """Why this backend cannot run on such a device at all (None: it can)."""
        return None

    def refuses(self, problem: Problem) -> str | None:
        """Why this backend cannot serve this problem on an available device (None: it can)."""
        return None

    def supports(self, problem: Problem) -> str | None:
        if problem.fmt not in self.formats:
            return f"serves {', '.join(self.formats)}, not {problem.fmt}"
        return self.unavailable(problem.device_type, problem.capability) or self.refuses(problem)

    def accepts(self, call: GemmCall) -> str | None:
        """Why this backend cannot serve this particular call (None: it can). Asked on every
        call after ``supports`` said yes, so it must be cheap and must not sync the GPU."""
        return None

    def note(self, problem: Problem) -> str | None:
        """Something explain() should say about how this backend serves the problem."""
        return None

    def run(self, call: GemmCall):
        raise NotImplementedError

    def swiglu_refusal(self, call: GemmCall, probs, out_dtype) -> str | None:
        """Why this backend cannot compute SwiGLU(FC1) (x probs) of this forward call in one kernel, giving
        ``out_dtype`` (None: it can; grouped.gemm_swiglu then calls ``run_swiglu``)."""
        return "it has no fused GEMM + SwiGLU"

    def run_swiglu(self, call: GemmCall, probs=None, out=None):
        """SwiGLU(FC1) (x probs) in one kernel: the (M, F) activation written into ``out`` (None, or a dense
        (M, F) buffer of the dtype ``swiglu_refusal`` accepted), or into a new tensor; rows past the split
        total untouched in ``out``, zero in a new tensor. Returns that tensor."""
        raise NotImplementedError(f"{self.name} has no fused GEMM + SwiGLU")
