"""The KV cache on CPU: appended in place (`parscale.model.kv_cache`, the default) against
transformers' concatenating `DynamicLayer`, by prompt length.

    python benchmarks/kv_cache.py [--P 1,8] [--prompts 64,1024] [--dtype bfloat16] [--reps 5]

The decode benchmark's model (`benchmarks/decode.py`: 16 layers, hidden 1024, 4 KV heads),
greedy `generate` of 32 tokens after the prompt, each step timed by
`parscale.cost.measure.timed_generate`; the two caches alternate within every round and each
row reports the median step over rounds. The concatenation copies the whole cache (P rows) per
layer and step, so its cost grows with P and the context.
Writes benchmarks/results/kv_cache.json with the CPU named.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from _result import write_result  # benchmarks/_result.py
from decode import DTYPES, build

from parscale.machine import describe, header

RESULTS = Path(__file__).resolve().parent / "results" / "kv_cache.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--P", default="1,8")
    parser.add_argument("--prompts", default="64,1024")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from parscale.cost.measure import timed_generate
    from parscale.model import kv_cache

    in_place = kv_cache.grow_in_place
    streams, prompts = [int(p) for p in args.P.split(",")], [int(n) for n in args.prompts.split(",")]
    machine = describe()
    print(header(machine))
    rows = []
    for p in streams:
        model = build(16, DTYPES[args.dtype], [p], plain=False)[f"P{p}"]
        for prompt in prompts:
            ids = torch.randint(0, 32000, (1, prompt), generator=torch.Generator().manual_seed(0))
            steps: dict[str, list[float]] = {"in place": [], "concatenated": []}
            with torch.inference_mode():
                for _ in range(args.reps):
                    for kind in steps:
                        kv_cache.grow_in_place = in_place if kind == "in place" else (lambda cache: None)
                        try:
                            run = timed_generate(model, ids, args.new_tokens + 1)
                        finally:
                            kv_cache.grow_in_place = in_place
                        steps[kind].append(statistics.median(run.step_s) * 1e3)
            row = {"P": p, "prompt": prompt, "dtype": args.dtype,
                   **{f"{kind.replace(' ', '_')}_ms": statistics.median(v) for kind, v in steps.items()}}
            row["concatenated_over_in_place"] = row["concatenated_ms"] / row["in_place_ms"]
            rows.append(row)
            print(f"P={p} prompt {prompt:>5}: in place {row['in_place_ms']:6.1f} ms/token, "
                  f"concatenated {row['concatenated_ms']:6.1f} ({row['concatenated_over_in_place']:.2f}x)", flush=True)
        del model
    write_result(args.out, {"threads": args.threads, "new_tokens": args.new_tokens, "reps": args.reps, "rows": rows},
                 __file__, machine=machine)


if __name__ == "__main__":
    main()
