"""The instruction paths the tests build each C++ kernel for: -march=native (AVX-512 where the
CPU has it), AVX2/FMA without AVX-512, and plain C++. A kernel's tests run on all three, so a
path the default build does not take on this machine is still checked here."""
from __future__ import annotations

import pytest

ISA_FLAGS = {"native": (), "avx2": ("-mno-avx512f",), "generic": ("-mno-avx512f", "-mno-avx2", "-mno-fma")}


def build_or_skip(library, isa: str, what: str):
    """`library(flags)` for the instruction path `isa`, or a skip where it cannot be built."""
    built = library(ISA_FLAGS[isa])
    if built is None:
        pytest.skip(f"no C++ compiler: the {what} cannot be built here")
    return built
