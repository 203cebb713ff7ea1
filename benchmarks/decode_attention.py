"""The decode attention kernel with its keys and values in the caches, and after they were pushed out.

    python benchmarks/decode_attention.py [--threads 2] [--P 1,2,4,8] [--length 96] [--calls 150]

In a decode step the attention of a layer runs after the layer's q/k/v products, which streamed
about 5 MB of weights through the caches (22 MB for the whole layer, 400 MB for the step of the
decode benchmark's 16-layer model): the layer's keys, values and stream prefixes are read from
memory again at every step. This script times one call of `prefix_attention._decode_attention_kernel`
for the decode benchmark's geometry (16 query heads, 4 KV heads, 64 columns, 48 prefix
positions, `--length` cached positions, P rows at batch 1) in two states: **hot**, the same call
repeated (everything in L1/L2), and **cold**, each call after one thread summed a 64 MiB array
(which pushes the keys, values and prefixes out of every cache level, as the weights do in a
step, and with them the Python objects of the call) and a tiny product woke the kernels'
threads; `C asleep` is the bare call, data hot, after 5 ms without work (the threads asleep). Both through the Python entry and as the
bare C call (its ctypes arguments made once). Medians over `--calls` calls, in us, for float32
and bfloat16. Writes
benchmarks/results/decode_attention.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _result import write_result  # benchmarks/_result.py

from parscale.machine import describe, header
from parscale.model import kernels, prefix_attention

RESULTS = Path(__file__).resolve().parent / "results" / "decode_attention.json"


def inputs(rows: int, length: int, dtype: torch.dtype, heads: int = 16, kv: int = 4, dim: int = 64, prefix: int = 48):
    """Query, keys and values as the in-place cache holds them (views of buffers with room), prefixes."""
    gen = torch.Generator().manual_seed(rows)
    query = torch.randn(rows, heads, 1, dim, generator=gen).to(dtype)
    room = length + length // 4
    keys = torch.randn(rows, kv, room, dim, generator=gen).to(dtype)[:, :, :length]
    values = torch.randn(rows, kv, room, dim, generator=gen).to(dtype)[:, :, :length]
    prefix_k = torch.randn(rows, kv, prefix, dim, generator=gen).to(dtype)  # one stream per row at batch 1
    prefix_v = torch.randn(rows, kv, prefix, dim, generator=gen).to(dtype)
    return query, keys, values, prefix_k, prefix_v


def c_function(query, keys, values, prefix_k, prefix_v, threads: int):
    """The kernel's C function with its arguments made once: the call without its Python entry."""
    lib = prefix_attention.kernel_library()
    fn = lib.parscale_decode_attention_bf16 if query.dtype == torch.bfloat16 else lib.parscale_decode_attention_f32
    rows, heads, _, dim = query.shape
    kv, length, prefix = keys.shape[1], keys.shape[2], prefix_k.shape[2]
    out = torch.empty(rows, 1, heads, dim, dtype=query.dtype)
    arguments = (query.data_ptr(), keys.data_ptr(), values.data_ptr(), *keys.stride()[:3], prefix_k.data_ptr(),
                 prefix_v.data_ptr(), None, 0, out.data_ptr(), rows, heads, kv, length, prefix, dim, 1, 0.125, threads)
    def call():
        fn(*arguments)
        return out  # the closure holds `out` (and through the caller the inputs) while the pointers are used

    return call


def median_us(call, before, calls: int) -> float:
    times = []
    for _ in range(calls):
        before()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--P", default="1,2,4,8")
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if prefix_attention.kernel_library() is None or kernels.library() is None:
        print("the decode attention kernel did not build (no C++ compiler?)", file=sys.stderr)
        return 1
    sweep = np.ones(64 << 20, dtype=np.uint8)  # read by one thread (numpy), not by the kernel's threads
    # ... and then a tiny product on the kernel's threads, which wakes them (they sleep after a
    # few hundred us without work; in a decode step the products keep them awake)
    tiny_x, tiny_w = torch.randn(1, 64), torch.randn(64, 64)
    product = kernels.library()

    def cold():
        sweep.sum()
        kernels.skinny_linear(tiny_x, tiny_w, None, product)
    rows_out = []
    for dtype in (torch.float32, torch.bfloat16):
        for p in [int(x) for x in args.P.split(",")]:
            query, keys, values, prefix_k, prefix_v = inputs(p, args.length, dtype)

            def call():
                prefix_attention._decode_attention_kernel(query, keys, values, None, prefix_k, prefix_v, 0.125)

            c_call = c_function(query, keys, values, prefix_k, prefix_v, args.threads)
            for _ in range(20):
                call()
            times = {"hot_us": median_us(call, lambda: None, args.calls), "cold_us": median_us(call, cold, args.calls),
                     "c_hot_us": median_us(c_call, lambda: None, args.calls),
                     "c_cold_us": median_us(c_call, cold, args.calls),
                     "c_asleep_us": median_us(c_call, lambda: time.sleep(0.005), args.calls)}
            data = sum(t.numel() * t.element_size() for t in (keys, values, prefix_k, prefix_v))
            rows_out.append({"dtype": str(dtype).removeprefix("torch."), "P": p, **times, "bytes": data})
    machine = describe()
    print(header(machine))
    print(f"{args.threads} thread(s), 16 heads, 4 KV heads, 64 columns, 48 prefix + {args.length} cached positions, "
          f"batch 1, median of {args.calls} calls")
    print(f"{'dtype':<9} {'P':>2} {'hot us':>8} {'cold us':>8} {'C hot us':>9} {'C cold us':>10} {'C asleep':>9} "
          f"{'KB read':>8}")
    for r in rows_out:
        print(f"{r['dtype']:<9} {r['P']:>2} {r['hot_us']:>8.1f} {r['cold_us']:>8.1f} {r['c_hot_us']:>9.1f} "
              f"{r['c_cold_us']:>10.1f} {r['c_asleep_us']:>9.1f} {r['bytes'] / 1e3:>8.0f}")
    write_result(args.out, {"threads": args.threads, "length": args.length, "calls": args.calls, "rows": rows_out},
                 __file__, argv, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
