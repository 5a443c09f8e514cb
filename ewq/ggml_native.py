"""ggml's own C quantizer, through ctypes, where a llama.cpp whose rounding ewq.ggml_quants matches is installed.

ewq.ggml_quants emulates `ggml_quantize_chunk` in torch, bit for bit, so a sweep needs no llama.cpp. The C itself is
faster (one core, 2048x2048, with an importance per column, round trip: Q4_K 7.6 vs 2.3 M weights/s, IQ4_NL 3.9 vs
1.6, Q3_K 21 vs 3.5, IQ3_XXS 1.9 vs 0.2; Q8_0 alike; docs/RESULTS.md, "ggml's own quantizer in the sweep"), and the
rounding is most of a large model's sweep. So where the llama.cpp EWQ builds is present, its libggml-base rounds
instead, with the same results:

  * the library of llama-cpp-python LLAMA_CPP_PYTHON_VERSION (pip's, `llama_cpp/lib/`), or
  * the one bench/llamacpp.py builds for its tools (~/.cache/ewq/llama.cpp-VERSION/build/bin/), or
  * EWQ_GGML_LIB=/path/to/libggml-base.so (a llama.cpp you built; it must be that version's ggml);
  * EWQ_GGML_LIB=off: the torch emulation always (the test suite runs so, as CI has no llama.cpp).

Another version's ggml could round otherwise, so none is used (pip's llama-cpp-python of another version is
skipped). ctypes releases the GIL during the call: the sweep's two quantizing threads run in parallel.
tests/test_ggml_quants.py checks the library against the emulation, byte for byte, where one is found.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np

from ewq.common import EWQError
from ewq.ggml_types import LLAMA_CPP_PYTHON_VERSION, TOOLS_CACHE

LIB_NAMES = ("libggml-base.so", "libggml-base.dylib")


class _Traits(ctypes.Structure):  # ggml.h: struct ggml_type_traits
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class GgmlLibrary:
    """ggml_quantize_chunk (what llama-quantize calls per tensor) and the type's to_float, from one libggml-base."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.lib = ctypes.CDLL(str(self.path))
            self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            self.lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        except (OSError, AttributeError) as e:
            raise EWQError(f"{self.path} is not a loadable libggml-base ({e}); build llama.cpp or unset EWQ_GGML_LIB")
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]

    def quantize(self, x: np.ndarray, type_name: str, importance: np.ndarray | None = None) -> np.ndarray:
        """ggml's packed blocks of float32 x [rows, cols]: uint8 [rows, row bytes]."""
        qtype = gguf.GGMLQuantizationType[type_name]
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        out = np.empty((rows, cols // block * nbytes), dtype=np.uint8)
        imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        written = self.lib.ggml_quantize_chunk(qtype.value, x.ctypes.data, out.ctypes.data, 0, rows, cols,
                                               None if imp is None else imp.ctypes.data)
        if written != out.nbytes:
            raise EWQError(f"{self.path}: ggml_quantize_chunk wrote {written} bytes of {type_name}, expected "
                           f"{out.nbytes}; this is not the ggml EWQ was checked against")
        return out

    def dequantize(self, packed: np.ndarray, type_name: str, shape) -> np.ndarray:
        """float32 [shape] read back from packed blocks by ggml's to_float (dequantize_row_<type>)."""
        traits = self.lib.ggml_get_type_traits(gguf.GGMLQuantizationType[type_name].value).contents
        out = np.empty(shape, dtype=np.float32)
        packed = np.ascontiguousarray(packed)
        _TO_FLOAT(traits.to_float)(packed.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
        return out


def candidates() -> list:
    """Where a libggml-base of LLAMA_CPP_PYTHON_VERSION may be, in the order they are tried."""
    found = []
    try:
        if importlib.metadata.version("llama-cpp-python") == LLAMA_CPP_PYTHON_VERSION:
            spec = importlib.util.find_spec("llama_cpp")  # located, not imported: that would load libllama too
            if spec is not None and spec.origin:
                found += [Path(spec.origin).parent / "lib" / n for n in LIB_NAMES]
    except importlib.metadata.PackageNotFoundError:
        pass
    found += [Path(TOOLS_CACHE).expanduser() / "build" / "bin" / n for n in LIB_NAMES]
    return found


@lru_cache(maxsize=None)
def library() -> GgmlLibrary | None:
    """The libggml-base that rounds instead of the emulation, or None (see the module doc): EWQ_GGML_LIB first."""
    chosen = os.environ.get("EWQ_GGML_LIB", "").strip()
    if chosen.lower() in ("off", "0", "none", "emulate"):
        return None
    if chosen:
        if not Path(chosen).is_file():
            raise EWQError(f"EWQ_GGML_LIB={chosen}: no such file; give a libggml-base.so, or off for the emulation")
        return GgmlLibrary(chosen)
    for path in candidates():
        if path.is_file():
            try:
                return GgmlLibrary(path)
            except EWQError:
                continue  # a broken build is skipped: the emulation gives the same results
    return None


def describe() -> str:
    """Which rounding a sweep or an export used, for the plan and the lines printed."""
    lib = library()
    return f"ggml's C quantizer ({lib.path})" if lib else "ewq.ggml_quants (torch emulation of ggml)"
