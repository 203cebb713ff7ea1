"""The instruction paths the tests build each C++ kernel for: -march=native (AVX-512 where the
CPU has it), AVX2/FMA without AVX-512, and plain C++. A kernel's tests run on all three, so a
path the default build does not take on this machine is still checked here."""
from __future__ import annotations

import os
import shutil

import pytest

ISA_FLAGS = {"native": (), "avx2": ("-mno-avx512f",), "generic": ("-mno-avx512f", "-mno-avx2", "-mno-fma")}


def compiler_present() -> bool:
    """A C++ compiler for torch's extension builder (`c++`, or $CXX) is on PATH."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def require_kernel(built, what: str):
    """`built`, a kernel library, or a skip where it is None for want of a C++ compiler. Where a
    compiler is present, None fails the test: the kernels then fall back to the stock path with
    a warning, and a skip would hide a source that no longer compiles."""
    if built is None:
        if compiler_present():
            pytest.fail(f"the {what} did not build although a C++ compiler is present (the warning above names the error)")
        pytest.skip(f"no C++ compiler: the {what} cannot be built here")
    return built


def build_or_skip(library, isa: str, what: str, flags: tuple[str, ...] | None = None):
    """`library(flags)` for the instruction path `isa` (`require_kernel` says when it skips)."""
    return require_kernel(library(ISA_FLAGS[isa] if flags is None else flags), f"{what} ({isa} path)")
