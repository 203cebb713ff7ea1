"""Where a decode step's time goes: the few-row products, the decode attention, the aggregation,
the norms, and everything else (the eager work around them and `generate`'s own per-step work).

    python benchmarks/decode_split.py [--dtype bfloat16] [--P 1,8] [--int8] [--w8a8] [--own-layer] [--reps 3]
                                      [--threads 2] [--no-parts] [--around] [--min-read 0]

The model of `benchmarks/decode.py` (random weights, 16 layers, hidden 1024, 64-token prompt,
32 new tokens, batch 1). The four parts are timed by wrapping their Python entry points
(`kernels.skinny_linear`, `quantize.int8_linear`, `decode_layer._product` and `_grouped`,
`prefix_attention.call_kernel`, `AggregationHead.forward`, `norms.rms_norm`; one
called by another counts once) with a wall clock; a step's time is that of
generating 33 tokens less that of generating 1, divided by 32, and each part likewise, so the
prefill is left out. "other" is the step less the four parts (with the attention kernel off,
torch's fused attention counts as "other"). The parts are timed with the decode step calling its
kernels one by one from Python (`decode_layer.use_chain` off): in its two C calls per layer
(the default) they cannot be timed apart. The column "chained" is the same step as those C
calls, one layer after the other (`decode_layer.use_stack` off), and "stacked" the default step,
where a bfloat16 forward's layers take their one-call steps in a single C call (`decode_stack`),
both measured in the same round, their order alternating from round to round. `--no-parts`
leaves the parts out (the columns "chained" and "stacked" only). `--min-read GB/S` waits before
each round (up to 20 minutes) until the read bandwidth is at least that.
`--around` adds a second table: the default (stacked) step's time outside its kernels, from the
same clock around `decode_stack.run` (every layer's step in one C call: "layers"), the later
layers' checks (`decode_stack.take`), the backbone's own forward less those ("backbone": the
rotary table, the mask, transformers' per-layer loop and decorators), the aggregation, the head
(the lm_head's product), our wrapper's forward less all of these ("wrapper") and `generate`'s
loop less the forward ("generate"); a step there is generating new tokens + 1 less generating 3,
over new tokens - 2, so that only steps that take the stacked call count: the first two record
the chain, and with the default 32 new tokens the cache (room for 32 tokens past the 64-token
prompt) does not grow, which would record it again.
Rounds are interleaved over the rows; the table gives medians, in ms per token. Each round also
measures the read bandwidth (torch's sum of 256 MiB): on a machine whose memory is shared with
other work it moves, and the products' share with it. `--own-layer` adds a row KEY-own per
model: the same model with its decoder layers' own forward (`decode_layer.enable(model, False)`),
the eager path the decode step replaces, timed in the same rounds. Writes
benchmarks/results/decode_split.json.
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

from _result import write_result  # benchmarks/_result.py
from decode import DTYPES, build, wait_for_reads  # benchmarks/decode.py: the same model

from parscale.cost.hardware import read_bandwidth
from parscale.model import decode_layer
from parscale.machine import describe, header

RESULTS = Path(__file__).resolve().parent / "results" / "decode_split.json"
PARTS = ("products", "attention", "aggregation", "norm")


def clock(owner, name: str, part: str, into: dict[str, float], inside: set[str]):
    """Replace `owner.name` by a wrapper that adds its wall time to `into[part]`; a call made while
    `part` is being timed (an entry point called by another of the same part) is not counted
    twice. Returns the original, for putting back."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def timed(*args, **kwargs):
        if part in inside:
            return inner(*args, **kwargs)
        inside.add(part)
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            inside.discard(part)
            into[part] = into.get(part, 0.0) + time.perf_counter() - start

    setattr(owner, name, timed)
    return inner


def instrument(spent: dict[str, float]) -> None:
    """Wrap each part's entry point so that its wall time adds up in `spent` (for this process)."""
    from parscale.model import aggregation, decode_layer, kernels, norms, prefix_attention, quantize

    inside: set[str] = set()  # parts being timed now

    def wrap(owner, name: str, part: str) -> None:
        clock(owner, name, part, spent, inside)

    wrap(kernels, "skinny_linear", "products")
    wrap(quantize, "int8_linear", "products")
    wrap(decode_layer, "_product", "products")  # the decode step calls the kernels' C functions itself
    wrap(decode_layer, "_grouped", "products")  # q/k/v and gate/up, each group in one call
    # the kernel's C call, not `decode_attention`: the decode step (`decode_layer`) calls it
    # directly, the P = 1 attention through `_decode_attention_kernel`'s checks
    wrap(prefix_attention, "call_kernel", "attention")
    wrap(aggregation.AggregationHead, "forward", "aggregation")
    wrap(norms, "rms_norm", "norm")


def split_step(model, prompt: torch.Tensor, new_tokens: int, spent: dict[str, float]) -> dict[str, float]:
    """ms per decode step, in total and per part: (generate new_tokens + 1) less (generate 1)."""
    def run(tokens: int) -> tuple[float, dict[str, float]]:
        spent.clear()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return time.perf_counter() - start, dict(spent)

    with torch.no_grad():
        long, long_parts = run(new_tokens + 1)
        short, short_parts = run(1)
    row = {part: (long_parts.get(part, 0.0) - short_parts.get(part, 0.0)) / new_tokens * 1e3 for part in PARTS}
    row["step"] = (long - short) / new_tokens * 1e3
    row["other"] = row["step"] - sum(row[part] for part in PARTS)
    return row


AROUND = ("step", "layers", "checks", "backbone", "aggregation", "head", "wrapper", "generate")


def around_step(model, prompt: torch.Tensor, new_tokens: int, spent: dict[str, float]) -> dict[str, float]:
    """ms per stacked decode step, split into the C call of every layer and what lies around it
    (`--around`): (generate new_tokens + 1) less (generate 3), over new_tokens - 2, so the first
    two steps of each generate, which record the chain, fall out."""
    from parscale.model import decode_stack

    clocked: dict[str, float] = {}
    inside: set[str] = set()
    # instance attributes shadow the modules' forward (nn.Module.__call__ calls self.forward); the
    # module functions are put back after the run
    originals = [(decode_stack, "run", clock(decode_stack, "run", "layers", clocked, inside)),
                 (decode_stack, "take", clock(decode_stack, "take", "checks", clocked, inside))]
    for owner, part in ((model, "forward"), (model.model, "backbone"), (model.get_output_embeddings(), "head")):
        clock(owner, "forward", part, clocked, inside)

    def run(tokens: int) -> tuple[float, dict[str, float]]:
        spent.clear()
        clocked.clear()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return time.perf_counter() - start, {**clocked, "aggregation": spent.get("aggregation", 0.0)}

    try:
        with torch.no_grad():
            long, a = run(new_tokens + 1)
            short, b = run(3)
    finally:
        for owner, name, inner in originals:
            setattr(owner, name, inner)
        for owner in (model, model.model, model.get_output_embeddings()):
            del owner.forward
    steps = new_tokens - 2
    per = {k: (a.get(k, 0.0) - b.get(k, 0.0)) / steps * 1e3 for k in set(a) | set(b)}
    row = {"step": (long - short) / steps * 1e3,
           **{k: per.get(k, 0.0) for k in ("layers", "checks", "aggregation", "head")}}
    row["backbone"] = per.get("backbone", 0.0) - row["layers"] - row["checks"]
    row["wrapper"] = per.get("forward", 0.0) - per.get("backbone", 0.0) - row["aggregation"] - row["head"]
    row["generate"] = row["step"] - per.get("forward", 0.0)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--P", default="1,8")
    parser.add_argument("--int8", action="store_true", help="also the same models after quantize_int8()")
    parser.add_argument("--w8a8", action="store_true",
                        help="also the same models after quantize_int8(activation_bits=8): rows KEY-int8a8")
    parser.add_argument("--own-layer", action="store_true",
                        help="also every model with its layers' own forward (decode_layer off): rows KEY-own")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-parts", action="store_true", help="only the columns chained and stacked")
    parser.add_argument("--around", action="store_true",
                        help="also split the default step into its one C call and the work around it")
    parser.add_argument("--min-read", type=float, default=0.0,
                        help="GB/s: wait before each round until the read bandwidth is at least this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.around and args.new_tokens < 4:
        parser.error("--around counts the steps after the first two: give --new-tokens 4 or more")
    torch.set_num_threads(args.threads)
    streams = [int(p) for p in args.P.split(",")]
    models = build(args.layers, DTYPES[args.dtype], streams, plain=False)  # "P1", "P8", ...: the same weights
    quantized = {**({"int8": 16} if args.int8 else {}), **({"int8a8": 8} if args.w8a8 else {})}
    floats = list(models.items())
    for suffix, bits in quantized.items():
        models.update({f"{key}-{suffix}": copy.deepcopy(model).quantize_int8(activation_bits=bits) for key, model in floats})
    if args.own_layer:  # the same model objects, switched per row below
        models.update({f"{key}-own": model for key, model in list(models.items())})
    spent: dict[str, float] = {}
    instrument(spent)
    prompt = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(0))
    for key, model in models.items():  # warm-up: kernel builds, first-call dispatch
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=2, do_sample=False)
        if args.around and not key.endswith("-own"):  # once before the rounds: a model's first came out
            # shorter than its kernels' time alone (a negative "backbone"), before this warm-up
            around_step(model, prompt, args.new_tokens, spent)
    rows: dict[str, list[dict[str, float]]] = {key: [] for key in models}
    around: dict[str, list[dict[str, float]]] = {key: [] for key in models if not key.endswith("-own")}
    reads = []
    nan = float("nan")
    for rep in range(args.reps):
        reads.append(wait_for_reads(args.min_read))
        for key, model in models.items():
            own = key.endswith("-own")
            decode_layer.enable(model, not own)
            if args.no_parts:
                row = {c: nan for c in ("step", *PARTS, "other")}
            else:
                decode_layer.use_chain = False  # the parts, each timed from Python
                row = split_step(model, prompt, args.new_tokens, spent)
                decode_layer.use_chain = True
            for stacked in ((False, True) if rep % 2 == 0 else (True, False)):
                decode_layer.use_stack = stacked
                column = "stacked" if stacked else "chained"
                row[column] = nan if own else split_step(model, prompt, args.new_tokens, spent)["step"]
            decode_layer.use_stack = True
            rows[key].append(row)
            if args.around and not own:
                around[key].append(around_step(model, prompt, args.new_tokens, spent))
        print(f"round {rep + 1}/{args.reps} done (read {reads[-1] / 1e9:.0f} GB/s)", file=sys.stderr)
    machine = describe()
    columns = ("step", *PARTS, "other", "chained", "stacked")
    medians = {key: {c: statistics.median(r[c] for r in runs) for c in columns} for key, runs in rows.items()}
    print(header(machine))
    print(f"{args.threads} thread(s), {args.dtype}, {args.layers} layers, prompt 64, {args.new_tokens} new tokens, "
          f"median of {args.reps} interleaved rounds, ms per token; read bandwidth "
          f"{statistics.median(reads) / 1e9:.1f} GB/s (rounds {min(reads) / 1e9:.0f}-{max(reads) / 1e9:.0f})")
    print(f"{'model':<9} " + " ".join(f"{c:>11}" for c in columns))
    for key, row in medians.items():
        print(f"{key:<9} " + " ".join(f"{row[c]:>11.2f}" for c in columns))
    around_medians = {key: {c: statistics.median(r[c] for r in runs) for c in AROUND}
                      for key, runs in around.items() if runs}
    if around_medians:
        print("the default step and what lies around its one C call, ms per token:")
        print(f"{'model':<9} " + " ".join(f"{c:>11}" for c in AROUND))
        for key, row in around_medians.items():
            print(f"{key:<9} " + " ".join(f"{row[c]:>11.3f}" for c in AROUND))
    result = {"dtype": args.dtype, "threads": args.threads, "layers": args.layers, "new_tokens": args.new_tokens,
              "reps": args.reps, "median_ms": medians, "rounds_ms": rows, "read_bandwidths": reads,
              **({"around_median_ms": around_medians, "around_rounds_ms": around} if around_medians else {})}
    write_result(args.out, result, __file__, argv, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
