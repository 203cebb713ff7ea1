"""The machine a number was measured on: the CPU (name, cores, vector extensions, load), the GPU,
the torch and Python versions.

The same decode step runs several times faster on a Xeon with AVX-512 and AMX than on an EPYC
with AVX2 only, so a time without its CPU says little: every benchmark result and the demo's
report name it, all through `describe()`. One reader of /proc/cpuinfo for all of them, so that
they name the CPU alike. Standard library only at import (torch inside `gpu_info` and
`describe`), so importing it costs nothing to the light commands.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
# The vector extensions that change the speed of the kernels: x86's AVX family, FMA and AMX,
# Arm's Advanced SIMD and SVE (a Linux on Arm lists them under "Features").
VECTOR_PREFIXES = ("avx", "fma", "amx", "asimd", "sve")


def _fields(text: str) -> dict[str, str]:
    """The first value of each key in /proc/cpuinfo: every processor block repeats the first."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _family(flags: list[str], prefix: str) -> list[str]:
    """The members of a flag family without the prefix: avx512f, avx512_bf16 -> f, bf16."""
    return sorted(f[len(prefix):].lstrip("_") for f in flags if f.startswith(prefix))


def flag_summary(flags: list[str]) -> str:
    """One short phrase for the vector flags: `avx2 fma avx512[bf16,bw,f] amx[bf16,tile]`.

    The AVX-512 and AMX families are summarised (a Xeon lists a dozen avx512* flags); a CPU
    without AVX-512 says so, because that is the difference the numbers show."""
    parts = [f for f in ("avx2", "fma", "asimd", "sve", "sve2") if f in flags]
    for family in ("avx512", "amx"):
        members = _family(flags, family)
        if members:
            parts.append(f"{family}[{','.join(members)}]")
    if "avx512f" not in flags and any(f.startswith("avx") for f in flags):
        parts.append("no avx512")
    return " ".join(parts) or "no vector extensions listed"


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not every system keeps one (Windows)
        return None


def cpu_info(cpuinfo_text: str | None = None) -> dict[str, Any]:
    """The CPU's name, core count, vector flags and the 1-minute load average.

    `cpuinfo_text` is the text of /proc/cpuinfo (read when None). Without that file (macOS,
    Windows) the name is platform.processor()'s and no flags are known."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = CPUINFO.read_text()
        except OSError:
            cpuinfo_text = ""
    fields = _fields(cpuinfo_text)
    listed = (fields.get("flags") or fields.get("Features") or "").split()
    flags = sorted(f for f in listed if f.startswith(VECTOR_PREFIXES))
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    return {"name": name, "arch": platform.machine(), "cores": os.cpu_count(), "flags": flags,
            "summary": flag_summary(flags), "avx2": "avx2" in flags,
            "avx512": any(f.startswith("avx512") for f in flags), "amx": any(f.startswith("amx") for f in flags),
            "load_average": _load_average()}


def gpu_info(index: int = 0) -> dict[str, Any] | None:
    """The CUDA device torch sees (name, memory, compute capability), or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(index)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "count": torch.cuda.device_count()}


def describe() -> dict[str, Any]:
    """Everything a result needs to be read against: {"cpu", "gpu", "torch", "python"}."""
    try:
        import torch

        version = torch.__version__
    except ImportError:
        version = None
    return {"cpu": cpu_info(), "gpu": gpu_info(), "torch": version, "python": platform.python_version()}


def header(info: dict[str, Any] | None = None) -> str:
    """The line above a benchmark's table: `CPU: <name> (<flags>), N cores`, and the GPU if any.

    `info` is describe()'s result (or cpu_info()'s alone); None describes this machine now."""
    info = describe() if info is None else info
    cpu = info.get("cpu", info)
    line = f"CPU: {cpu['name']} ({cpu['summary']}), {cpu['cores']} cores"
    gpu = info.get("gpu")
    if gpu:
        line += f"; GPU: {gpu['name']} ({gpu['memory_gib']} GiB, compute capability {gpu['capability']})"
    return line
