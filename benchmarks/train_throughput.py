"""Training throughput (tokens/s) of the `tiny` preset at P = 1, 2, 4 against a plain
transformers model of the same architecture, all driven by the trainer's own update step.

    python benchmarks/train_throughput.py [--steps 20] [--rounds 3] [--threads 1]

Each round times every variant once, in turn, so slow phases of a shared machine hit all
variants alike; the table reports the median over rounds. The goal: our P = 1 within 5%
of the plain model (at P = 1 the wrapper adds no prefix and no aggregation).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from _result import write_result  # benchmarks/_result.py

from parscale.machine import describe, header
from parscale.train import TrainConfig
from parscale.train import convert, distributed
from parscale.train.loop import _update
from parscale.train.presets import build_hf_config, preset_dict

VOCAB = 2048  # the embedded corpus's tokenizer size


def build(variant: str, seed: int = 0):
    hf_config = build_hf_config(preset_dict("tiny"), vocab_size=VOCAB)
    if variant == "plain":
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return convert.model_from_scratch(hf_config, int(variant[1:]), 48, 0.01, seed)


def time_variant(variant: str, cfg: TrainConfig, data, env, steps: int, warmup: int) -> tuple[float, float]:
    """(wall-clock, CPU-time) tokens per second over `steps` timed updates after `warmup`
    untimed ones. On a machine shared with other jobs the wall clock also counts the time
    other processes held the core; this process's CPU time does not."""
    model = build(variant).train()
    optimizer = torch.optim.AdamW(convert.param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2))
    for step in range(warmup):
        _update(cfg, env, model, optimizer, data, step)
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(warmup, warmup + steps):
        _update(cfg, env, model, optimizer, data, step)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = steps * cfg.batch_size * cfg.seq_len
    return tokens / wall, tokens / cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out=tmp, preset="tiny", steps=args.warmup + args.steps, batch_size=args.batch_size,
                          seq_len=args.seq_len, warmup_steps=1, order_start=0)
    rng = np.random.default_rng(0)
    # content does not change speed; text data: no loss mask
    data = SimpleNamespace(train=rng.integers(0, VOCAB, size=400_000, dtype=np.int64), train_mask=None)
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    variants = ["plain", "P1", "P2", "P4"]
    runs: dict[str, list[float]] = {v: [] for v in variants}
    cpu_runs: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            wall, cpu = time_variant(v, cfg, data, env, args.steps, args.warmup)
            runs[v].append(wall)
            cpu_runs[v].append(cpu)
            print(f"round {r + 1}/{args.rounds} {v:>5}: {wall:8.0f} tokens/s wall, {cpu:8.0f} per CPU-s",
                  file=sys.stderr)
    median = {v: statistics.median(runs[v]) for v in variants}
    cpu_median = {v: statistics.median(cpu_runs[v]) for v in variants}
    machine = describe()
    print(f"\n{header(machine)}\ntiny preset, batch {args.batch_size} x {args.seq_len}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds x {args.steps} steps\n")
    print("| model | tokens/s (wall) | tokens per CPU-second | vs plain (CPU) |\n|---|---|---|---|")
    for v in variants:
        name = "plain transformers" if v == "plain" else "ParScale P=" + v[1:]
        print(f"| {name} | {median[v]:,.0f} | {cpu_median[v]:,.0f} | {cpu_median[v] / cpu_median['plain']:.3f} |")
    # Within a round plain and P=1 run back to back; the median of the per-round ratios of
    # CPU-time throughput is the comparison least moved by other jobs on the machine.
    paired = statistics.median(p / q for p, q in zip(cpu_runs["P1"], cpu_runs["plain"]))
    gap = paired - 1
    print(f"\nP=1 vs plain (median of per-round CPU-time ratios): {100 * gap:+.1f}% "
          f"({'within' if abs(gap) <= 0.05 else 'OUTSIDE'} the 5% goal)")
    result = {"benchmark": "train_throughput", "preset": "tiny", "batch_size": args.batch_size,
              "seq_len": args.seq_len, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
              "tokens_per_s_wall": runs, "tokens_per_cpu_s": cpu_runs, "median_tokens_per_s_wall": median,
              "median_tokens_per_cpu_s": cpu_median, "p1_vs_plain_paired_cpu": gap}
    write_result(args.out, result, __file__, argv, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
