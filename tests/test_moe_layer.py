"""scripts/moe_layer.py: the MoE layer example trains, eager and compiled, on the CPU (small sizes).

- The MoE block (router, permutation, GroupedMLP with probs, un-permutation) equals a per-token
  fp64 MoE computed from the block's own routing and weights.
- Trained eager and under torch.compile(fullgraph=True), the loss goes down, and the two runs
  give the same losses: bit for bit with the aot_eager backend (our ops and torch's run as in
  eager), and within fp32 rounding's drift with inductor, whose generated code for the torch ops
  around ours (router softmax, RMSNorm, ...) rounds differently in the last bits.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
from ops_reference import rel_err

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "moe_layer.py")


sys.path.insert(0, os.path.dirname(SCRIPT))  # imported by name, so every test shares one module (pickling)
moe_layer = importlib.import_module("moe_layer")
SMALL = moe_layer.Config(hidden=32, ffn_hidden=32, num_experts=4, top_k=2, tokens=32, steps=30)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("experts", ["grouped", "grouped_mm"])
def test_moe_block_matches_per_token_reference(experts):
    model = moe_layer.build(SMALL, experts)
    x, _ = next(moe_layer.batches(SMALL, "cpu"))
    h = model.norm(x)
    with torch.no_grad():
        y = model.moe(h)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    assert rel_err(y, moe_layer.reference_moe(model.moe, h)) <= 2e-2  # GroupedMLP's tolerance (tests/test_ops.py)


def _decreases(losses):
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    return last < 0.7 * first


def test_compiled_training_matches_eager():
    eager = moe_layer.train(SMALL, compiled=False)
    inductor = moe_layer.train(SMALL, compiled=True)
    assert _decreases(eager) and _decreases(inductor), (eager, inductor)
    gaps = [abs(a - b) / a for a, b in zip(eager, inductor)]
    assert max(gaps) <= 1e-2, f"inductor run drifts {max(gaps):.3g} from eager"
    steps = moe_layer.Config(**{**SMALL.__dict__, "steps": 10})
    assert moe_layer.train(steps, compiled=True, backend="aot_eager") == eager[:10], "aot_eager: bit for bit"


def test_script_runs():
    proc = subprocess.run([sys.executable, SCRIPT, "--steps", "3", "--compile", "eager", "--hidden", "32",
                           "--ffn-hidden", "32", "--tokens", "16"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "loss (grouped experts, cpu)" in proc.stdout


@pytest.mark.gpu
def test_compiled_training_matches_eager_gpu():
    """On the GPU (its backends, split sizes on the GPU, no sync): both runs learn, and stay close."""
    eager = moe_layer.train(SMALL, compiled=False, device="cuda")
    compiled = moe_layer.train(SMALL, compiled=True, device="cuda")
    assert _decreases(eager) and _decreases(compiled), (eager, compiled)
    assert max(abs(a - b) / a for a, b in zip(eager, compiled)) <= 2e-2
