"""CuTe DSL kernels compile for sm_90a on a machine with no GPU, and the disk cache holds.

Every kernel config the library can pick is compiled (CUTE_DSL_ARCH set before
cutlass is imported); then a second process must load from disk without
compiling or importing cutlass, a tampered library must be rebuilt, and racing
threads and processes must compile an entry once (what the cache refuses to load:
tests/test_kernel_cache.py).
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
pytest.importorskip("tvm_ffi", reason="apache-tvm-ffi not installed")

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh process: fetch every kernel (or the first argv[1] of them), report what the cache did.
_PROBE = """
import json, sys
import cute_backend
from cute_backend.cache import CACHE
from grouped.formats import MXFP8, NVFP4
from grouped.quantize import kernel_facts
configs = cute_backend.kernel_configs([kernel_facts(MXFP8), kernel_facts(NVFP4)])
for spec, build in configs[: int(sys.argv[1]) if len(sys.argv) > 1 else None]:
    CACHE.get(spec, build)
print(json.dumps({"compiles": CACHE.compiles, "disk_loads": CACHE.disk_loads,
                  "cutlass_imported": "cutlass" in sys.modules, "tvm_ffi_imported": "tvm_ffi" in sys.modules}))
"""


def _kernel_configs() -> list:
    """Every (spec, build) the library can pick, as the probe lists them."""
    import cute_backend
    from grouped.formats import MXFP8, NVFP4
    from grouped.quantize import kernel_facts

    return cute_backend.kernel_configs([kernel_facts(MXFP8), kernel_facts(NVFP4)])


def _probe(cache_dir: Path, limit: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "GROUPED_CACHE_DIR": str(cache_dir), "CUTE_DSL_ARCH": "sm_90a", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", _PROBE] + ([str(limit)] if limit is not None else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_probe(cache_dir: Path) -> dict:
    proc = _probe(cache_dir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory) -> Path:
    """A cache directory every kernel config has been compiled into, in a first process."""
    directory = tmp_path_factory.mktemp("cute-cache")
    first = _run_probe(directory)
    n_configs = len(_kernel_configs())
    assert first["compiles"] == n_configs and first["disk_loads"] == 0
    return directory


def test_every_config_compiles_for_sm90a(warm_dir):
    libraries = sorted(warm_dir.glob("*.so"))
    assert len(libraries) == len(_kernel_configs())
    for library in libraries:
        assert library.with_suffix(".sha256").read_text().strip()


def test_second_process_loads_without_compiling(warm_dir):
    second = _run_probe(warm_dir)
    assert second["compiles"] == 0 and second["disk_loads"] == len(_kernel_configs())
    assert not second["cutlass_imported"], "a warm cache must not import the DSL"
    assert not second["tvm_ffi_imported"], "a warm cache calls the libraries through ctypes"


def _offsets_function(directory: Path):
    """The int32 splits_to_offsets library of a warm cache directory, loaded through ctypes."""
    import torch

    from cute_backend import cache, offsets
    from cute_backend.ffi import LibraryFunction

    spec = offsets._spec(torch.int32)
    return LibraryFunction(str(directory / f"{cache.cache_key(spec)}.so"), spec.symbol)


def test_library_function_arguments_reach_the_library(warm_dir):
    """The packed TVMFFIAny / DLTensor block is what the library decodes: its own checks name the
    argument that is wrong (no GPU here, so every call stops at a check)."""
    import torch

    from cute_backend.offsets import MAX_OUTPUTS

    function = _offsets_function(warm_dir)
    sizes = torch.ones(8, dtype=torch.int32)
    outs = [torch.zeros(9, dtype=torch.int32) for _ in range(MAX_OUTPUTS)]
    scalars = [1] * MAX_OUTPUTS + [1, 0, 0]
    with pytest.raises(RuntimeError, match=r"argument #0.*expected device_type=cuda"):
        function(sizes, *outs, *scalars)  # a CPU tensor, decoded as one: its device is checked
    with pytest.raises(RuntimeError, match=r"Mismatched type on argument #0"):
        function(7, *outs, *scalars)  # an int where a tensor goes
    with pytest.raises(RuntimeError, match=r"argument #0.*ndim"):
        function(sizes.view(2, 4), *outs, *scalars)
    with pytest.raises(RuntimeError, match=r"Expects 20 parameters"):
        function(sizes, *outs, *scalars[:-1])
    with pytest.raises(TypeError, match="float64"):
        function(sizes.double(), *outs, *scalars)  # refused before the call: no DLPack code kept for it


def test_tampered_library_is_rebuilt(warm_dir, tmp_path):
    import shutil

    directory = tmp_path / "cache"
    shutil.copytree(warm_dir, directory)
    victim = sorted(directory.glob("*.so"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = _run_probe(directory)
    assert report["compiles"] == 1, "exactly the tampered entry is rebuilt"
    import hashlib

    assert hashlib.sha256(victim.read_bytes()).hexdigest() == victim.with_suffix(".sha256").read_text().strip()


def test_library_whose_runtime_moved_is_relinked(warm_dir, tmp_path):
    """An entry linked against a runtime library that is no longer where it was (a moved or
    recreated environment) fails to load: it is rebuilt, not an error."""
    import hashlib
    import shutil

    directory = tmp_path / "cache"
    shutil.copytree(warm_dir, directory)
    runtime = tmp_path / "gone" / "libgrouped_moved_runtime.so"
    runtime.parent.mkdir()
    subprocess.run(["cc", "-shared", "-o", str(runtime), "-x", "c", "/dev/null"], check=True)
    victim = sorted(directory.glob("*.so"))[0]
    subprocess.run(
        ["cc", "-shared", "-o", str(victim), "-x", "c", "/dev/null", "-Wl,--no-as-needed", f"-L{runtime.parent}",
         f"-l:{runtime.name}", f"-Wl,-rpath,{runtime.parent}"], check=True,
    )
    victim.with_suffix(".sha256").write_text(hashlib.sha256(victim.read_bytes()).hexdigest())
    shutil.rmtree(runtime.parent)
    report = _run_probe(directory)
    assert report["compiles"] == 1, "exactly the entry that no longer loads is rebuilt"


RACED_CONFIGS = 6  # racing does not need every config: the first few, each compiled once in all


def test_racing_processes_compile_an_entry_once(tmp_path):
    procs = [_probe(tmp_path, RACED_CONFIGS) for _ in range(3)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["compiles"] for r in reports) == RACED_CONFIGS
    assert all(r["compiles"] + r["disk_loads"] == RACED_CONFIGS for r in reports)


def test_threads_compile_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUPED_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_90a")
    from cute_backend.cache import KernelCache

    cache = KernelCache()
    spec, build = _kernel_configs()[0]
    builds = []

    def counted():
        builds.append(1)
        return build()

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(spec, counted))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and cache.compiles == 1
    assert len(results) == 4 and all(r is results[0] for r in results)


def _module_level_imports(path: Path) -> set[str]:
    """The modules ``path`` imports at module level (not inside functions), as dotted names."""
    import ast

    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import x`
    return names


def test_dependencies_point_one_way():
    """cute_backend imports nothing of grouped (what a kernel needs to know arrives through its
    config), and a device module (cutlass imported at module level) and a host module never import
    each other at module level: what both need lives in a config module, and a host module reaches
    device code only inside a compile entry."""
    import ast

    paths = sorted((ROOT / "cute_backend").rglob("*.py"))
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in paths}
    imports = {name: _module_level_imports(path) for name, path in modules.items()}
    device = {name for name, found in imports.items() if any(m.split(".")[0] == "cutlass" for m in found)}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            found = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not [m for m in found if m.split(".")[0] == "grouped"], f"{name} imports grouped"
        ours = {m for m in imports[name] if m in modules and not m.endswith("config") and "." in m}
        if name in device:
            assert ours <= device, f"device module {name} imports host modules {sorted(ours - device)}"
        else:
            assert not ours & device, f"host module {name} imports device modules {sorted(ours & device)}"
