"""The (a, b) operands of each grouped GEMM layout, for tests (grouped/problem.py's table).

BF16 operands are cast; quantized ones are quantized along the layout's contraction
dim (wgrad: axis 0 with the call's split sizes, blocks restarting per expert).
"""

import grouped


def layout_operands(layout, fmt, x, dy, w, sizes):
    """(a, b) for ``layout`` from float X (M, K), dY (M, N), W (G, N, K)."""
    if fmt == "bf16":
        x, dy, w = x.bfloat16(), dy.bfloat16(), w.bfloat16()
        return {"forward": (x, w), "dgrad": (dy, w), "wgrad": (dy, x)}[layout]
    q = grouped.quantize
    if layout == "forward":
        return q(x, fmt), q(w, fmt)
    if layout == "dgrad":
        return q(dy, fmt), q(w, fmt, axis=1)
    return q(dy, fmt, axis=0, split_sizes=sizes), q(x, fmt, axis=0, split_sizes=sizes)
