"""`parscale cost`: memory and latency of P streams, and against parameter scaling.

    parscale cost --hidden-size 2560 --intermediate-size 13824 --P 2 --batch-size 2 [--json]
    parscale cost compare --preset 1.6B --P 8 --batch-size 1,2,4,8 [--plot cost.png] [--json]
    parscale cost grid [--json]
    parscale cost measure [--P 1,2,4,8] [--batch-size 1,2,4,8] [--json]

Flag names are those of the paper's cost script; each is accepted with `_` or `-`.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from parscale.cache import cache_dir as parscale_cache_dir
from parscale.cost.roofline import PRESETS, KV_TRAFFIC, PREFIX_STORAGE, ModelShape, Workload, estimate
from parscale.cli.options import Parser
from parscale.errors import UserError
from parscale.cost.hardware import Hardware, profile_dict, resolve

SUBVERBS = ("compare", "grid", "measure")


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise UserError(f"expected comma-separated integers like 1,2,4,8, got {text!r}") from err
    if not values:
        raise UserError("expected at least one integer, got an empty list")
    return values


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (defaults: the paper's 36-layer Qwen-2.5-style family)")
    _add(g, "--preset", choices=sorted(PRESETS), help="one of the paper's six sizes")
    _add(g, "--hf-config", help="a transformers config.json (or a model directory) to read the shape from")
    _add(g, "--hidden-size", type=int)
    _add(g, "--intermediate-size", type=int)
    _add(g, "--num-hidden-layers", type=int, default=36)
    _add(g, "--num-attention-heads", type=int, default=16)
    _add(g, "--num-key-value-heads", type=int, default=2)
    _add(g, "--vocab-size", type=int, default=151936)
    _add(g, "--max-position-embeddings", type=int, default=2048)
    _add(g, "--untied-embeddings", action="store_true", help="the lm_head has its own weights")


def _run_flags(p: argparse.ArgumentParser, lists: bool) -> None:
    g = p.add_argument_group("workload and hardware")
    kind = str if lists else int
    _add(g, "--P", type=kind, default="2,4,8" if lists else 1, help="parallel streams" + (" (list)" if lists else ""))
    _add(g, "--prefix-tokens", "--parscale-prefix-tokens", dest="parscale_prefix_tokens", type=int, default=48,
         help="learnable key/value prefix length per stream and layer (default 48)")
    _add(g, "--batch-size", type=kind, default="1,2,4,8" if lists else 1)
    _add(g, "--input-length", type=int, default=64)
    _add(g, "--output-length", type=int, default=64)
    _add(g, "--dtype-bytes", type=int, default=2, help="2 = bf16/fp16 (the paper), 4 = fp32")
    _add(g, "--profile", "--gpu-config", dest="profile", default="a100-80gb",
         help="a100-80gb, h100-sxm, h200, cpu-local, or FILE.json")
    _add(g, "--flops-efficiency", type=float, help="override the profile's (default 0.7)")
    _add(g, "--hbm-memory-efficiency", type=float, help="override the profile's (default 0.9)")
    _add(g, "--prefix-storage", choices=PREFIX_STORAGE, default="shared",
         help="shared: stored once, as parameters (what parscale.model.wrapper does); "
              "per-row: copied into every row's KV cache (the paper script's accounting)")
    _add(g, "--kv-traffic", choices=KV_TRAFFIC, default="llm-analysis",
         help="per decode step: load+store of the whole final cache (llm-analysis, the paper) or the exact reads")
    _add(g, "--cache-dir", help=f"where cpu-local's measurement is cached (default {parscale_cache_dir()})")
    _add(g, "--json", action="store_true", help="print one machine-readable JSON object")


_HELP = {  # options shared by several sub-verbs, so one text each
    "hidden_size": "model width (hidden size)", "intermediate_size": "MLP width (intermediate size)",
    "num_hidden_layers": "decoder layers", "num_attention_heads": "query heads",
    "num_key_value_heads": "key/value heads (GQA)", "vocab_size": "vocabulary size",
    "max_position_embeddings": "longest input + output the model takes",
    "batch_size": "sequences decoded together", "input_length": "prompt tokens", "output_length": "generated tokens",
    "seed": "seed of the random weights and prompts", "json": "print one machine-readable JSON object",
    "kv_traffic": "KV-cache bytes per decode step in the prediction: llm-analysis or exact",
}


def _add(p: Any, *names: str, **kwargs: Any) -> None:
    """Register each `--a-b` with its `--a_b` spelling (the authors' script uses underscores)."""
    key = kwargs.get("dest") or names[0][2:].replace("-", "_")
    if "help" not in kwargs and key in _HELP:
        default = kwargs.get("default")
        kwargs["help"] = _HELP[key] + (f" (default {default})" if default not in (None, False) else "")
    spellings: list[str] = []
    for name in names:
        for alt in (name, "--" + name[2:].replace("-", "_")):
            if alt not in spellings:
                spellings.append(alt)
    p.add_argument(*spellings, **kwargs)


def shape_from_args(args: argparse.Namespace) -> ModelShape:
    if args.preset:
        return PRESETS[args.preset]
    if args.hf_config:
        path = Path(args.hf_config)
        if path.is_dir():  # a model directory: its config.json (or what the directory is instead)
            from parscale.cli.model_dir import check_model_dir

            path = check_model_dir(path, "--hf-config") / "config.json"
        if not path.is_file():
            raise UserError(f"--hf-config {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise UserError(f"--hf-config {path} is not valid JSON ({err})") from err
        try:
            return ModelShape.from_hf_config(SimpleNamespace(**data))
        except AttributeError as err:
            raise UserError(f"--hf-config {path} lacks a field: {err}") from err
    if args.hidden_size is None or args.intermediate_size is None:
        raise UserError("give --hidden-size and --intermediate-size (or --preset NAME, or --hf-config FILE)")
    return ModelShape(
        layers=args.num_hidden_layers, hidden=args.hidden_size, intermediate=args.intermediate_size,
        heads=args.num_attention_heads, kv_heads=args.num_key_value_heads, vocab=args.vocab_size,
        tied_embeddings=not args.untied_embeddings,
    )


def hardware_from_args(args: argparse.Namespace) -> Hardware:
    hw = resolve(args.profile, Path(args.cache_dir) if args.cache_dir else None)
    return hw.with_efficiencies(args.flops_efficiency, args.hbm_memory_efficiency)


def workload_from_args(args: argparse.Namespace, p: int, batch: int) -> Workload:
    return Workload(
        n_streams=p, prefix_tokens=args.parscale_prefix_tokens, batch_size=batch,
        input_length=args.input_length, output_length=args.output_length, dtype_bytes=args.dtype_bytes,
        prefix_storage=args.prefix_storage, kv_traffic=args.kv_traffic,
    )


def _check_positions(args: argparse.Namespace) -> None:
    if args.input_length + args.output_length > args.max_position_embeddings:
        raise UserError(
            f"input + output length ({args.input_length + args.output_length}) exceeds "
            f"--max-position-embeddings ({args.max_position_embeddings}); shorten them or raise the limit"
        )


def main_estimate(argv: list[str]) -> int:
    parser = Parser(
        prog="parscale cost [compare|grid|measure]", description="Memory and latency of one configuration.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sub-verbs (parscale cost SUB-VERB --help for their options):\n"
               "  compare   ParScale against parameter scaling of equal predicted loss\n"
               "  grid      the paper's 96 configurations: 6 sizes x P 1,2,4,8 x batch 1,2,4,8\n"
               "  measure   run a random-weight model on this CPU and compare with the cpu-local profile")
    _model_flags(parser)
    _run_flags(parser, lists=False)
    args = parser.parse_args(argv)
    shape, hw = shape_from_args(args), hardware_from_args(args)
    _check_positions(args)
    work = workload_from_args(args, args.P, args.batch_size)
    result = estimate(shape, work, hw)
    if args.json:
        out = {**result.to_dict(), "shape": asdict(shape), "workload": asdict(work), "hardware": profile_dict(hw)}
        print(json.dumps(out, indent=2))
        return 0
    print(f"Memory: {result.memory_gib:.3f} GiB; Latency: {result.latency_s:.3f} s")
    print(f"  weights {result.weights / 2**30:.3f} GiB, KV cache {result.kv_cache / 2**30:.3f} GiB, "
          f"activation {result.activation / 2**30:.3f} GiB ({hw.name}{'' if result.fits else ', DOES NOT FIT'})")
    print(f"  prefill {result.prefill_s * 1e3:.2f} ms + {work.output_length} decode steps "
          f"{result.decode_s * 1e3:.2f} ms; non-embedding params {result.terms['non_embedding_params']:,}")
    return 0


def main(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-") and argv[0] not in SUBVERBS:
        from parscale.cli.main import unknown_choice

        raise UserError(unknown_choice("sub-verb", argv[0], SUBVERBS))
    if argv and argv[0] in SUBVERBS:
        verb, rest = argv[0], argv[1:]
        if verb == "compare":
            return main_compare(rest)
        if verb == "grid":
            return main_grid(rest)
        return main_measure(rest)
    return main_estimate(argv)


def main_grid(argv: list[str]) -> int:
    parser = Parser(prog="parscale cost grid",
                                     description="The paper's 96 configurations: 6 sizes x P 1,2,4,8 x batch 1,2,4,8.")
    _run_flags(parser, lists=False)
    args = parser.parse_args(argv)
    hw = hardware_from_args(args)
    start = time.perf_counter()
    rows = []
    for name, shape in PRESETS.items():
        for p in (1, 2, 4, 8):
            for batch in (1, 2, 4, 8):
                r = estimate(shape, workload_from_args(args, p, batch), hw)
                rows.append({"size": name, "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
                             "P": p, "batch_size": batch, "memory_gib": r.memory_gib, "latency_s": r.latency_s})
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"rows": rows, "seconds": seconds, "hardware": profile_dict(hw)}, indent=2))
        return 0
    print(f"{'size':>5} {'P':>2} {'B':>2} {'memory GiB':>11} {'latency s':>10}")
    for r in rows:
        print(f"{r['size']:>5} {r['P']:>2} {r['batch_size']:>2} {r['memory_gib']:>11.3f} {r['latency_s']:>10.4f}")
    print(f"{len(rows)} configurations in {seconds:.3f} s ({hw.name})")
    return 0


def main_compare(argv: list[str]) -> int:
    from parscale.cost.compare import Comparator, compare, parse_reference

    parser = Parser(prog="parscale cost compare",
                                     description="ParScale against parameter scaling of equal predicted loss.")
    _model_flags(parser)
    _run_flags(parser, lists=True)
    _add(parser, "--lengths", default="64,128,256,512", help="input = output lengths to average over")
    _add(parser, "--reference", default="law:paper-stack",
         help="law:paper-stack (fitted law), observed:paper-stack (the paper's losses), or -pile")
    _add(parser, "--law", help="JSON with E, A, alpha, k (overrides --reference)")
    _add(parser, "--plot", help="write a Figure-4-style PNG here")
    args = parser.parse_args(argv)
    if args.plot:
        from parscale.atomic import check_writable
        from parscale.errors import require_extra

        check_writable(args.plot, "--plot")
        require_extra("matplotlib", "--plot")
    shape, hw = shape_from_args(args), hardware_from_args(args)
    streams, batches, lengths = int_list(args.P), int_list(args.batch_size), int_list(args.lengths)
    if any(n <= 0 for n in lengths):
        raise UserError(f"--lengths must all be > 0, got {lengths}")
    ref = parse_reference(args.reference, args.law)
    cmp = Comparator(hw, lengths, workload_from_args(args, 1, 1))
    rows = compare(shape, ref, streams, batches, cmp)
    if args.plot:
        from parscale.cost.plot import plot_compare

        plot_compare(shape, ref, rows, cmp, Path(args.plot))
    if args.json:
        out: dict[str, Any] = {"rows": rows, "lengths": lengths, "hardware": profile_dict(hw)}
        if len(rows) == 1:
            out.update(rows[0])
        print(json.dumps(out, indent=2))
        return 0
    print(format_compare(rows, ref.name, hw.name, lengths))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def format_compare(rows: list[dict[str, Any]], reference: str, hardware: str, lengths: list[int]) -> str:
    """The comparison table: one row per (P, batch), then what its columns mean (once)."""
    from parscale.cost.compare import METHOD_NOTES, against_parameters

    lines = [f"reference {reference}; {hardware}; lengths {lengths} averaged (input = output)",
             f"{'P':>2} {'B':>2} {'loss':>7} {'N equiv':>9} {'mem +ParScale':>14} {'mem +param':>11} "
             f"{'lat +ParScale':>14} {'lat +param':>11}  ParScale against parameters"]
    for r in rows:
        words = (against_parameters(r["memory_increase_param_gib"], r["memory_increase_parscale_gib"], "memory")
                 + ", " + against_parameters(r["latency_increase_param_s"], r["latency_increase_parscale_s"],
                                             "latency"))
        lines.append(f"{r['P']:>2} {r['batch_size']:>2} {r['loss_parscale']:>7.4f} "
                     f"{r['params_equivalent'] / 1e9:>7.2f}B{'*' if r['extrapolated'] else ' '} "
                     f"{r['memory_increase_parscale_gib']:>10.3f} GiB {r['memory_increase_param_gib']:>7.3f} GiB "
                     f"{r['latency_increase_parscale_s'] * 1e3:>11.2f} ms {r['latency_increase_param_s'] * 1e3:>8.2f} ms"
                     f"  {words}")
    lines.append("+: the increase over the base model at P = 1 and the same batch size; memory in GiB (2^30 bytes)")
    for method in dict.fromkeys(r["method"] for r in rows):
        lines.append(f"N equiv: the P = 1 model of equal loss; its cost is {METHOD_NOTES[method]}")
    if any(r["extrapolated"] for r in rows):
        lines.append("*: N equiv lies beyond the sizes it is costed from: the line through the two nearest is "
                     "extended (extrapolated)")
    return "\n".join(lines)


def main_measure(argv: list[str]) -> int:
    from parscale.cost.measure import MeasureConfig, format_table, run_measurements

    parser = Parser(prog="parscale cost measure",
                                     description="Run a random-weight model on this CPU; compare with cpu-local.")
    _add(parser, "--hidden-size", type=int, default=1024)
    _add(parser, "--intermediate-size", type=int, default=2816)
    _add(parser, "--num-hidden-layers", type=int, default=12)
    _add(parser, "--num-attention-heads", type=int, default=16)
    _add(parser, "--num-key-value-heads", type=int, default=4)
    _add(parser, "--vocab-size", type=int, default=32000)
    _add(parser, "--P", default="1,2,4,8", help="parallel streams to measure (list, default 1,2,4,8)")
    _add(parser, "--batch-size", default="1,2,4,8", help="batch sizes to measure (list, default 1,2,4,8)")
    _add(parser, "--input-length", type=int, default=32)
    _add(parser, "--output-length", type=int, default=16)
    _add(parser, "--seed", type=int, default=0)
    _add(parser, "--threads", type=int, help="torch threads for the run and the cpu-local profile (default: torch's)")
    _add(parser, "--kv-traffic", choices=KV_TRAFFIC, default="llm-analysis")
    _add(parser, "--cache-dir", help=f"where cpu-local's measurement is cached (default {parscale_cache_dir()})")
    _add(parser, "--refresh-profile", action="store_true", help="re-measure cpu-local instead of using the cache")
    _add(parser, "--paired", action="store_true",
         help="re-measure cpu-local right before each configuration (for a CPU shared with other work)")
    _add(parser, "--json", action="store_true")
    args = parser.parse_args(argv)
    cfg = MeasureConfig(
        hidden=args.hidden_size, intermediate=args.intermediate_size, layers=args.num_hidden_layers,
        heads=args.num_attention_heads, kv_heads=args.num_key_value_heads, vocab=args.vocab_size,
        input_length=args.input_length, output_length=args.output_length, seed=args.seed, kv_traffic=args.kv_traffic,
    )
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)  # process-wide, which is what a CLI run is
    from parscale.cost.hardware import cpu_local

    hw = cpu_local(Path(args.cache_dir) if args.cache_dir else None, refresh=args.refresh_profile)
    rows = run_measurements(cfg, int_list(args.P), int_list(args.batch_size), hw, paired=args.paired)
    if args.json:
        print(json.dumps({"rows": rows, "config": asdict(cfg), "hardware": profile_dict(hw)}, indent=2))
    else:
        print(format_table(rows, hw))
    return 0
