"""`import grouped` must stay light: no kernels, no CUDA initialisation."""

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = r"""
import json, sys
import grouped
import torch
heavy = ("cutlass", "cute_backend", "cudnn")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
print(json.dumps({"loaded": loaded, "cuda_initialized": torch.cuda.is_initialized()}))
"""


def test_import_grouped_is_light():
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"import grouped failed:\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], (
        f"`import grouped` imported heavy modules: {result['loaded']}"
    )
    assert result["cuda_initialized"] is False, "`import grouped` initialised CUDA"
