"""The kernel cache loads code: it must load only what this user built, and degrade, not break.

On the CPU (kernels compile for sm_90a without a GPU): a cache directory or an entry that
another user could change is never loaded from; what is loaded is exactly the bytes that were
checked; a read-only or uncreatable directory and a missing C compiler leave the library
working (with one warning) and raise under GROUPED_STRICT=1.
"""

import hashlib
import importlib
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
pytest.importorskip("tvm_ffi", reason="apache-tvm-ffi not installed")

import grouped  # noqa: E402
from grouped import kernels  # noqa: E402

AS_ROOT = os.getuid() == 0
OTHER_UID = 12345


@pytest.fixture
def offsets_spec(monkeypatch):
    """The cheapest kernel (int32 splits_to_offsets) and its build, compiled for sm_90a."""
    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_90a")
    from cute_backend import offsets

    spec = offsets._spec(torch.int32)
    return spec, (lambda: offsets.compile_config(torch.int32))


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A private cache directory holding the int32 splits_to_offsets entry."""
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    from cute_backend import cache, offsets

    directory = tmp_path_factory.mktemp("warm")
    directory.chmod(0o700)
    old = os.environ.get("GROUPED_CACHE_DIR")
    os.environ["GROUPED_CACHE_DIR"] = str(directory)
    try:
        cache.KernelCache().get(offsets._spec(torch.int32), lambda: offsets.compile_config(torch.int32))
    finally:
        if old is None:
            del os.environ["GROUPED_CACHE_DIR"]
        else:
            os.environ["GROUPED_CACHE_DIR"] = old
    return directory


def _copy(warm: Path, target: Path) -> Path:
    shutil.copytree(warm, target)
    target.chmod(0o700)
    return target


def _get(monkeypatch, directory, offsets_spec):
    from cute_backend.cache import KernelCache

    monkeypatch.setenv("GROUPED_CACHE_DIR", str(directory))
    cache = KernelCache()
    spec, build = offsets_spec
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        function = cache.get(spec, build)
    return cache, function, [str(w.message) for w in caught]


def _entry(directory: Path, suffix: str) -> Path:
    (path,) = directory.glob(f"splits_to_offsets-*{suffix}")
    return path


def test_valid_entry_loads_from_disk(warm, tmp_path, monkeypatch, offsets_spec):
    cache, _, messages = _get(monkeypatch, _copy(warm, tmp_path / "c"), offsets_spec)
    assert (cache.disk_loads, cache.compiles, messages) == (1, 0, [])


def test_what_loads_is_the_checked_bytes_in_memory(warm, tmp_path, monkeypatch, offsets_spec):
    """dlopen maps an anonymous memory file holding the verified bytes, never the cache path."""
    directory = _copy(warm, tmp_path / "c")
    _get(monkeypatch, directory, offsets_spec)
    maps = Path("/proc/self/maps").read_text()
    assert "grouped-kernel" in maps
    assert str(directory) not in maps


def test_entry_symlinked_to_a_world_writable_file_is_not_loaded(warm, tmp_path, monkeypatch, offsets_spec):
    directory = _copy(warm, tmp_path / "c")
    library = _entry(directory, ".so")
    planted = tmp_path / "planted.so"
    shutil.copy(library, planted)
    planted.chmod(0o666)
    library.unlink()
    library.symlink_to(planted)
    cache, _, _ = _get(monkeypatch, directory, offsets_spec)
    assert (cache.disk_loads, cache.compiles) == (0, 1)
    assert not library.is_symlink() and library.stat().st_mode & 0o022 == 0, "the rebuilt entry replaces the link"


def test_group_writable_entry_is_not_loaded(warm, tmp_path, monkeypatch, offsets_spec):
    directory = _copy(warm, tmp_path / "c")
    _entry(directory, ".so").chmod(0o664)
    cache, _, _ = _get(monkeypatch, directory, offsets_spec)
    assert (cache.disk_loads, cache.compiles) == (0, 1)


@pytest.mark.skipif(not AS_ROOT, reason="needs root to make a file another user's")
def test_entry_of_another_user_is_not_loaded(warm, tmp_path, monkeypatch, offsets_spec):
    directory = _copy(warm, tmp_path / "c")
    for suffix in (".so", ".sha256"):
        os.chown(_entry(directory, suffix), OTHER_UID, OTHER_UID)
    cache, _, _ = _get(monkeypatch, directory, offsets_spec)
    assert (cache.disk_loads, cache.compiles) == (0, 1)


@pytest.mark.parametrize("mode", [0o770, 0o707])
def test_directory_others_can_write_is_not_used(warm, tmp_path, monkeypatch, offsets_spec, mode):
    directory = _copy(warm, tmp_path / "c")
    directory.chmod(mode)
    before = sorted(p.name for p in directory.iterdir())
    cache, function, messages = _get(monkeypatch, directory, offsets_spec)
    assert (cache.disk_loads, cache.compiles) == (0, 1), "compiled for the process, not loaded from there"
    assert function is not None
    assert sorted(p.name for p in directory.iterdir()) == before, "nothing written into it"
    assert len(messages) == 1 and "GROUPED_CACHE_DIR" in messages[0] and "writable by nobody else" in messages[0]


def test_parent_others_can_write_is_not_used(warm, tmp_path, monkeypatch, offsets_spec):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone may rename our directory away and put theirs there
    directory = _copy(warm, shared / "c")
    cache, _, messages = _get(monkeypatch, directory, offsets_spec)
    assert (cache.disk_loads, cache.compiles) == (0, 1)
    assert "writable by other users" in messages[0]


def test_sticky_world_writable_parent_is_fine(warm, tmp_path, monkeypatch, offsets_spec):
    shared = tmp_path / "tmp-like"
    shared.mkdir()
    shared.chmod(0o1777)
    cache, _, messages = _get(monkeypatch, _copy(warm, shared / "c"), offsets_spec)
    assert (cache.disk_loads, cache.compiles, messages) == (1, 0, [])


@pytest.mark.skipif(not AS_ROOT, reason="needs root to make a directory another user's")
def test_component_of_another_user_is_not_used(warm, tmp_path, monkeypatch, offsets_spec):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    directory = _copy(warm, theirs / "c")
    os.chown(theirs, OTHER_UID, OTHER_UID)  # they could swap "c" for a directory of theirs at any time
    cache, _, messages = _get(monkeypatch, directory, offsets_spec)
    assert (cache.disk_loads, cache.compiles) == (0, 1)
    assert "uid 12345" in messages[0]


def test_symlinked_cache_dir_resolves_to_its_target(warm, tmp_path, monkeypatch, offsets_spec):
    target = _copy(warm, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(target)
    cache, _, messages = _get(monkeypatch, link, offsets_spec)
    assert (cache.disk_loads, cache.compiles, messages) == (1, 0, [])


def test_sidecar_and_library_replaced_together_rebuild_only_if_inconsistent(warm, tmp_path, monkeypatch,
                                                                           offsets_spec):
    """The checksum guards against corruption; a library whose checksum matches but which is not
    a loadable kernel is rebuilt, never run."""
    directory = _copy(warm, tmp_path / "c")
    library, checksum = _entry(directory, ".so"), _entry(directory, ".sha256")
    junk = b"\x7fELF not really a library"
    library.write_bytes(junk)
    checksum.write_text(hashlib.sha256(junk).hexdigest())
    cache, _, _ = _get(monkeypatch, directory, offsets_spec)
    assert (cache.disk_loads, cache.compiles) == (0, 1)


def test_read_only_directory_loads_valid_entries(warm, tmp_path, monkeypatch, offsets_spec):
    from cute_backend import cache as cache_module

    directory = _copy(warm, tmp_path / "c")
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(30, "Read-only file system", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(cache_module.os, "open", read_only)
    cache, _, messages = _get(monkeypatch, directory, offsets_spec)
    assert (cache.disk_loads, cache.compiles, messages) == (1, 0, [])
    _entry(directory, ".so").unlink()  # a missing entry: compiled for the process, one warning
    cache, function, messages = _get(monkeypatch, directory, offsets_spec)
    assert (cache.disk_loads, cache.compiles) == (0, 1) and function is not None
    assert len(messages) == 1 and "read-only" in messages[0]


def test_uncreatable_default_directory_still_runs_and_names_the_variable(tmp_path, monkeypatch, offsets_spec):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.delenv("GROUPED_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the default directory would be a-file/grouped
    from cute_backend.cache import KernelCache

    cache = KernelCache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        function = cache.get(*offsets_spec)
    assert function is not None and cache.compiles == 1
    assert len(caught) == 1 and "GROUPED_CACHE_DIR" in str(caught[0].message)


def test_no_c_compiler_raises_kernel_unavailable(tmp_path, monkeypatch, offsets_spec):
    from cute_backend.cache import KernelCache, KernelUnavailable

    monkeypatch.setenv("GROUPED_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.raises(KernelUnavailable, match="C compiler"):
        KernelCache().get(*offsets_spec)
    assert not list((tmp_path / "c").glob("*.so"))


def test_info_reports_the_cache_and_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUPED_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    from grouped.info import report as info_report

    report = info_report()
    assert str(tmp_path / "c") in report and "no C compiler" in report


# ---- the library falls back when our kernels cannot be built -------------------------------------


@pytest.fixture
def kernels_broken(monkeypatch):
    """Our kernels look usable, and the first one built raises KernelUnavailable (as with no cc)."""
    from cute_backend.cache import KernelUnavailable

    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setattr(kernels, "usable", lambda t: kernels._failure is None)

    def unbuildable(*args, **kwargs):
        raise KernelUnavailable("linking a compiled kernel needs a C compiler: 'cc' was not found")

    return unbuildable


def test_quantize_falls_back_to_torch_with_one_warning(kernels_broken, monkeypatch, gen):
    monkeypatch.setattr(importlib.import_module("grouped.quantize"), "_quantize_on_gpu", kernels_broken)
    x = torch.randn(64, 64, generator=gen)
    with pytest.warns(RuntimeWarning, match="C compiler"):
        q = grouped.quantize(x, "mxfp8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one a call
        q2 = grouped.quantize(x, "mxfp8")
    assert torch.equal(q.data.view(torch.uint8), q2.data.view(torch.uint8))
    assert "C compiler" in kernels.unavailable("cuda", (9, 0))


def test_splits_to_offsets_falls_back(kernels_broken, monkeypatch):
    import grouped.offsets as offsets_module

    monkeypatch.setattr(offsets_module, "_offsets_on_gpu", kernels_broken)
    with pytest.warns(RuntimeWarning):
        (ends,) = grouped.splits_to_offsets([3, 4], strides=[1], include_leading_zero=[False], dtypes=[torch.int32])
    assert ends.tolist() == [3, 7]


def test_strict_raises_instead_of_falling_back(kernels_broken, monkeypatch, gen):
    import grouped.offsets as offsets_module
    from cute_backend.cache import KernelUnavailable

    monkeypatch.setattr(offsets_module, "_offsets_on_gpu", kernels_broken)
    monkeypatch.setenv("GROUPED_STRICT", "1")
    with pytest.raises(KernelUnavailable):
        grouped.splits_to_offsets([3, 4], strides=[1], include_leading_zero=[False], dtypes=[torch.int32])


def test_gemm_falls_to_the_next_backend(kernels_broken, monkeypatch, gen):
    from grouped.backends import BACKENDS

    cute = BACKENDS["cute"]
    monkeypatch.setattr(cute, "unavailable", lambda device_type, capability: kernels._failure)
    monkeypatch.setattr(cute, "run", kernels_broken)
    a = torch.randn(32, 64, generator=gen).to(torch.bfloat16)
    b = torch.randn(2, 16, 64, generator=gen).to(torch.bfloat16)
    assert grouped.explain(a, b, [10, 22], backend="cute").backend == "cute"
    with pytest.warns(RuntimeWarning, match="next backend"):
        out = grouped.gemm(a, b, [10, 22], backend="cute")
    assert torch.equal(out, grouped.gemm(a, b, [10, 22], backend="reference"))
    decision = grouped.explain(a, b, [10, 22], backend="cute")
    assert decision.backend == "reference" and "C compiler" in decision.reasons["cute"]


def test_cache_entry_files_are_private(warm):
    for path in warm.iterdir():
        assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH), path


def test_cache_dir_is_created_private(tmp_path, monkeypatch, offsets_spec):
    target = tmp_path / "new" / "cache"
    cache, _, messages = _get(monkeypatch, target, offsets_spec)
    assert cache.compiles == 1 and messages == []
    assert target.stat().st_mode & 0o777 == 0o700 and (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    assert len(list(target.glob("*.so"))) == 1
