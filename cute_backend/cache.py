"""Compile cache for CuTe DSL kernels: compile once per process, keep on disk, load fast and safely.

A kernel is named by a ``KernelSpec`` (kernel name, a hashable config, the GPU
arch, and the source files that define it). Its cache key hashes that with the
versions of the toolchain (nvidia-cutlass-dsl, apache-tvm-ffi) and the text of
the sources, so a change to any of them compiles anew. Every fact a kernel
compiles in must be in its config.

On a miss the kernel is compiled with the TVM-FFI calling convention
(``--enable-tvm-ffi``), exported to an object file and linked (``cc``) into a
shared library. A warm process loads that library with ctypes
(``ffi.LibraryFunction``) and imports neither cutlass nor tvm_ffi.

The cache loads code, so nobody else may choose what it loads. The directory
(``GROUPED_CACHE_DIR``, default ``$XDG_CACHE_HOME/grouped`` or
``~/.cache/grouped``) is opened once, component by component from ``/``
without following symlinks: every component must belong to root or the user
and be writable by nobody else (a sticky, world-writable parent such as /tmp
is allowed), the directory itself must belong to the user and be writable by
nobody else. Every later access is relative to that directory handle and
refuses symlinks; an entry must be a regular file of the user's, writable by
nobody else, and match its checksum. What is loaded is exactly the bytes that
were checked: they are copied into an anonymous memory file that ``dlopen``
maps, so nothing can be swapped in between the check and the load.

Failures degrade, they do not break the library:
- a directory that cannot be created or is not safe: kernels are compiled in a
  private temporary directory and loaded from memory, not kept (one warning);
- a read-only directory: valid entries load, missing ones compile as above;
- no C compiler, or no CuTe DSL toolchain: ``KernelUnavailable``, which the
  library turns into its torch path (or the next backend) with one warning.
Writers build in a private temporary directory and publish with an atomic
rename under a per-entry file lock, so racing processes neither corrupt an
entry nor compile it twice. In one process, each entry compiles at most once.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from .ffi import LibraryFunction

CACHE_FORMAT = 2  # bump when the on-disk layout changes
ARCH = "sm_90a"  # what every kernel here is compiled for (Hopper)
CACHE_DIR_VARIABLE = "GROUPED_CACHE_DIR"  # documented with the library's other variables (grouped/env.py)
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


class KernelUnavailable(RuntimeError):
    """A kernel cannot be compiled or loaded on this machine; the message says what to fix."""


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
    """The configured cache directory (not opened or created here)."""
    configured = os.environ.get(CACHE_DIR_VARIABLE, "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grouped"


class UnsafeDirectory(OSError):
    """A cache directory (or a component above it) that another user could change."""


def _check_component(fd: int, path: str, *, last: bool) -> None:
    st = os.fstat(fd)
    me = os.getuid()
    if st.st_uid not in (0, me):
        raise UnsafeDirectory(f"{path} belongs to uid {st.st_uid}, not to you or root")
    if last:
        if st.st_uid != me or st.st_mode & _OTHERS_WRITE:
            raise UnsafeDirectory(
                f"{path} must be yours and writable by nobody else (mode {stat.filemode(st.st_mode)}, "
                f"owner uid {st.st_uid}): compiled kernels are loaded from it as code; chmod 700 it"
            )
    elif st.st_mode & _OTHERS_WRITE and not st.st_mode & stat.S_ISVTX:
        raise UnsafeDirectory(f"{path} is writable by other users (mode {stat.filemode(st.st_mode)})")


def open_private_dir(path: Path, *, create: bool) -> int:
    """A directory handle for ``path``, opened from / one component at a time without following
    symlinks (after resolving the symlinks the path names once), each component checked as the
    module doc says; missing components are created 0700 when ``create``. The caller closes it."""
    real = os.path.realpath(path)
    fd = os.open("/", _OPEN_DIR)
    try:
        _check_component(fd, "/", last=real == "/")
        walked = ""
        parts = [p for p in real.split("/") if p]
        for i, part in enumerate(parts):
            walked += "/" + part
            try:
                child = os.open(part, _OPEN_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o700, dir_fd=fd)
                child = os.open(part, _OPEN_DIR, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeDirectory(f"{walked} changed into a symlink or a file while it was opened") from e
                raise
            os.close(fd)
            fd = child
            _check_component(fd, walked, last=i == len(parts) - 1)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _read_entry(dir_fd: int, name: str) -> bytes | None:
    """The bytes of a cache entry: a regular file of the user's that nobody else can write; None
    when it is missing or not such a file."""
    try:
        fd = os.open(name, _OPEN_FILE, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & _OTHERS_WRITE:
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_entry(dir_fd: int, name: str, data: bytes) -> None:
    """Publish ``data`` as ``name`` atomically (a private temporary file, then a rename)."""
    temporary = f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


_memory_files: list[int] = []  # kept open for the process: dlopen knows a library by its /proc path


def load_bytes(data: bytes, symbol: str) -> LibraryFunction:
    """Load exactly ``data`` as a shared library (an anonymous memory file, dlopen'ed by its
    /proc/self/fd path) and bind its kernel entry."""
    fd = os.memfd_create("grouped-kernel", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    _memory_files.append(fd)
    return LibraryFunction(f"/proc/self/fd/{fd}", symbol)


class KernelCache:
    """In-memory and on-disk cache of compiled kernels (one per process: ``CACHE``)."""

    def __init__(self):
        self._functions: dict[str, object] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._warned: set[str] = set()
        self.compiles = 0  # compiles done by this process (tests read it)
        self.disk_loads = 0

    def get(self, spec: KernelSpec, build: Callable[[], object]):
        """The callable kernel for ``spec``; ``build()`` returns a TVM-FFI ``cute.compile`` result.
        Raises KernelUnavailable when it can be neither loaded nor built here."""
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

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _open_dir(self) -> int | None:
        path = cache_dir()
        try:
            return open_private_dir(path, create=True)
        except OSError as e:
            self._warn_once(
                f"grouped: the kernel cache {path} cannot be used ({e}); kernels are compiled for this process "
                f"only. Set {CACHE_DIR_VARIABLE} to a private, writable directory to keep them."
            )
            return None

    def _load_or_build(self, spec: KernelSpec, key: str, build):
        dir_fd = self._open_dir()
        if dir_fd is None:
            return self._build_and_load(spec, build, None, key)
        try:
            try:
                lock_fd = os.open(f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                  dir_fd=dir_fd)
            except OSError:
                lock_fd = None  # a read-only cache: read what is there, write nothing
            try:
                if lock_fd is not None:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # another process may be building it
                function = self._load(dir_fd, key, spec.symbol)
                if function is not None:
                    self.disk_loads += 1
                    return function
                if lock_fd is None:
                    self._warn_once(
                        f"grouped: the kernel cache {cache_dir()} is read-only; kernels missing from it are compiled "
                        f"for this process only. Set {CACHE_DIR_VARIABLE} to a writable directory to keep them."
                    )
                return self._build_and_load(spec, build, dir_fd if lock_fd is not None else None, key)
            finally:
                if lock_fd is not None:
                    os.close(lock_fd)
        finally:
            os.close(dir_fd)

    @staticmethod
    def _load(dir_fd: int, key: str, symbol: str):
        library = _read_entry(dir_fd, f"{key}.so")
        checksum = _read_entry(dir_fd, f"{key}.sha256")
        if library is None or checksum is None or hashlib.sha256(library).hexdigest() != checksum.decode().strip():
            return None
        try:
            return load_bytes(library, symbol)
        except OSError:
            return None  # linked against runtimes that are not where they were (a moved environment): relink

    def _build_and_load(self, spec: KernelSpec, build, dir_fd: int | None, key: str):
        """Compile and link in a private temporary directory, publish into the cache when
        ``dir_fd`` is given, and load the bytes just built."""
        where = f"kept in {cache_dir()}" if dir_fd is not None else "for this process only"
        print(f"grouped: compiling kernel {spec.name} for {spec.arch} (first use, a few seconds; {where})",
              file=sys.stderr, flush=True)
        compiled = _compile(build)
        with tempfile.TemporaryDirectory(prefix="grouped-kernel-") as tmp:  # 0700, the user's own
            obj, so = Path(tmp) / "kernel.o", Path(tmp) / "kernel.so"
            compiled.export_to_c(str(obj), function_name=spec.symbol)
            _link(obj, so)
            library = so.read_bytes()
        self.compiles += 1
        if dir_fd is not None:
            _write_entry(dir_fd, f"{key}.so", library)
            _write_entry(dir_fd, f"{key}.sha256", hashlib.sha256(library).hexdigest().encode())
        return load_bytes(library, spec.symbol)

    def clear_memory(self) -> None:
        """Forget in-process kernels (the disk cache stays)."""
        self._functions.clear()


def _compile(build):
    try:
        return build()
    except ImportError as e:
        raise KernelUnavailable(
            f"the CuTe DSL toolchain cannot be imported ({e}): pip install nvidia-cutlass-dsl") from e


def _link(obj: Path, so: Path) -> None:
    """Link an exported object into a shared library against the CuTe DSL and TVM-FFI runtimes."""
    from cutlass.runtime import find_runtime_libraries

    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise KernelUnavailable(
            f"linking a compiled kernel needs a C compiler: {compiler!r} was not found "
            "(install gcc or clang, or set CC to one)"
        )
    args = [compiler, "-shared", "-o", str(so), str(obj)]
    for lib in find_runtime_libraries(enable_tvm_ffi=True):
        lib = Path(lib)
        args += [f"-L{lib.parent}", f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode:
        raise KernelUnavailable(f"linking the compiled kernel failed ({' '.join(args)}):\n{result.stderr}")


def status() -> str:
    """One line on where kernels are kept and whether they can be built, for ``python -m grouped info``."""
    path = cache_dir()
    try:
        fd = open_private_dir(path, create=False)
    except FileNotFoundError:
        where = f"{path} (created on first use)"
    except OSError as e:
        where = f"{path} cannot be used ({e}); kernels are compiled for each process only"
    else:
        writable = os.access(".", os.W_OK, dir_fd=fd)
        os.close(fd)
        where = f"{path}" + ("" if writable else " (read-only: only the kernels already in it load)")
    compiler = os.environ.get("CC", "cc")
    builds = f"C compiler {compiler!r} found" if shutil.which(compiler) else (
        f"no C compiler {compiler!r}: kernels missing from the cache cannot be built (install gcc or set CC)")
    return f"kernel cache {where}; {builds}"


CACHE = KernelCache()
