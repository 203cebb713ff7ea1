"""Training tokens per CPU-second of small models with a small vocabulary: the measurements
the `law` budget of `parscale demo` is sized from (docs/mini-study.md).

    python benchmarks/law_throughput.py [--shapes 32:88:4,64:176:4] [--presets law-xs,law-s]
        [--vocab 512] [--batch-size 16] [--seq-len 128] [--variants P1,P2,P4,prefix48,prefix96]
        [--steps 8] [--warmup 2] [--rounds 2]

A shape is hidden:ffn:layers[:heads:kv_heads] (4 query and 2 KV heads when left out). Each
update is the trainer's own (`parscale.train.loop._update`) on random tokens, one torch
thread. Times are this process's CPU time (`time.process_time`), which other jobs on a shared
machine disturb much less than the wall clock (they still share caches and memory bandwidth).
Each round times every variant once, in turn; the table gives the median over rounds, the
non-embedding parameters N and the tokens a run of 20 tokens per parameter needs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from _result import write_result  # benchmarks/_result.py

from parscale.machine import describe, header
from parscale.train import TrainConfig, convert, distributed
from parscale.train.loop import _update
from parscale.train.presets import build_hf_config, preset_dict

VARIANTS = {"P1": (1, 48, False), "P2": (2, 48, False), "P4": (4, 48, False), "P8": (8, 48, False),
            "prefix48": (1, 48, True), "prefix96": (1, 96, True)}  # (P, prefix tokens, prefix_at_p1)


def shape_fields(text: str) -> dict:
    """A preset name, or hidden:ffn:layers[:heads:kv], as the fields of a Qwen2 config."""
    if ":" not in text:
        return preset_dict(text)
    parts = [int(x) for x in text.split(":")]
    hidden, ffn, layers = parts[:3]
    heads, kv = parts[3:5] if len(parts) == 5 else (4, 2)
    fields = preset_dict("tiny")
    fields.update(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv)
    return fields


def non_embedding(model) -> int:
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters()) - emb.numel()  # the head is tied


def time_one(fields: dict, variant: str, cfg: TrainConfig, data, env, steps: int, warmup: int) -> tuple[float, int]:
    """(tokens per CPU-second, N of the P = 1 backbone) over `steps` timed updates."""
    P, prefix, at_p1 = VARIANTS[variant]
    hf = build_hf_config(fields, vocab_size=cfg.data.vocab_size)
    model = convert.model_from_scratch(hf, P, prefix, 0.01, 0, prefix_at_p1=at_p1).train()
    n = non_embedding(convert.model_from_scratch(hf, 1, prefix, 0.01, 0))
    optimizer = torch.optim.AdamW(convert.param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2))
    for step in range(warmup):
        _update(cfg, env, model, optimizer, data, step)
    cpu = time.process_time()
    for step in range(warmup, warmup + steps):
        _update(cfg, env, model, optimizer, data, step)
    return steps * cfg.batch_size * cfg.seq_len / (time.process_time() - cpu), n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="", help="comma-separated hidden:ffn:layers[:heads:kv]")
    parser.add_argument("--presets", default="", help="comma-separated preset names")
    parser.add_argument("--variants", default="P1,P2,P4,prefix48,prefix96")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "law_throughput.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shapes = [s for s in (args.presets.split(",") + args.shapes.split(",")) if s]
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out=tmp, preset="tiny", steps=args.warmup + args.steps, batch_size=args.batch_size,
                          seq_len=args.seq_len, warmup_steps=1, order_start=0,
                          data={"vocab_size": args.vocab})
    rng = np.random.default_rng(0)
    data = SimpleNamespace(train=rng.integers(0, args.vocab, size=2_000_000, dtype=np.int64), train_mask=None)
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cpu: dict[str, dict[str, list[float]]] = {s: {v: [] for v in variants} for s in shapes}
    n_of: dict[str, int] = {}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for s in shapes:
            for v in variants:
                tps, n_of[s] = time_one(shape_fields(s), v, cfg, data, env, args.steps, args.warmup)
                cpu[s][v].append(tps)
                print(f"round {r + 1}/{args.rounds} {s} {v}: {tps:,.0f} tokens per CPU-s", file=sys.stderr)
    load.append(os.getloadavg()[0])
    median = {s: {v: statistics.median(cpu[s][v]) for v in variants} for s in shapes}
    machine = describe()
    print(f"\n{header(machine)}\nvocab {args.vocab}, batch {args.batch_size} x {args.seq_len}, 1 thread, "
          f"median of {args.rounds} rounds x {args.steps} updates; tokens per CPU-second\n")
    print("| shape | N | " + " | ".join(variants) + " | CPU-s for 20 N tokens at P=1 |")
    print("|---|---|" + "---|" * len(variants) + "---|")
    for s in shapes:
        p1 = median[s].get("P1")
        need = f"{20 * n_of[s] / p1:,.0f}" if p1 else "–"
        print(f"| {s} | {n_of[s]:,} | " + " | ".join(f"{median[s][v]:,.0f}" for v in variants) + f" | {need} |")
    print(f"\n1-minute load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} CPUs")
    result = {"benchmark": "law_throughput", "vocab": args.vocab, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "steps": args.steps, "rounds": args.rounds, "N": n_of,
              "tokens_per_cpu_s": cpu, "median_tokens_per_cpu_s": median, "load_average": load}
    write_result(args.out, result, __file__, argv, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
