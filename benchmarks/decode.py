"""Decode latency of P streams against the memory floor of this CPU, float32 and bfloat16.

    python benchmarks/decode.py [--threads 2] [--P 1,2,4,8] [--batch-size 1] [--reps 3]
                                [--new-tokens 32] [--layers 16] [--prefill-length 512] [--min-read 0]

Random-weight Qwen2-style models built in-process (hidden 1024, intermediate 2816, 16 heads,
4 KV heads, vocab 32000, untied), greedy `generate` from a 64-token prompt, timed step by step
by `parscale.cost.measure.timed_generate` (the routine `parscale cost measure` uses). Rows:
the plain transformers model (P = 1), our default path, and our stock path (the CPU decode
kernel switched off) for every P. The **floor** of a step is the bytes it must read (every
weight but the input embedding, the prefixes, the KV cache at the mean length) divided by
the copy bandwidth measured in the same run (on the same clock as the steps); the **read floor**
divides the same bytes by the rate at which torch's sum reads memory (`x read`), which need not
equal the copy's read + write rate. Repetitions are interleaved (each round runs
every row once) and every row reports the median over rounds with min and max, so a burst
of load from other processes moves all rows alike; ratios are taken from medians of one run.
Writes benchmarks/results/decode.json with the CPU's name and its AVX-512/AMX flags.
`--int8` adds rows with path `int8` at every P: the same model after `quantize_int8()` (int8
weights, activations in the row's dtype); their floor counts the int8 weight bytes. `--w8a8`
adds rows with path `int8a8`: `quantize_int8(activation_bits=8)`, the activations rounded to
int8 per row as well. `--min-read GB/S` waits before each round (up to 20 minutes) until the
read bandwidth is at least that: where the machine's memory is shared with other work, a round
timed while it is slow says little about the code.
"""
from __future__ import annotations

import argparse
import ctypes
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from _result import write_result  # benchmarks/_result.py

from parscale.machine import describe, header

RESULTS = Path(__file__).resolve().parent / "results" / "decode.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(layers: int, dtype: torch.dtype, streams: list[int], seed: int = 0, plain: bool = True) -> dict:
    """One random backbone per dtype; every variant is a copy of it (same weights)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from parscale import ParScaleConfig, to_parscale

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                         max_position_embeddings=4096)
    base = Qwen2ForCausalLM(config).to(dtype).eval()
    models = {"plain": copy.deepcopy(base)} if plain else {}
    for p in streams:
        models[f"P{p}"] = to_parscale(copy.deepcopy(base) if plain or len(streams) > 1 else base,
                                      ParScaleConfig(n_streams=p), seed=seed).eval()
    return models


def peak_rss_row(args: argparse.Namespace) -> int:
    """`--rss-row DTYPE,KEY,B`: this process builds one model and decodes once, then prints its
    peak RSS while decoding (VmHWM) and its RSS once the model was built, in bytes, as JSON. A process per
    configuration, because the timing process holds every model and its allocator keeps freed
    memory, so its own peak says nothing about one configuration."""
    dtype, key, batch = args.rss_row.split(",")
    from parscale.cost.measure import timed_generate

    base_key, _, int8 = key.partition("-")  # P8-int8, P8-int8a8
    streams = [] if base_key == "plain" else [int(base_key[1:])]
    model = build(args.layers, DTYPES[dtype], streams, plain=base_key == "plain")[base_key]
    if int8:
        model.quantize_int8(activation_bits=8 if int8 == "int8a8" else 16)
    # Hand freed heap pages back (the float32 build, the replaced weights): glibc keeps them otherwise,
    # and they would count against the configuration.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    built = _status_bytes("VmRSS")
    # Reset the peak (Linux's clear_refs "5"): building in float32 before a bfloat16 cast peaks
    # higher than decoding does, and that is not the configuration's cost.
    Path("/proc/self/clear_refs").write_text("5")
    ids = torch.randint(0, 32000, (int(batch), args.prompt), generator=torch.Generator().manual_seed(0))
    timed_generate(model, ids, args.new_tokens)
    print(json.dumps({"peak_rss": _status_bytes("VmHWM"), "built_rss": built}))
    return 0


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_peak_rss(args: argparse.Namespace, rows: list[tuple]) -> dict[tuple, dict]:
    """Peak RSS of each (dtype, model, batch) decoded alone, in a fresh process (Linux only)."""
    import subprocess

    if not Path("/proc/self/status").exists():
        return {}
    found = {}
    for dtype, key, batch in sorted({(r[0], r[1], r[4]) for r in rows if r[2] != "stock"}):
        cmd = [sys.executable, __file__, "--rss-row", f"{dtype},{key},{batch}", "--layers", str(args.layers),
               "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        found[(dtype, key, batch)] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def step_bytes(model, cache_bytes_per_token: float, mean_tokens: float) -> float:
    """Bytes one decode step must read: weights (not the input embedding: one row of it) + KV cache."""
    from parscale.model import quantize

    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += quantize.int8_bytes(model)  # int8 weights and scales are buffers, not parameters
    if not tied:
        weights -= embedding.numel() * embedding.element_size()
    return weights + cache_bytes_per_token * mean_tokens


def run_row(model, ids: torch.Tensor, new_tokens: int, clock: str) -> tuple[float, float]:
    """(median decode step in s, KV-cache bytes per cached token) of one greedy generate."""
    from parscale.cost.measure import cache_bytes, timed_generate

    run = timed_generate(model, ids, new_tokens)
    cached = ids.shape[1] + new_tokens - 1
    return statistics.median(run.step_cpu_s if clock == "cpu" else run.step_s), cache_bytes(run.cache) / cached


def wait_for_reads(least_gbs: float, patience_s: float = 1200.0) -> float:
    """The read bandwidth (bytes/s), measured until it is at least `least_gbs` GB/s or
    `patience_s` have passed (then the last measure)."""
    from parscale.cost.hardware import read_bandwidth

    deadline = time.monotonic() + patience_s
    while True:
        read = read_bandwidth(256, 3)
        if read >= least_gbs * 1e9 or time.monotonic() > deadline:
            return read
        time.sleep(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--P", default="1,2,4,8")
    parser.add_argument("--batch-size", default="1")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prefill-length", type=int, default=512, help="prefill timed at P = 1 (0: skip)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: CPU time per step (with --threads 1, steadier on a machine shared with other work)")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock-path rows")
    parser.add_argument("--int8", action="store_true", help="add rows for the weight-only int8 opt-in (quantize_int8)")
    parser.add_argument("--w8a8", action="store_true",
                        help="add rows for int8 weights and int8 activations (quantize_int8(activation_bits=8))")
    parser.add_argument("--min-read", type=float, default=0.0,
                        help="GB/s: wait before each round until the read bandwidth is at least this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-rss", action="store_true", help="skip the per-configuration peak RSS (a process each)")
    parser.add_argument("--rss-row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_row:
        return peak_rss_row(args)
    from parscale.cost.hardware import copy_bandwidth, read_bandwidth
    from parscale.cost.measure import timed_generate
    from parscale.model import kernels, norms, prefix_attention, quantize

    streams = [int(p) for p in args.P.split(",")]
    batches = [int(b) for b in args.batch_size.split(",")]
    models = {name: build(args.layers, DTYPES[name], streams) for name in args.dtype.split(",")}
    quantized = {"int8": 16} if args.int8 else {}  # path: the activations' bits
    quantized.update({"int8a8": 8} if args.w8a8 else {})
    impls = ["ours"] + ([] if args.no_stock else ["stock"]) + list(quantized)
    for variants in models.values():  # int8 copies of the same weights
        for impl, bits in quantized.items():
            for p in streams:
                variants[f"P{p}-{impl}"] = copy.deepcopy(variants[f"P{p}"]).quantize_int8(activation_bits=bits)
    rows = [(d, "plain", "plain", 1, b) for d in models for b in batches]
    rows += [(d, f"P{p}" + (f"-{impl}" if impl in quantized else ""), impl, p, b)
             for d in models for impl in impls for p in streams for b in batches]
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, 32000, (b, args.prompt), generator=gen) for b in batches}
    long_prompt = torch.randint(0, 32000, (1, args.prefill_length), generator=gen)
    times: dict[tuple, list[float]] = {row: [] for row in rows}
    per_token: dict[tuple, float] = {}
    prefill: dict[tuple, list[float]] = {}
    bandwidths, reads = [], []
    load_before, start = os.getloadavg(), time.perf_counter()
    built = {"matmul": kernels.library() is not None, "attention": prefix_attention.kernel_library() is not None,
             "norm": norms.library() is not None, **({"int8": quantize.library() is not None} if quantized else {})}
    print("kernels: " + ", ".join(f"{name} {'compiled' if ok else 'UNAVAILABLE (stock path)'}"
                                  for name, ok in built.items()), file=sys.stderr)
    for row in rows:  # warm-up: page faults, the kernel build, first-call dispatch
        dtype, key, impl, p, b = row
        if impl != "plain":
            models[dtype][key].use_fast_kernels(impl != "stock")
        timed_generate(models[dtype][key], prompts[b], 2)
    for rep in range(args.reps):
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        wait_for_reads(args.min_read)
        bandwidths.append(copy_bandwidth(256, 3, clock))
        reads.append(read_bandwidth(256, 3, clock))
        for row in rows:
            dtype, key, impl, p, b = row
            model = models[dtype][key]
            if impl != "plain":
                model.use_fast_kernels(impl != "stock")
            step, per_token[row] = run_row(model, prompts[b], args.new_tokens, args.clock)
            times[row].append(step)
            if args.prefill_length and p == 1 and b == batches[0] and impl != "stock":
                pre = timed_generate(model, long_prompt, 1).prefill_s
                prefill.setdefault((dtype, impl), []).append(pre)
        print(f"round {rep + 1}/{args.reps} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    bandwidth, read = statistics.median(bandwidths), statistics.median(reads)
    rss = {} if args.no_rss else measure_peak_rss(args, rows)  # after the timing: it must not disturb it
    mean_tokens = args.prompt + args.new_tokens / 2
    results = []
    for row in rows:
        dtype, key, impl, p, b = row
        med = statistics.median(times[row])
        nbytes = step_bytes(models[dtype][key], per_token[row], mean_tokens)
        floor = nbytes / bandwidth
        results.append({"dtype": dtype, "impl": impl, "P": p, "batch_size": b, "ms_per_token": med * 1e3,
                        "min_ms": min(times[row]) * 1e3, "max_ms": max(times[row]) * 1e3, "floor_ms": floor * 1e3,
                        "x_floor": med / floor, "read_floor_ms": nbytes / read * 1e3, "x_read_floor": med * read / nbytes,
                        "kv_bytes_per_token": per_token[row], "round_ms": [t * 1e3 for t in times[row]],
                        "peak_rss_bytes": rss.get((dtype, key, b), {}).get("peak_rss"),
                        "built_rss_bytes": rss.get((dtype, key, b), {}).get("built_rss")})
    base = {(r["dtype"], r["impl"], r["batch_size"]): r["ms_per_token"] for r in results if r["P"] == 1}
    for r in results:
        one = base.get((r["dtype"], r["impl"], r["batch_size"]))  # absent when --P leaves out 1
        r["x_P1"] = r["ms_per_token"] / one if one else None
    machine = describe()
    print(format_table(results, bandwidth, read, args, machine))
    goals = goal_lines(results, prefill)
    print("\n".join(goals))
    result = {"threads": args.threads, "clock": args.clock, "copy_bandwidth": bandwidth, "bandwidths": bandwidths,
              "read_bandwidth": read, "read_bandwidths": reads,
              "kernel": built["matmul"], "kernels": built, "layers": args.layers, "prompt": args.prompt,
              "new_tokens": args.new_tokens, "reps": args.reps, "rows": results,
              "prefill_ms": {f"{d}/{i}": [s * 1e3 for s in v] for (d, i), v in prefill.items()},
              "goals": goals, "timing_process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "seconds": time.perf_counter() - start}
    write_result(args.out, result, __file__, argv, machine)
    return 0


def format_table(results: list[dict], bandwidth: float, read: float, args: argparse.Namespace, machine: dict) -> str:
    lines = [header(machine),
             f"{args.threads} thread(s), copy bandwidth "
             f"{bandwidth / 1e9:.1f} GB/s (read + write), read bandwidth {read / 1e9:.1f} GB/s; {args.clock} clock; {args.layers} layers, prompt {args.prompt}, {args.new_tokens} new tokens, "
             f"median of {args.reps} interleaved rounds",
             f"{'dtype':<9} {'path':<6} {'P':>2} {'B':>2} {'ms/token':>9} {'min':>7} {'max':>7} {'floor':>7} "
             f"{'x floor':>7} {'x read':>6} {'x P=1':>6} {'KV B/tok':>9} {'peak RSS MB':>11}"]
    for r in results:
        lines.append(f"{r['dtype']:<9} {r['impl']:<6} {r['P']:>2} {r['batch_size']:>2} {r['ms_per_token']:>9.1f} "
                     f"{r['min_ms']:>7.1f} {r['max_ms']:>7.1f} {r['floor_ms']:>7.1f} {r['x_floor']:>7.2f} "
                     f"{r['x_read_floor']:>6.2f} "
                     f"{r['x_P1'] if r['x_P1'] is not None else float('nan'):>6.2f} {r['kv_bytes_per_token']:>9.0f} "
                     f"{r['peak_rss_bytes'] / 2**20 if r.get('peak_rss_bytes') else float('nan'):>11.0f}")
    return "\n".join(lines)


def goal_lines(results: list[dict], prefill: dict) -> list[str]:
    """The issue's batch-1 goals, from the medians of this run."""
    batch1 = {(r["dtype"], r["impl"], r["P"]): r for r in results if r["batch_size"] == 1}
    ms = {key: r["ms_per_token"] for key, r in batch1.items()}
    lines = []

    def over_floor(label: str, row: tuple, goal: float) -> None:
        if row in batch1:
            value, read = batch1[row]["x_floor"], batch1[row]["x_read_floor"]
            lines.append(f"{label}: {value:.2f} (goal <= {goal}) {'ok' if value <= goal else 'MISSED'}; "
                         f"x the read floor {read:.2f}")

    def ratio(label: str, num: tuple, den: tuple, goal: float) -> None:
        if num in ms and den in ms:
            value = ms[num] / ms[den]
            lines.append(f"{label}: {value:.2f} (goal <= {goal}) {'ok' if value <= goal else 'MISSED'}")

    for dtype in ("float32", "bfloat16"):
        ratio(f"{dtype} decode, stock-path P=1 / plain", (dtype, "stock", 1), (dtype, "plain", 1), 1.05)
        ratio(f"{dtype} decode, default P=1 / plain", (dtype, "ours", 1), (dtype, "plain", 1), 1.05)
        if (dtype, "ours") in prefill and (dtype, "plain") in prefill:
            value = statistics.median(prefill[(dtype, "ours")]) / statistics.median(prefill[(dtype, "plain")])
            lines.append(f"{dtype} prefill, P=1 / plain: {value:.2f} (goal <= 1.05) {'ok' if value <= 1.05 else 'MISSED'}")
    ratio("float32 P=4 / P=1", ("float32", "ours", 4), ("float32", "ours", 1), 1.3)
    ratio("float32 P=8 / P=1", ("float32", "ours", 8), ("float32", "ours", 1), 1.6)
    ratio("bfloat16 P=8 / P=1", ("bfloat16", "ours", 8), ("bfloat16", "ours", 1), 1.15)
    ratio("bfloat16 P=1 / float32 P=1", ("bfloat16", "ours", 1), ("float32", "ours", 1), 0.75)
    over_floor("bfloat16 P=1 / its floor", ("bfloat16", "ours", 1), 1.3)
    over_floor("bfloat16 P=8 / its floor", ("bfloat16", "ours", 8), 1.5)
    for path in ("int8", "int8a8"):
        for dtype in ("float32", "bfloat16"):
            ratio(f"{dtype} {path} P=8 / {path} P=1", (dtype, path, 8), (dtype, path, 1), 1.3)
        ratio(f"bfloat16 {path} P=1 / bfloat16 P=1", ("bfloat16", path, 1), ("bfloat16", "ours", 1), 0.6)
    return lines


if __name__ == "__main__":
    sys.exit(main())
