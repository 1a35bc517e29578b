"""The environment variables the library reads: one table, read at call time.

Values are read on every call (so tests and launch scripts can set them at
any moment) and checked: a bad value raises ValueError listing the allowed ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

BACKEND_NAMES = ("reference", "cublas", "torch", "cute", "cudnn")
_BACKEND_CHOICES = ("auto", *BACKEND_NAMES)
_FLAG_CHOICES = ("0", "1")


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    choices: tuple[str, ...] | None  # None: free text (a path)
    doc: str


ENV_VARS: dict[str, EnvVar] = {
    v.name: v
    for v in (
        EnvVar("GROUPED_BACKEND", "auto", _BACKEND_CHOICES, "backend for every format"),
        EnvVar("GROUPED_BACKEND_BF16", "", _BACKEND_CHOICES, "backend for BF16; wins over GROUPED_BACKEND"),
        EnvVar("GROUPED_BACKEND_MXFP8", "", _BACKEND_CHOICES, "backend for MXFP8; wins over GROUPED_BACKEND"),
        EnvVar("GROUPED_BACKEND_NVFP4", "", _BACKEND_CHOICES, "backend for NVFP4; wins over GROUPED_BACKEND"),
        EnvVar("GROUPED_STRICT", "0", _FLAG_CHOICES,
               "1: a forced backend that cannot serve, or kernels that cannot be built, raise instead of falling back"),
        EnvVar("GROUPED_LOG", "0", _FLAG_CHOICES, "1: log each new (problem kind -> backend, reason) decision once"),
        EnvVar("GROUPED_CACHE_DIR", "", None, "where compiled CuTe DSL kernels are kept (default: the user cache dir)"),
    )
}


def read(name: str) -> str:
    """The variable's value (its default when unset or empty), checked against its choices."""
    var = ENV_VARS[name]
    value = os.environ.get(name, "").strip()
    if not value:
        return var.default
    if var.choices is not None:
        value = value.lower()
        if value not in var.choices:
            raise ValueError(f"{name}={os.environ[name]!r} is not allowed; use one of {', '.join(var.choices)}")
    return value


def forced_backend(fmt_name: str) -> str | None:
    """The backend the environment forces for a format, or None for automatic choice."""
    value = read(f"GROUPED_BACKEND_{fmt_name.upper()}") or read("GROUPED_BACKEND")
    return None if value == "auto" else value


_SELECTION_VARS = ("GROUPED_BACKEND", "GROUPED_BACKEND_BF16", "GROUPED_BACKEND_MXFP8",
                   "GROUPED_BACKEND_NVFP4", "GROUPED_STRICT", "GROUPED_LOG")
_parsed: dict[tuple, dict] = {}
# os.environ.get costs ~1 us a variable (key encoding, KeyError for unset ones); on
# CPython the raw mapping behind it answers in ~50 ns. Same values, read at call time.
_RAW_ENVIRON = getattr(os.environ, "_data", None)
_RAW_KEYS = tuple(os.environ.encodekey(n) for n in _SELECTION_VARS) if _RAW_ENVIRON is not None else ()


def _raw_selection_values() -> tuple:
    if _RAW_ENVIRON is not None:
        return tuple(_RAW_ENVIRON.get(k) for k in _RAW_KEYS)
    return tuple(os.environ.get(name) for name in _SELECTION_VARS)


def selection_settings() -> dict:
    """{"forced": {fmt: backend or None}, "strict": bool, "log": bool} from the environment.

    Read on every call (a few dict lookups); parsed and checked once per distinct
    set of raw values, which keeps the GEMM's host overhead low.
    """
    raw = _raw_selection_values()
    settings = _parsed.get(raw)
    if settings is None:
        settings = {
            "forced": {fmt: forced_backend(fmt) for fmt in ("bf16", "mxfp8", "nvfp4")},
            "strict": flag("GROUPED_STRICT"),
            "log": flag("GROUPED_LOG"),
        }
        _parsed[raw] = settings
    return settings


def flag(name: str) -> bool:
    return read(name) == "1"
