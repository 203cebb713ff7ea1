"""Measure a real random-weight ParScale model on this CPU and set it beside the prediction.

What is measured, per (P, batch):
- memory = bytes of the weight tensors (and the small rotary buffers) + bytes of the KV cache after the last decode step
  (read from the cache object) + the transient peak of the prefill, which is the peak of
  live tensor bytes during the prefill (torch profiler memory timeline) minus the weights
  and the cache that the prefill leaves behind. This is tensor memory, not process RSS:
  the interpreter, the libraries and allocator slack are not the model's cost.
- decode latency = the fastest wall time of one decode step (steps after the first; the
  median is reported too). Other processes can only add time, so the fastest step is the
  least disturbed one, and `cpu-local`'s rates are best-of-N timings as well.
The prediction is `parscale.cost.roofline.estimate` for the same shape in float32 on `cpu-local`,
with the prefixes stored once (`prefix_storage="shared"`), which is what `parscale.model.wrapper`
does: the cache holds P*B rows of real tokens and attention prepends the shared prefix.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

from parscale.cost.roofline import ModelShape, Workload, estimate
from parscale.cost.hardware import Hardware



@dataclass(frozen=True)
class MeasureConfig:
    """A random-weight Qwen2 built in-process (nothing is downloaded)."""

    hidden: int = 1024
    intermediate: int = 2816
    layers: int = 12
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 32000
    input_length: int = 32
    output_length: int = 16
    seed: int = 0
    kv_traffic: str = "llm-analysis"

    def shape(self) -> ModelShape:
        return ModelShape(layers=self.layers, hidden=self.hidden, intermediate=self.intermediate, heads=self.heads,
                          kv_heads=self.kv_heads, vocab=self.vocab, tied_embeddings=True)

    def __post_init__(self) -> None:
        self.shape()  # validates the sizes with the cost model's own messages
        Workload(input_length=self.input_length, output_length=max(self.output_length, 1), kv_traffic=self.kv_traffic)
        if self.output_length < 2:
            from parscale.errors import UserError

            raise UserError("output length must be >= 2 to time a decode step after the first")


def build_model(cfg: MeasureConfig, n_streams: int) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    config = Qwen2Config(
        hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, vocab_size=cfg.vocab,
        tie_word_embeddings=True, max_position_embeddings=4096,
    )
    model = Qwen2ForCausalLM(config).eval()
    if n_streams > 1:
        from parscale.model.config import ParScaleConfig
        from parscale.model.wrapper import to_parscale

        model = to_parscale(model, ParScaleConfig(n_streams=n_streams), seed=cfg.seed).eval()
    return model


def tensor_bytes(tensors: Any) -> int:
    """Bytes of distinct storages (tied weights and views counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def cache_bytes(cache: Any, held: bool = False) -> int:
    """Bytes of the cached tokens' keys and values; `held`: of the memory the cache holds, which
    on CPU includes the room its layers keep for the next tokens (`model.kv_cache`)."""
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    return tensor_bytes(tensors) if held else sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines (written straight to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _prefill_peak(model: Any, ids: Any) -> tuple[Any, int]:
    """Run the prefill under the profiler; the peak live tensor bytes on the CPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline  # no public API for CPU peaks

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        out = model(ids, use_cache=True)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return out, int(max(sum(row) for row in sizes))


@dataclass
class DecodeRun:
    """One greedy `generate` call, timed step by step."""

    prefill_s: float  # from the call to the first token's logits (the prompt's forward)
    step_s: list[float]  # one decode step each: forward, logits processing, cache update
    step_cpu_s: list[float]  # the CPU time of this process in each step (all its threads)
    sequences: Any
    cache: Any


def timed_generate(model: Any, ids: Any, new_tokens: int, attention_mask: Any = None) -> DecodeRun:
    """Greedy `model.generate` (the path users call) with a clock at every step's logits.

    The one measurement routine behind `parscale cost measure` and `benchmarks/decode.py`:
    a logits processor records the time each step's logits arrive, so the differences are
    whole decode steps as `generate` runs them, not a hand-written loop. With one thread on
    a machine shared with other work, the CPU time per step is the steadier number: it
    leaves out the time the process waited for a core.
    """
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from parscale.model.cache_api import output_cache

    class _Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())
            return scores

    clock = _Clock()
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                             return_dict_in_generate=True, pad_token_id=0)
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    cpu = [b - a for a, b in zip(clock.cpu, clock.cpu[1:])]
    return DecodeRun(prefill_s=clock.times[0] - start, step_s=steps, step_cpu_s=cpu, sequences=out.sequences,
                     cache=output_cache(out))


def decode_step_times(model: Any, cfg: MeasureConfig, batch: int = 1) -> list[float]:
    """Seconds per decode step of `timed_generate`, without the memory profiler (latency only)."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, cfg.vocab, (batch, cfg.input_length), generator=gen)
    return timed_generate(model, ids, cfg.output_length + 1).step_s


def measure_one(model: Any, cfg: MeasureConfig, batch: int) -> dict[str, float]:
    import torch

    from parscale.model.cache_api import cache_kwargs, output_cache

    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, cfg.vocab, (batch, cfg.input_length), generator=gen)
    weights = tensor_bytes(list(model.parameters()))
    buffers = tensor_bytes(list(model.buffers()))  # rotary frequencies: not weights, but memory
    with torch.no_grad():
        out, peak = _prefill_peak(model, ids)
        transient = max(0, peak - weights - buffers - cache_bytes(output_cache(out), held=True))
    del out
    # the prompt's forward gives the first token, then output_length decode steps, so the
    # cache ends with input + output tokens, as the predicted workload's does
    run = timed_generate(model, ids, cfg.output_length + 1)
    kv, held = cache_bytes(run.cache), cache_bytes(run.cache, held=True)
    return {"weights_bytes": weights, "buffers_bytes": buffers, "kv_cache_bytes": kv, "kv_room_bytes": held - kv,
            "activation_bytes": transient, "memory_bytes": weights + buffers + held + transient,
            "decode_step_s": statistics.median(run.step_s), "decode_step_min_s": min(run.step_s)}


def predict_one(cfg: MeasureConfig, n_streams: int, batch: int, hw: Hardware) -> dict[str, float]:
    # The measured run decodes output_length steps after the prefill, so the cache ends
    # with input + output tokens, as the model's workload does.
    work = Workload(n_streams=n_streams, batch_size=batch, input_length=cfg.input_length,
                    output_length=cfg.output_length, dtype_bytes=4, prefix_storage="shared", kv_traffic=cfg.kv_traffic)
    r = estimate(cfg.shape(), work, hw)
    return {"weights_bytes": r.weights, "kv_cache_bytes": r.kv_cache, "activation_bytes": r.activation,
            "memory_bytes": r.memory_bytes, "decode_step_s": r.decode_s / cfg.output_length}


def run_measurements(cfg: MeasureConfig, streams: list[int], batches: list[int], hw: Hardware,
                     paired: bool = False) -> list[dict[str, Any]]:
    """Every (P, batch): measured, predicted and the relative error of memory and decode latency.

    Run with the torch thread count that `hw` (cpu-local) was measured with. `paired`
    re-measures the CPU right before each configuration and predicts with that profile,
    so that both sides see the same load when other processes share the machine.
    """
    from parscale.cost.hardware import measured_cpu_profile

    from parscale.progress import progress

    rows = []
    bar = progress(total=len(streams) * len(batches), desc="cost measure", leave=False)
    for p in streams:
        model = build_model(cfg, p)
        for batch in batches:
            used = measured_cpu_profile() if paired else hw
            measured, predicted = measure_one(model, cfg, batch), predict_one(cfg, p, batch, used)
            row: dict[str, Any] = {"P": p, "batch_size": batch, "peak_flops": used.peak_flops,
                                   "bandwidth": used.bandwidth, "memory_efficiency": used.memory_efficiency}
            row.update({f"measured_{k}": v for k, v in measured.items()})
            row.update({f"predicted_{k}": v for k, v in predicted.items()})
            row["memory_error"] = predicted["memory_bytes"] / measured["memory_bytes"] - 1
            row["latency_error"] = predicted["decode_step_s"] / measured["decode_step_min_s"] - 1
            rows.append(row)
            bar.update()
        del model
    bar.close()
    return rows


def format_table(rows: list[dict[str, Any]], hw: Hardware) -> str:
    lines = [f"cpu-local: {hw.peak_flops / 1e9:.1f} GFLOP/s float32 matmul, {hw.bandwidth / 1e9:.1f} GB/s copy, "
             f"memory efficiency {hw.memory_efficiency:.2f} (matrix-vector streaming / copy)",
             f"{'P':>2} {'B':>2} {'mem meas MiB':>12} {'mem pred MiB':>12} {'err':>7} "
             f"{'step meas ms':>12} {'step pred ms':>12} {'err':>7}   (measured step: fastest)"]
    for r in rows:
        lines.append(
            f"{r['P']:>2} {r['batch_size']:>2} {r['measured_memory_bytes'] / 2**20:>12.1f} "
            f"{r['predicted_memory_bytes'] / 2**20:>12.1f} {100 * r['memory_error']:>+6.1f}% "
            f"{r['measured_decode_step_min_s'] * 1e3:>12.2f} {r['predicted_decode_step_s'] * 1e3:>12.2f} "
            f"{100 * r['latency_error']:>+6.1f}%")
    return "\n".join(lines)
