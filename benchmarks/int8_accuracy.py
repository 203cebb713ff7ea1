"""The accuracy cost of `quantize_int8()` on a trained model: held-out loss and greedy tokens, float32 vs int8.

    python benchmarks/int8_accuracy.py --run runs/demo/runs/p2/final [--prompts 8] [--new-tokens 32]
                                       [--activation-bits 16]

`--run` is a saved model directory of a training run (`parscale train` or `parscale demo`),
whose `config.yaml` sits one level up. The held-out loss is the trainer's own evaluation
(`parscale.data.batches.evaluate_loss`) on the run's validation tokens: the first
`eval_tokens` of them, in sequences of `seq_len` and batches of `batch_size`, as the run
reported its `val_loss`. It is computed for the float32 model and for the same model after
`quantize_int8()` (float32 activations); Δ is int8 minus float32, in nats per token. Greedy
agreement: `--prompts` windows of 32 held-out tokens (evenly spaced) are continued by
`--new-tokens` greedy tokens with both models (decoding takes the int8 kernel); reported are
the fraction of identical new tokens, position by position, and of prompts whose whole
continuation is identical. `--activation-bits 8` measures `quantize_int8(activation_bits=8)`
(the activations rounded to int8 per row too) instead. Writes
benchmarks/results/int8_accuracy_<run name>.json (`..._a8.json` with 8-bit activations).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _result import write_result  # benchmarks/_result.py

from parscale.machine import describe, header

RESULTS = Path(__file__).resolve().parent / "results"


def run_name(final: Path) -> str:
    """`p2` for runs/demo/runs/p2/final: the run directory's name."""
    return final.resolve().parent.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a saved model directory of a training run")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--activation-bits", type=int, default=16, choices=[16, 8])
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/int8_accuracy_<run>.json")
    args = parser.parse_args(argv)
    from parscale.data.batches import evaluate_loss
    from parscale.data.prepare import prepare_data
    from parscale.model.wrapper import ParScaleForCausalLM
    from parscale.train.config import TrainConfig, load_yaml

    start = time.perf_counter()
    tc = TrainConfig.from_dict(load_yaml(args.run.resolve().parent / "config.yaml"))
    data = prepare_data(tc.data, cache_dir=tc.cache_dir)
    val = data.val
    float_model = ParScaleForCausalLM.from_pretrained(args.run, dtype=torch.float32).eval()
    int8_model = ParScaleForCausalLM.from_pretrained(args.run, dtype=torch.float32).eval().quantize_int8(args.activation_bits)

    def loss(model) -> float:
        return evaluate_loss(model, val, seq_len=tc.seq_len, batch_size=tc.batch_size, max_tokens=tc.eval_tokens,
                             mask=data.val_mask)

    losses = {"float32": loss(float_model), "int8": loss(int8_model)}
    step = (len(val) - args.prompt_length) // args.prompts
    prompts = torch.as_tensor(np.stack([np.asarray(val[i * step:i * step + args.prompt_length], dtype=np.int64)
                                        for i in range(args.prompts)]))  # prompts L
    outputs = {}
    with torch.no_grad():
        for name, model in (("float32", float_model), ("int8", int8_model)):
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=data.eos_id)
            outputs[name] = out[:, args.prompt_length:]
    same = outputs["float32"] == outputs["int8"]  # prompts new
    first_diff = [int(row.logical_not().nonzero()[0]) if not row.all() else args.new_tokens for row in same]
    float_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in float_model.named_modules()
                      if isinstance(m, torch.nn.Linear) and "aggregate_layer" not in n)
    result = {
        "command": f"python benchmarks/int8_accuracy.py --run {os.path.relpath(args.run)}"  # no machine paths
                   + (f" --activation-bits {args.activation_bits}" if args.activation_bits != 16 else ""),
        "activation_bits": args.activation_bits,
        "run": run_name(args.run), "P": float_model.parscale_config.n_streams,
        "eval_tokens": min(tc.eval_tokens or len(val), len(val)), "seq_len": tc.seq_len,
        "val_loss_float32": losses["float32"], "val_loss_int8": losses["int8"],
        "delta_nats": losses["int8"] - losses["float32"],
        "greedy_token_agreement": float(same.float().mean()),
        "greedy_identical_prompts": int(same.all(dim=1).sum()), "prompts": args.prompts,
        "new_tokens": args.new_tokens, "first_difference": first_diff,
        "quantized_linear_float32_bytes": float_bytes,
        "seconds": time.perf_counter() - start,
    }
    machine = describe()
    print(header(machine))
    print(f"{result['run']} (P = {result['P']}): held-out loss float32 {losses['float32']:.5f}, int8 "
          f"{losses['int8']:.5f}, delta {result['delta_nats']:+.5f} nats over {result['eval_tokens']} tokens; greedy "
          f"agreement {result['greedy_token_agreement']:.3f} of {args.prompts}x{args.new_tokens} tokens, "
          f"{result['greedy_identical_prompts']}/{args.prompts} continuations identical")
    suffix = "_a8" if args.activation_bits == 8 else ""
    write_result(args.out or RESULTS / f"int8_accuracy_{result['run']}{suffix}.json", result, __file__, argv, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
