#!/usr/bin/env python
"""A complete MoE layer on grouped.GroupedMLP, trained eager and under torch.compile (issue #26).

The MoE block, as PyTorch MoE stacks (torchtitan, ...) write it:

    router     logits = x W_r (fp32) -> softmax -> top-k experts per token, their probs
               renormalized to sum to 1 over the k choices
    permute    the T * k (token, choice) rows sorted by expert (a stable argsort of the expert
               ids); rows per expert by bincount: the split sizes, a tensor on x's device
    experts    grouped.GroupedMLP(rows, split sizes, probs): FC1 -> SwiGLU x prob -> FC2
    unpermute  rows back in (token, choice) order, summed over the k choices

The model: x -> x + MoE(RMSNorm(x)) -> linear readout, in bf16, regressing a fixed random teacher
on fresh Gaussian inputs (the same stream for every run). It trains a few hundred AdamW steps
eager and compiled (torch.compile(fullgraph=True)) from the same initialisation and prints both
loss curves. --experts picks the expert MLP: grouped (GroupedMLP), grouped_mm (the same MLP
written on torch._grouped_mm's convention, calling grouped.grouped_mm) or torch
(torch._grouped_mm itself); --bench times the training step of each (GPU).

    python scripts/moe_layer.py                                  # CPU, small, both runs
    python scripts/moe_layer.py --backend aot_eager              # both runs bit for bit on the CPU
    python scripts/moe_layer.py --device cuda --bench --hidden 2048 --ffn-hidden 1408 \
        --num-experts 64 --top-k 8 --tokens 8192                 # GPU: a step timed, five ways
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import grouped


@dataclass
class Config:
    hidden: int = 64
    ffn_hidden: int = 64
    num_experts: int = 4
    top_k: int = 2
    tokens: int = 64  # a batch
    steps: int = 300
    lr: float = 3e-3
    seed: int = 0


class TorchStyleExperts(nn.Module):
    """The expert MLP as torch._grouped_mm code writes it (weights (E, N, K), offsets int32);
    ``mm`` is torch._grouped_mm or its drop-in grouped.grouped_mm."""

    def __init__(self, num_experts, hidden, ffn_hidden, mm, *, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.mm = mm
        self.w1 = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden, hidden, device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden, device=device, dtype=dtype))

    def forward(self, x, counts, probs):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        gate, up = self.mm(x, self.w1.transpose(1, 2), offs=offs).float().chunk(2, dim=-1)
        a = (F.silu(gate) * up * probs.unsqueeze(1)).to(x.dtype)
        return self.mm(a, self.w2.transpose(1, 2), offs=offs)


def make_experts(kind: str, cfg: Config, device) -> nn.Module:
    if kind == "grouped":
        return grouped.GroupedMLP(cfg.num_experts, cfg.hidden, cfg.ffn_hidden, device=device)
    mm = {"grouped_mm": grouped.grouped_mm, "torch": torch._grouped_mm}[kind]
    return TorchStyleExperts(cfg.num_experts, cfg.hidden, cfg.ffn_hidden, mm, device=device)


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1 (E, 2F, H), W2 (E, H, F)) of either expert module."""
    if isinstance(experts, grouped.GroupedMLP):
        return experts.fc1.weight, experts.fc2.weight
    return experts.w1, experts.w2


class MoE(nn.Module):
    def __init__(self, cfg: Config, experts: nn.Module, *, device=None):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.router = nn.Linear(cfg.hidden, cfg.num_experts, bias=False, device=device)  # fp32
        self.experts = experts

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs, experts), each (T, k): each token's top-k experts, probs renormalized over them."""
        probs, chosen = self.router(x.float()).softmax(dim=-1).topk(self.top_k, dim=-1)
        return probs / probs.sum(dim=-1, keepdim=True), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, k = x.shape[0], self.top_k
        probs, chosen = self.route(x)
        chosen = chosen.reshape(-1)
        order = torch.argsort(chosen, stable=True)  # (token, choice) rows grouped by expert
        counts = torch.bincount(chosen, minlength=self.num_experts)  # split sizes, on the device: no sync
        rows = self.experts(x[order // k], counts, probs.reshape(-1)[order])
        return rows[torch.argsort(order)].view(tokens, k, -1).sum(dim=1)


class TinyMoEModel(nn.Module):
    """x -> x + MoE(RMSNorm(x)) -> readout."""

    def __init__(self, cfg: Config, experts: str = "grouped", *, device=None):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.hidden, device=device, dtype=torch.bfloat16)
        self.moe = MoE(cfg, make_experts(experts, cfg, device), device=device)
        self.readout = nn.Linear(cfg.hidden, cfg.hidden, bias=False, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            for w in expert_weights(self.moe.experts):
                w.normal_(0, w.shape[-1] ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(x + self.moe(self.norm(x)))


def build(cfg: Config, experts: str = "grouped", device="cpu") -> TinyMoEModel:
    """The model, initialised from cfg.seed (every run starts from the same weights)."""
    torch.manual_seed(cfg.seed)
    return TinyMoEModel(cfg, experts, device=device)


def batches(cfg: Config, device):
    """The training stream: (x bf16, target fp32) from a fixed random teacher, seeded by cfg.seed."""
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    teacher_in = torch.randn(cfg.hidden, 4 * cfg.hidden, generator=gen) / cfg.hidden**0.5
    teacher_out = torch.randn(4 * cfg.hidden, cfg.hidden, generator=gen) / (4 * cfg.hidden) ** 0.5
    while True:
        x = torch.randn(cfg.tokens, cfg.hidden, generator=gen)
        yield x.to(device, torch.bfloat16), (torch.tanh(x @ teacher_in) @ teacher_out).to(device)


def train(cfg: Config, *, experts: str = "grouped", compiled: bool, device="cpu", backend="inductor") -> list[float]:
    """Loss per step of cfg.steps AdamW steps; the model's forward compiled (fullgraph, with the
    torch.compile ``backend``) or eager."""
    model = build(cfg, experts, device)
    forward = torch.compile(model, fullgraph=True, backend=backend) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for _, (x, target) in zip(range(cfg.steps), batches(cfg, device)):
        loss = F.mse_loss(forward(x).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE block token by token in fp64 on the CPU, from the block's own routing and weights:
    y_t = sum over its k experts e of p_te * W2_e (silu(gate) * up)(W1_e x_t)."""
    probs, chosen = moe.route(x)
    w1, w2 = (w.detach().cpu().double() for w in expert_weights(moe.experts))
    x64 = x.detach().cpu().double()
    out = torch.zeros_like(x64)
    for t in range(x.shape[0]):
        for p, e in zip(probs[t].tolist(), chosen[t].tolist()):
            gate, up = (w1[e] @ x64[t]).chunk(2)
            out[t] += p * (w2[e] @ (F.silu(gate) * up))
    return out


def time_step(cfg: Config, experts: str, compiled: bool, device, backend: str = "inductor", warmup: int = 5,
              iters: int = 20) -> float:
    """Milliseconds per training step (forward, backward, AdamW), after warm-up (and compile)."""
    model = build(cfg, experts, device)
    forward = torch.compile(model, fullgraph=True, backend=backend) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x, target = next(batches(cfg, device))

    def step():
        loss = F.mse_loss(forward(x).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def finish():  # wait for the GPU
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    finish()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    finish()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--compile", choices=("both", "eager", "compiled"), default="both",
                        help="which runs to train (both: eager and compiled, side by side)")
    parser.add_argument("--experts", choices=("grouped", "grouped_mm", "torch"), default="grouped")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generated)")
    for name in ("hidden", "ffn_hidden", "num_experts", "top_k", "tokens"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(Config, name))
    parser.add_argument("--bench", action="store_true",
                        help="time the training step of every --experts variant, eager and compiled (not training)")
    args = parser.parse_args()
    cfg = Config(args.hidden, args.ffn_hidden, args.num_experts, args.top_k, args.tokens, args.steps)

    if args.bench:
        print(f"training step, {cfg.tokens} tokens, hidden {cfg.hidden}, ffn {cfg.ffn_hidden}, "
              f"{cfg.num_experts} experts, top-{cfg.top_k}, on {args.device}:")
        for experts, compiled in (("grouped", False), ("grouped", True), ("grouped_mm", True), ("torch", False),
                                  ("torch", True)):
            ms = time_step(cfg, experts, compiled, args.device, args.backend)
            print(f"  {experts:<10} {'compiled' if compiled else 'eager':<8} {ms:8.3f} ms")
        return

    runs = {"eager": (False,), "compiled": (True,), "both": (False, True)}[args.compile]
    curves = {("compiled" if c else "eager"): train(cfg, experts=args.experts, compiled=c, device=args.device,
                                                    backend=args.backend)
              for c in runs}
    print(f"loss ({args.experts} experts, {args.device}):")
    print("  step " + "".join(f"{name:>14}" for name in curves))
    for step in sorted({0, *range(max(0, cfg.steps // 10 - 1), cfg.steps, max(1, cfg.steps // 10))}):
        print(f"  {step + 1:4d} " + "".join(f"{c[step]:14.6f}" for c in curves.values()))
    if len(curves) == 2:
        eager, compiled = curves.values()
        same = sum(a == b for a, b in zip(eager, compiled))
        gap = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled))
        print(f"  eager and compiled losses: {same} of {cfg.steps} steps bit-identical, largest relative gap {gap:.2e}")


if __name__ == "__main__":
    main()
