"""GroupedMLP step benchmark: a whole expert MLP (FC1, SwiGLU with routing probabilities, FC2),
forward + backward and inference, per recipe, beside the same layer written with
torch._grouped_mm and torch ops. GPU times (CUDA events around back-to-back steps, one queued
ahead so host time is not counted), medians.

    python scripts/bench_mlp.py                       # every layer, recipes bf16 and mxfp8
    python scripts/bench_mlp.py --recipes bf16 --layers qwen3

Quantized recipes run on --quantized-backend (default cute: the sm90 kernels, which the selector
does not pick by itself until they have passed their GPU tests); a recipe whose GEMMs would run
elsewhere is reported as skipped, never timed on the fp64 reference.

Everything a step does is inside its time: quantizing activations and gradients, refreshing
the quantized weights (every forward, the layer's default), the SwiGLU glue, both GEMMs'
three layouts. Gradients are set to None before each step (zero_grad(set_to_none=True)).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grouped  # noqa: E402
from scripts.bench import make_splits  # noqa: E402
from scripts.bench_kernels import time_ms  # noqa: E402

LAYERS = {  # name: (experts, hidden, ffn_hidden, tokens)
    "qwen3": (128, 2048, 768, 32768),
    "gptoss": (128, 2880, 2880, 32768),
    "mixtral": (8, 4096, 14336, 16384),
}


def gpu_ms(step) -> float:
    return time_ms(step, reps=10, batch=3)


def torch_composition(experts, hidden, ffn, device):
    """The same layer on torch._grouped_mm, SwiGLU in fp32 as GroupedMLP computes it."""
    w1 = (torch.randn(experts, 2 * ffn, hidden, device=device) / hidden**0.5).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(experts, hidden, ffn, device=device) / ffn**0.5).to(torch.bfloat16).requires_grad_()

    def forward(x, offs, probs):
        h = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)
        gate, up = h.float().chunk(2, dim=1)
        a = (F.silu(gate) * up * probs.float().unsqueeze(1)).to(x.dtype)
        return torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)

    return forward, (w1, w2)


def run_layer(name: str, recipes: list[str], quantized_backend: str) -> None:
    experts, hidden, ffn, tokens = LAYERS[name]
    device = torch.device("cuda")
    torch.manual_seed(0)
    sizes = make_splits("skewed", tokens, experts)
    offs = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    x = torch.randn(tokens, hidden, device=device).to(torch.bfloat16).requires_grad_()
    probs = torch.rand(tokens, device=device).requires_grad_()
    dy = torch.randn(tokens, hidden, device=device).to(torch.bfloat16)
    results = {}

    def train(fn, params):
        def step():
            for p in (x, probs, *params):
                p.grad = None
            fn().backward(dy)
        return step

    forward, params = torch_composition(experts, hidden, ffn, device)
    results["torch composition"] = (gpu_ms(train(lambda: forward(x, offs, probs), params)),
                                    gpu_ms(torch.no_grad()(lambda: forward(x, offs, probs))))
    skipped = []
    for recipe in recipes:
        label, times = time_grouped_mlp(recipe, (experts, hidden, ffn), x, sizes, probs, train, quantized_backend)
        if times is None:
            skipped.append(label)
        else:
            results[label] = times
        torch.cuda.empty_cache()
    base_train, base_infer = results["torch composition"]
    bf16 = next((v for k, v in results.items() if k.startswith("GroupedMLP bf16")), None)
    print(f"\n{name}: {experts} experts, hidden {hidden}, ffn {ffn}, {tokens} tokens (skewed, probs)")
    print(f"  {'':<36} {'train ms':>9} {'infer ms':>9} {'x torch (train/infer)':>22} {'x bf16 (train/infer)':>21}")
    for label, (train_ms, infer_ms) in results.items():
        vs_bf16 = f"{bf16[0] / train_ms:5.2f} / {bf16[1] / infer_ms:5.2f}" if bf16 else "-"
        print(f"  {label:<36} {train_ms:9.3f} {infer_ms:9.3f} {base_train / train_ms:10.2f} / "
              f"{base_infer / infer_ms:5.2f}     {vs_bf16:>15}")
    for label in skipped:
        print(f"  skipped: {label}")


def time_grouped_mlp(recipe, dims, x, sizes, probs, train, quantized_backend):
    """(label, (train ms, inference ms)) of a GroupedMLP in one recipe; (why not, None) when a
    quantized recipe's GEMMs would not run on ``quantized_backend``."""
    mlp = grouped.GroupedMLP(*dims, recipe=recipe).to(x.device)
    variable = f"GROUPED_BACKEND_{recipe.upper()}"
    if mlp.fc1.fmt.quantized:
        os.environ[variable] = quantized_backend
    try:
        decision = grouped.explain(*_fc1_operands(mlp, x, sizes), sizes)
        if mlp.fc1.fmt.quantized and decision.backend != quantized_backend:
            why = decision.reasons[quantized_backend]
            return f"GroupedMLP {recipe}: {quantized_backend} cannot serve it ({why})", None
        times = (gpu_ms(train(lambda: mlp(x, sizes, probs), list(mlp.parameters()))),
                 gpu_ms(torch.no_grad()(lambda: mlp(x, sizes, probs))))
        return f"GroupedMLP {recipe} ({decision.backend})", times
    finally:
        os.environ.pop(variable, None)


def _fc1_operands(mlp, x, sizes):
    fc1 = mlp.fc1
    w = fc1._forward_weight(fc1.weights())
    a = x.detach() if not fc1.fmt.quantized else grouped.quantize(x.detach(), fc1.fmt)
    return a, w


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", default="bf16,mxfp8")
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument("--quantized-backend", default="cute", help="the backend quantized recipes must run on")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark times GPU steps")
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.layers.split(","):
        run_layer(name, args.recipes.split(","), args.quantized_backend)


if __name__ == "__main__":
    main()
