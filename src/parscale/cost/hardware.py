"""Hardware profiles for the cost model: built-ins, user JSON files and `cpu-local`.

The built-ins are datasheet numbers (dense fp16/bf16 tensor-core peak, HBM bandwidth)
with the efficiencies llm-analysis recommends (0.7 of peak FLOP/s, 0.9 of bandwidth),
which the paper's cost script uses. `cpu-local` is measured on the spot by a short
micro-benchmark (copy bandwidth, float32 matmul rate); since those are already achieved
rates, its FLOP/s efficiency is 1 and its memory efficiency is the fraction of the copy
bandwidth that a float32 matrix-vector product reaches; it also carries the fixed time an
eager decoder layer takes on this CPU, which no GPU profile needs at these sizes. The measurement is cached as JSON so it runs once.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from parscale.atomic import atomic_write_json
from parscale.cache import cache_dir as parscale_cache_dir
from parscale.errors import UserError

log = logging.getLogger(__name__)
GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """Peak rates, the fractions of them reached in practice, and the memory capacity."""

    name: str
    peak_flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    memory_bytes: float
    flops_efficiency: float = 0.7
    memory_efficiency: float = 0.9
    layer_overhead_s: float = 0.0  # fixed time per decoder layer and forward (eager CPU runs)
    gemm_efficiency: tuple[tuple[float, float], ...] = ()  # (rows, fraction of roofline) measured

    def gemm_factor(self, rows: float) -> float:
        """Fraction of the roofline a matmul with `rows` rows reaches (1 without a curve).

        Interpolated in log2(rows) and clamped at the measured ends.
        """
        if not self.gemm_efficiency:
            return 1.0
        xs = [math.log2(r) for r, _ in self.gemm_efficiency]
        ys = [e for _, e in self.gemm_efficiency]
        return float(np.interp(math.log2(max(rows, 1)), xs, ys))

    def __post_init__(self) -> None:
        for name in ("peak_flops", "bandwidth", "memory_bytes"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise UserError(f"hardware {self.name!r}: {name} must be a positive number, got {value!r}")
        if not isinstance(self.layer_overhead_s, (int, float)) or self.layer_overhead_s < 0:
            raise UserError(f"hardware {self.name!r}: layer_overhead_s must be >= 0, got {self.layer_overhead_s!r}")
        for name in ("flops_efficiency", "memory_efficiency"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise UserError(f"hardware {self.name!r}: {name} must be in (0, 1], got {value!r}")

    def with_efficiencies(self, flops: float | None, memory: float | None) -> "Hardware":
        """A copy with the efficiencies overridden where given."""
        data = asdict(self)
        if flops is not None:
            data["flops_efficiency"] = flops
        if memory is not None:
            data["memory_efficiency"] = memory
        return Hardware(**data)


BUILTIN: dict[str, Hardware] = {
    "a100-80gb": Hardware("a100-80gb", 312e12, 2039 * GB, 80 * 2**30),
    "h100-sxm": Hardware("h100-sxm", 989e12, 3350 * GB, 80 * 2**30),
    "h200": Hardware("h200", 989e12, 4800 * GB, 141 * 2**30),
}
# The names the authors' script (llm-analysis) uses for the same parts.
ALIASES = {"a100-sxm-80gb": "a100-80gb", "h100-sxm-80gb": "h100-sxm", "h200-sxm-141gb": "h200"}


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data)


def _best_seconds(fn: Any, repeats: int, clock: Any = time.perf_counter) -> float:
    fn()  # warm-up: first-touch page faults and kernel selection are not the rate
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def copy_bandwidth(size_mb: int = 256, repeats: int = 5, clock: Any = time.perf_counter) -> float:
    """Bytes read + written per second by torch's copy of `size_mb` MiB (more than any cache).

    `clock=time.process_time` leaves out the time the process waited for a core (one thread).
    """
    import torch

    numel = size_mb * 2**20 // 4
    src, dst = torch.ones(numel), torch.empty(numel)
    return 2 * numel * 4 / _best_seconds(lambda: dst.copy_(src), repeats, clock)


def read_bandwidth(size_mb: int = 256, repeats: int = 5, clock: Any = time.perf_counter) -> float:
    """Bytes read per second by torch's sum of `size_mb` MiB of float32 (more than any cache).

    A decode step reads and hardly writes, so its floor is the bytes over this rate as much as
    over the copy's read + write rate; the two need not agree (on an AMD EPYC of Zen 5 whose
    memory is shared, 51-89 against 47-83 GB/s within one run), so benchmarks/decode.py reports
    both.
    """
    import torch

    numel = size_mb * 2**20 // 4
    src = torch.ones(numel)
    return numel * 4 / _best_seconds(lambda: src.sum(), repeats, clock)


def measure_cpu(size_mb: int = 256, matmul_n: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Copy bandwidth (read + write bytes / s), float32 matmul rate (2n^3 / s), and the
    rate at which a matrix-vector product streams its matrix (bytes / s).

    Decode steps are matrix-vector products, and on CPUs these stream weights well below
    the copy bandwidth; that fraction becomes the profile's memory efficiency.
    Uses torch, so the rates are those that torch's own kernels reach on this machine.
    """
    import torch

    bandwidth = copy_bandwidth(size_mb, repeats)
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    mm_s = _best_seconds(lambda: torch.mm(a, b), repeats)
    rows = size_mb * 2**20 // 4 // 4096
    matrix, vector = torch.randn(rows, 4096), torch.randn(1, 4096)
    gemv_s = _best_seconds(lambda: torch.nn.functional.linear(vector, matrix), repeats)
    del matrix
    return {
        "bandwidth": bandwidth,
        "peak_flops": 2 * matmul_n**3 / mm_s,
        "gemv_bandwidth": rows * 4096 * 4 / gemv_s,
        "layer_overhead_s": measure_layer_overhead(repeats),
        "gemm_efficiency": measure_gemm_curve(2 * matmul_n**3 / mm_s, rows * 4096 * 4 / gemv_s),
        "threads": torch.get_num_threads(),
    }


def measure_gemm_curve(peak_flops: float, stream_bandwidth: float, repeats: int = 3) -> list[list[float]]:
    """How close a float32 linear layer with M rows gets to its roofline, M = 1 .. 128.

    CPU BLAS runs matmuls with a few rows far below both the streaming rate (1 row) and the
    square-matmul rate (many rows), which is exactly the regime of decode steps with P*B
    rows; a plain two-number roofline cannot express that, so the profile carries the curve.
    Measured over 24 weights of 1024 x 2816 (276 MB, more than any cache), one pass each.
    """
    import torch

    k, n = 1024, 2816
    weights = [torch.randn(n, k) for _ in range(24)]
    curve = []
    for rows in (1, 2, 4, 8, 16, 32, 64, 128):
        x = torch.randn(rows, k)
        seconds = _best_seconds(lambda: [torch.nn.functional.linear(x, w) for w in weights], repeats)
        roofline = len(weights) * max(2 * rows * k * n / peak_flops, (k * n + rows * (k + n)) * 4 / stream_bandwidth)
        curve.append([rows, min(1.0, roofline / seconds)])
    return curve


def measure_layer_overhead(repeats: int = 5, small: int = 2, large: int = 6) -> float:
    """Fixed cost of one eager decoder layer (module calls, dispatch, cache bookkeeping).

    A decode step of a tiny Qwen2 (hidden 64, so the arithmetic is negligible) with
    `large` layers minus one with `small` layers, per layer: what every layer costs on
    top of its FLOPs and bytes in eager PyTorch on this CPU.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from parscale.model.cache_api import cache_kwargs, output_cache

    def step_seconds(layers: int) -> float:
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
        ids = torch.zeros(1, 8, dtype=torch.long)
        with torch.no_grad():
            cache = output_cache(model(ids, use_cache=True))

            def step() -> None:
                model(ids[:, :1], use_cache=True, **cache_kwargs(model, cache))
                cache.crop(-1)  # drop the new token: the cache length stays fixed

            return _best_seconds(step, 4 * repeats)

    return max(0.0, (step_seconds(large) - step_seconds(small)) / (large - small))


def _fingerprint() -> dict[str, Any]:
    import torch

    return {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def cpu_local(cache_dir: Path | None = None, refresh: bool = False) -> Hardware:
    """The measured profile of this CPU, cached (keyed by CPU count and torch threads)."""
    path = (cache_dir or parscale_cache_dir()) / "hardware-cpu-local.json"
    fingerprint = _fingerprint()
    if path.is_file() and not refresh:
        try:
            data = json.loads(path.read_text())
            if data.get("fingerprint") == fingerprint:
                return _cpu_profile(data)
        except (OSError, ValueError):
            log.info("ignoring unreadable cache %s", path)
    log.info("measuring cpu-local (copy bandwidth, float32 matmul rate)...")
    data = {**measure_cpu(), "fingerprint": fingerprint}
    _atomic_json(path, data)
    return _cpu_profile(data)


def measured_cpu_profile() -> Hardware:
    """Measure `cpu-local` now, without the cache (for runs that pair each measurement
    with a fresh profile because other processes share the CPU)."""
    return _cpu_profile(measure_cpu())


def _cpu_profile(data: dict[str, Any]) -> Hardware:
    try:
        import psutil  # optional; only for the capacity shown in reports

        capacity = float(psutil.virtual_memory().total)
    except ImportError:
        capacity = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    bandwidth = float(data["bandwidth"])
    memory_efficiency = min(1.0, float(data.get("gemv_bandwidth", bandwidth)) / bandwidth)
    curve = tuple((float(r), float(e)) for r, e in data.get("gemm_efficiency", []))
    return Hardware("cpu-local", float(data["peak_flops"]), bandwidth, capacity, 1.0, memory_efficiency,
                    float(data.get("layer_overhead_s", 0.0)), curve)


def load_profile_file(path: Path) -> Hardware:
    """A user profile: JSON with `peak_tflops`, `bandwidth_gbs`, `memory_gib`, and
    optionally `name`, `flops_efficiency`, `memory_efficiency`, `layer_overhead_s`."""
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"hardware profile {path}: not valid JSON ({err})") from err
    need = ("peak_tflops", "bandwidth_gbs", "memory_gib")
    missing = [k for k in need if k not in data]
    if not isinstance(data, dict) or missing:
        raise UserError(f"hardware profile {path}: missing key(s) {missing}; it needs {list(need)}")
    allowed = set(need) | {"name", "flops_efficiency", "memory_efficiency", "layer_overhead_s"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UserError(f"hardware profile {path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        return Hardware(
            name=str(data.get("name", path.stem)),
            peak_flops=float(data["peak_tflops"]) * 1e12,
            bandwidth=float(data["bandwidth_gbs"]) * GB,
            memory_bytes=float(data["memory_gib"]) * 2**30,
            flops_efficiency=float(data.get("flops_efficiency", 0.7)),
            memory_efficiency=float(data.get("memory_efficiency", 0.9)),
            layer_overhead_s=float(data.get("layer_overhead_s", 0.0)),
        )
    except (TypeError, ValueError) as err:
        raise UserError(f"hardware profile {path}: values must be numbers ({err})") from err


def resolve(name: str, cache_dir: Path | None = None) -> Hardware:
    """A built-in name, `cpu-local`, or the path of a JSON profile."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in BUILTIN:
        return BUILTIN[key]
    if key == "cpu-local":
        return cpu_local(cache_dir)
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"hardware profile file {name} does not exist")
        return load_profile_file(path)
    choices = ", ".join([*BUILTIN, "cpu-local", "FILE.json"])
    raise UserError(f"unknown hardware profile {name!r}; choose one of: {choices}")


def profile_dict(hw: Hardware) -> dict[str, Any]:
    return {f.name: getattr(hw, f.name) for f in fields(hw)}
