"""Shared pytest setup.

The `gpu` marker is registered in pyproject.toml. Here:
- tests marked `gpu` are skipped when CUDA is not available;
- ``--require-kernels`` (or GROUPED_TEST_REQUIRE_KERNELS=1) turns "our CuTe DSL kernels cannot
  run here" from a skip into a failure (``kernels_unavailable``), so a GPU machine whose kernels
  failed to load cannot report green; use it on the Hopper GPU;
- `seed` gives each test its own deterministic seed (derived from its node id), and
  `gen` a CPU torch.Generator seeded with it, so every test draws fresh, varied
  random data that is still reproducible run to run;
- every test starts with no GROUPED_* variable from the outer environment and an
  empty backend-decision cache, so backend choice never depends on the caller.
"""

import os
import zlib

import pytest

REQUIRE_KERNELS = "GROUPED_TEST_REQUIRE_KERNELS"


def pytest_addoption(parser):
    parser.addoption("--require-kernels", action="store_true",
                     help="fail, not skip, GPU tests whose CuTe DSL kernels cannot run here")


def pytest_configure(config):
    if config.getoption("--require-kernels"):
        os.environ[REQUIRE_KERNELS] = "1"


def kernels_unavailable(reason: str):
    """Skip a test because our kernels cannot run here, or fail it under --require-kernels."""
    if os.environ.get(REQUIRE_KERNELS) == "1":
        pytest.fail(f"our kernels are unavailable (--require-kernels): {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _clean_grouped_env(monkeypatch):
    import grouped

    for name in grouped.env.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    grouped.selector.clear_cache()
    yield
    grouped.selector.clear_cache()


@pytest.fixture
def seed(request) -> int:
    """A per-test seed: CRC32 of the test's node id (stable across runs and machines)."""
    return zlib.crc32(request.node.nodeid.encode("utf-8"))


@pytest.fixture
def gen(seed):
    """A CPU torch.Generator seeded with this test's `seed`."""
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return g
