"""The backbone's RMSNorm on CPU: one C++ call (`parscale.model.norms`, the default) against
transformers' forward, per call and in the decode step.

    python benchmarks/norm.py [--P 1,8] [--dtype float32,bfloat16] [--reps 6]

Per call: one norm of hidden 1024 on P rows, best of 5 runs of 2000 calls. In the step: the
decode benchmark's model (`benchmarks/decode.py`: 16 layers, 33 norms per step), greedy
`generate` of 32 tokens after a 64-token prompt, each step timed by
`parscale.cost.measure.timed_generate`; the two norms alternate within every round (the
model's norm modules switched with `norms.enable`) and each row reports the median step over
rounds. Writes benchmarks/results/norm.json with the CPU named.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _result import write_result  # benchmarks/_result.py
from decode import DTYPES, build

from parscale.machine import describe, header

RESULTS = Path(__file__).resolve().parent / "results" / "norm.json"


def per_call_us(norm: torch.nn.Module, x: torch.Tensor, calls: int = 2000) -> float:
    best = float("inf")
    with torch.inference_mode():
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                norm(x)
            best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--P", default="1,8")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from parscale.cost.measure import timed_generate
    from parscale.model import norms

    if norms.library() is None:
        raise SystemExit("the RMSNorm kernel cannot be built here (no C++ compiler): nothing to compare")
    streams = [int(p) for p in args.P.split(",")]
    machine = describe()
    print(header(machine))
    rows = []
    for dtype in args.dtype.split(","):
        for p in streams:
            norm = Qwen2RMSNorm(1024).to(DTYPES[dtype])
            x = torch.randn(p, 1, 1024).to(DTYPES[dtype])
            stock_us = per_call_us(norm, x)
            norms.enable(norm)
            kernel_us = per_call_us(norm, x)
            model = build(16, DTYPES[dtype], [p], plain=False)[f"P{p}"]
            ids = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(0))
            steps: dict[str, list[float]] = {"kernel": [], "stock": []}
            with torch.inference_mode():
                for _ in range(args.reps):
                    for kind in steps:
                        norms.enable(model, kind == "kernel")
                        run = timed_generate(model, ids, args.new_tokens + 1)
                        steps[kind].append(statistics.median(run.step_s) * 1e3)
            del model
            row = {"P": p, "dtype": dtype, "stock_call_us": stock_us, "kernel_call_us": kernel_us,
                   **{f"{kind}_ms": statistics.median(v) for kind, v in steps.items()}}
            row["saved_ms"] = row["stock_ms"] - row["kernel_ms"]
            rows.append(row)
            print(f"{dtype:8s} P={p}: one norm {stock_us:5.1f} -> {kernel_us:4.1f} us; step {row['stock_ms']:5.1f} -> "
                  f"{row['kernel_ms']:5.1f} ms/token ({row['saved_ms']:+.1f})", flush=True)
    write_result(args.out, {"threads": args.threads, "new_tokens": args.new_tokens, "reps": args.reps, "rows": rows},
                 __file__, machine=machine)


if __name__ == "__main__":
    main()
