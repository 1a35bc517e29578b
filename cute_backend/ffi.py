"""Call a compiled kernel library through its TVM-FFI C entry point, with ctypes.

A library that ``cute.compile(..., options="--enable-tvm-ffi")`` exported holds
``__tvm_ffi_<symbol>``, a C function of TVM-FFI's safe-call convention::

    int f(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result)

It checks every argument (type, dtype, rank, alignment, the sizes and strides
it was compiled against) and launches the kernel. ``tvm_ffi.load_module`` is
the usual way in, but importing tvm_ffi's Python package costs 15 ms to 200 ms
in a fresh process (its Cython core, CUDA bindings, and for a torch without a
native DLPack exchange API the torch addon it loads), more than a first call
may take. So a warm process dlopens the library (its runtimes, the CuTe DSL
runtime and libtvm_ffi, are found by the library's rpath) and packs the
arguments itself, one ``struct.pack_into`` a call, in the layouts of
``tvm/ffi/c_api.h`` and ``dlpack.h``:

- ``TVMFFIAny``, 16 bytes: int32 type index, uint32 zero, an 8-byte value
  (int64 for kTVMFFIInt = 1, fp64 for kTVMFFIFloat = 3, a ``DLTensor*`` for
  kTVMFFIDLTensorPtr = 7);
- ``DLTensor``, 48 bytes: data pointer, device (int32 type: kDLCPU 1,
  kDLCUDA 2; int32 id), int32 ndim, dtype (uint8 code, uint8 bits, uint16
  lanes), int64* shape, int64* strides (in elements), uint64 byte offset.

An error raised in the library (a CUDA error, an argument it refuses) comes
back as a TVM-FFI error object; its kind and message become the RuntimeError.
"""

from __future__ import annotations

import ctypes
import struct
import threading

import torch

K_INT, K_FLOAT, K_DLTENSOR_PTR = 1, 3, 7
KDL_CPU, KDL_CUDA = 1, 2
# DLPack (code, bits, lanes) of the dtypes the kernels take: kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4
DLPACK_DTYPE = {
    torch.bfloat16: (4, 16, 1),
    torch.float32: (2, 32, 1),
    torch.int32: (0, 32, 1),
    torch.int64: (0, 64, 1),
    torch.uint8: (1, 8, 1),
}
ANY, ANY_FLOAT = "iIq", "iId"  # TVMFFIAny holding an int64 or pointer / an fp64
DLTENSOR = "QiiiBBHQQQ"
DLTENSOR_BYTES = 48
OBJECT_HEADER_BYTES = 24  # sizeof(TVMFFIObject): an error's cell follows it


class _Block(threading.local):
    """This thread's argument block: the TVMFFIAny array, then each tensor's DLTensor followed by
    its shape and strides, then the result. Reused call after call: the library reads it only
    during the call (kernel parameters are copied at launch)."""

    def __init__(self):
        self.resize(4096)

    def resize(self, size: int) -> None:
        self.buffer = ctypes.create_string_buffer(size)
        self.base = ctypes.addressof(self.buffer)


_BLOCK = _Block()


def _format(signature: tuple[int, ...]) -> str:
    """struct format of a block for a signature: each argument's rank, or -1 an int, -2 a float."""
    anys = "".join(ANY_FLOAT if r == -2 else ANY for r in signature)
    return "<" + anys + "".join(DLTENSOR + "q" * 2 * r for r in signature if r >= 0) + ANY


class LibraryFunction:
    """``__tvm_ffi_<symbol>`` of the shared library at ``path``, called with torch tensors and
    Python ints / floats (a stream as its handle, an int)."""

    def __init__(self, path: str, symbol: str):
        self._library = ctypes.CDLL(path)  # OSError where it or its runtimes do not load
        function = self._library[f"__tvm_ffi_{symbol}"]
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p]
        function.restype = ctypes.c_int
        self._function = function
        self._symbol = symbol
        self._formats: dict[tuple[int, ...], str] = {}

    def __call__(self, *args) -> None:
        block = _BLOCK
        n = len(args)
        at = block.base + 16 * n  # where the next tensor's DLTensor goes
        anys, tensors, signature = [], [], []
        for a in args:
            kind = type(a)
            if kind is int:
                anys += (K_INT, 0, a)
                signature.append(-1)
            elif isinstance(a, torch.Tensor):
                dtype = DLPACK_DTYPE.get(a.dtype)
                if dtype is None:
                    raise TypeError(f"{self._symbol}: no DLPack code for tensor dtype {a.dtype}")
                rank = a.dim()
                dims = at + DLTENSOR_BYTES
                anys += (K_DLTENSOR_PTR, 0, at)
                # device id as torch gives it (-1 on the CPU, where the kernels refuse the device type)
                tensors += (a.data_ptr(), KDL_CUDA if a.is_cuda else KDL_CPU, a.get_device(), rank, *dtype,
                            dims, dims + 8 * rank, 0, *a.shape, *a.stride())
                signature.append(rank)
                at = dims + 16 * rank
            elif kind is float:
                anys += (K_FLOAT, 0, a)
                signature.append(-2)
            else:
                raise TypeError(f"{self._symbol}: arguments are tensors, ints and floats, got {kind.__name__}")
        result = at
        if result + 16 > block.base + len(block.buffer):  # more than the block holds: grow it, pack again
            block.resize(2 * (result + 16 - block.base))
            return self(*args)
        key = tuple(signature)
        fmt = self._formats.get(key) or self._formats.setdefault(key, _format(key))
        struct.pack_into(fmt, block.buffer, 0, *anys, *tensors, 0, 0, 0)  # the result starts as kTVMFFINone
        if self._function(None, block.base, n, result):
            raise RuntimeError(f"{self._symbol}: {_raised_error(self._library)}")


def _raised_error(library: ctypes.CDLL) -> str:
    """Take the error the library raised (thread-local in libtvm_ffi): "kind: message"."""
    handle = ctypes.c_void_p()
    library.TVMFFIErrorMoveFromRaised(ctypes.byref(handle))
    if not handle.value:
        return "failed without an error message"
    try:
        kind_ptr, kind_len, message_ptr, message_len = struct.unpack(
            "<QQQQ", ctypes.string_at(handle.value + OBJECT_HEADER_BYTES, 32))
        kind = ctypes.string_at(kind_ptr, kind_len).decode(errors="replace")
        message = ctypes.string_at(message_ptr, message_len).decode(errors="replace")
        return f"{kind}: {message}"
    finally:
        library.TVMFFIObjectDecRef(handle)
