"""Compile cache for CuTe DSL kernels: compile once per process, keep on disk, load fast.

A kernel is named by a ``KernelSpec`` (kernel name, a hashable config, the GPU
arch, and the source files that define it). Its cache key hashes that with the
versions of the toolchain (nvidia-cutlass-dsl, apache-tvm-ffi) and the text of
the sources, so a change to any of them compiles anew.

On a miss the kernel is compiled with the TVM-FFI calling convention
(``--enable-tvm-ffi``: its entry point checks its arguments itself), exported
to an object file and linked into a shared library. A warm process loads that
library with ctypes (``ffi.LibraryFunction``) and imports neither cutlass nor
tvm_ffi, so the first call costs milliseconds, not the second it takes to
import the DSL.

On disk, under ``GROUPED_CACHE_DIR`` (default ``$XDG_CACHE_HOME/grouped`` or
``~/.cache/grouped``), each entry is ``<key>.so`` plus ``<key>.sha256``:
- a library whose checksum does not match (corrupt, truncated, tampered), or
  that no longer loads (its CuTe DSL / TVM-FFI runtimes moved), is rebuilt;
- the directory is created private to the user (0700); one that another user
  owns or that group/others can write is refused, since loading a library from
  it would run whatever was put there;
- writers build in a temporary file and publish with an atomic rename, under a
  per-entry file lock, so racing processes neither corrupt an entry nor
  compile it twice.
In one process, each entry compiles at most once, even when threads race.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import stat
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from .ffi import LibraryFunction

CACHE_FORMAT = 1  # bump when the on-disk layout changes
ARCH = "sm_90a"  # what every kernel here is compiled for (Hopper)


def compile_kernel(host, *args):
    """cute.compile ``host`` for ARCH with the TVM-FFI entry point the cache calls, a fake stream
    appended as its last argument; no GPU needed (with CUTE_DSL_ARCH set)."""
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_stream

    return cute.compile(host, *args, make_fake_stream(), options=f"--enable-tvm-ffi --gpu-arch {ARCH}")


@dataclass(frozen=True)
class KernelSpec:
    name: str  # a kernel family, e.g. "splits_to_offsets"
    config: tuple  # hashable and repr-stable: everything the compile depends on
    arch: str  # "sm_90a"
    sources: tuple[str, ...]  # files whose text defines the kernel

    @property
    def symbol(self) -> str:
        return f"grouped_{self.name}"


def _toolchain() -> tuple[str, ...]:
    versions = []
    for package in ("nvidia-cutlass-dsl", "apache-tvm-ffi"):
        try:
            versions.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} missing")
    return tuple(versions)


@functools.lru_cache(maxsize=None)
def cache_key(spec: KernelSpec) -> str:
    h = hashlib.sha256()
    h.update(repr((CACHE_FORMAT, spec.name, spec.config, spec.arch, _toolchain())).encode())
    for source in spec.sources:
        h.update(Path(source).read_bytes())
    return f"{spec.name}-{h.hexdigest()[:32]}"


def cache_dir() -> Path:
    """The cache directory, created private to the user; refused if others can write it."""
    from grouped import env

    configured = env.read("GROUPED_CACHE_DIR")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grouped"
    path = Path(configured).expanduser() if configured else base
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"GROUPED_CACHE_DIR {path} is writable by other users or owned by another user "
            f"(mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}); compiled kernels are loaded "
            "from it as code, so it must be private: chmod 700 it or point GROUPED_CACHE_DIR elsewhere"
        )
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class KernelCache:
    """In-memory and on-disk cache of compiled kernels (one per process: ``CACHE``)."""

    def __init__(self):
        self._functions: dict[str, object] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.compiles = 0  # compiles done by this process (tests read it)
        self.disk_loads = 0

    def get(self, spec: KernelSpec, build: Callable[[], object]):
        """The callable kernel for ``spec``; ``build()`` returns a TVM-FFI ``cute.compile`` result."""
        key = cache_key(spec)
        function = self._functions.get(key)
        if function is not None:
            return function
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._functions:
                self._functions[key] = self._load_or_build(spec, key, build)
        return self._functions[key]

    def _load_or_build(self, spec: KernelSpec, key: str, build):
        directory = cache_dir()
        library, checksum = directory / f"{key}.so", directory / f"{key}.sha256"
        with open(directory / f"{key}.lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # another process may be building it
            if _valid(library, checksum):
                try:
                    function = LibraryFunction(str(library), spec.symbol)
                    self.disk_loads += 1
                    return function
                except OSError:
                    pass  # linked against runtimes that are not where they were (a moved environment): relink
            self._build(spec, build, library, checksum)
            self.compiles += 1
            return LibraryFunction(str(library), spec.symbol)

    def _build(self, spec: KernelSpec, build, library: Path, checksum: Path) -> None:
        compiled = build()
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            obj, so = Path(tmp) / "kernel.o", Path(tmp) / "kernel.so"
            compiled.export_to_c(str(obj), function_name=spec.symbol)
            _link(obj, so)
            digest = _sha256(so)
            os.replace(so, library)
            (Path(tmp) / "sum").write_text(digest)
            os.replace(Path(tmp) / "sum", checksum)

    def clear_memory(self) -> None:
        """Forget in-process kernels (the disk cache stays)."""
        self._functions.clear()


def _valid(library: Path, checksum: Path) -> bool:
    try:
        expected = checksum.read_text().strip()
        return library.is_file() and _sha256(library) == expected
    except OSError:
        return False


def _link(obj: Path, so: Path) -> None:
    """Link an exported object into a shared library against the CuTe DSL and TVM-FFI runtimes."""
    from cutlass.runtime import find_runtime_libraries

    args = [os.environ.get("CC", "cc"), "-shared", "-o", str(so), str(obj)]
    for lib in find_runtime_libraries(enable_tvm_ffi=True):
        lib = Path(lib)
        args += [f"-L{lib.parent}", f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"linking the compiled kernel failed ({' '.join(args)}):\n{result.stderr}")


CACHE = KernelCache()
