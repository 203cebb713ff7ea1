"""`parscale data prepare`: stream a corpus of any size into sharded, memory-mapped token files.

    parscale data prepare --data-files corpus/ --data-tokenizer tok/ --out data/web --workers 2
    parscale train --data-dir data/web --preset small --P 2 --out runs/web-p2

The options that name the data are spelled as in `parscale train` (`--data-files`,
`--data-tokenizer`, `--data-text-field`, `--data-seed`, ...). An interrupted prepare resumes
when the same command is run again.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from parscale.cli.options import Parser, hide
from parscale.errors import UserError

_SUB = {"prepare": "tokenize a corpus into DATA_DIR (index.json, tokenizer/, *.bin shards)"}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="parscale data prepare", description=__doc__.split("\n")[0])
    hide(p.add_argument("--data-files", "--data", nargs="+", metavar="FILE_OR_DIR",
                        help="text, JSON Lines or parquet files, or directories (default: the embedded "
                             "standard-library corpus)"), "--data")
    p.add_argument("--data-val-files", nargs="+", default=(), metavar="FILE_OR_DIR",
                   help="separate validation files (default: a hash of each document decides)")
    hide(p.add_argument("--data-tokenizer", "--tokenizer", metavar="DIR",
                        help="a local tokenizer directory (default: train a byte-level BPE on the training split)"),
         "--tokenizer")
    p.add_argument("--data-vocab-size", type=int, default=2048, help="the BPE's size without --data-tokenizer "
                                                                     "(default: 2048)")
    p.add_argument("--data-text-field", default="text", help="JSON/parquet field holding the text (default: text)")
    p.add_argument("--data-val-fraction", type=float, default=0.02,
                   help="share of documents held out for validation (default: 0.02)")
    p.add_argument("--data-seed", type=int, default=0, help="salt of the train/validation split hash (default: 0)")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="the prepared data directory")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help=f"tokenizing processes (default: {os.cpu_count() or 1}, the CPU count; 0: this process)")
    p.add_argument("--shard-tokens", type=int, default=1 << 29,
                   help=f"tokens per shard, closed at a document boundary (default: {1 << 29} = 2^29, 1 GiB of uint16)")
    p.add_argument("--on-bad-file", choices=("fail", "skip"), default="fail",
                   help="an unreadable or non-UTF-8 file (or JSON line): fail stops, skip leaves it out (default: fail)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return p


def _plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


def format_summary(out: str, result: dict) -> str:
    lines = [f"prepared {out} in {result['seconds']:.1f} s ({result['tokens_per_s']:,.0f} tokens/s)"]
    for split, row in result["splits"].items():
        lines.append(f"  {split:<5} {row['docs']:>12,} {_plural(row['docs'], 'document'):<9} {row['tokens']:>16,} "
                     f"{_plural(row['tokens'], 'token'):<6} {row['shards']:>5} {_plural(row['shards'], 'shard')}")
    if result["skipped"]:
        lines.append(f"  skipped {len(result['skipped'])} bad file(s) or line(s); they are listed in index.json")
    return "\n".join(lines)


def small_val_warning(result: dict, args: argparse.Namespace) -> str | None:
    """A warning when the validation split cannot hold one sequence at `parscale train`'s default
    --seq-len: said here, at prepare time, rather than when a training run starts and fails."""
    from parscale.train.config import TrainConfig

    seq_len = TrainConfig.__dataclass_fields__["seq_len"].default
    tokens = result["splits"]["val"]["tokens"]
    if tokens >= seq_len:
        return None
    more = ("larger or more validation files (--data-val-files)" if args.data_val_files else
            f"a larger --data-val-fraction (now {args.data_val_fraction:g}) or separate --data-val-files")
    return (f"parscale data prepare: warning: the validation split holds {tokens:,} tokens, fewer than one "
            f"sequence at the default --seq-len {seq_len} of `parscale train`, which then fails unless "
            f"--seq-len is at most {tokens}; prepare again into a new --out with {more}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: parscale data prepare [options]   (parscale data prepare --help)\n")
        print("\n".join(f"  {name:<8} {text}" for name, text in _SUB.items()))
        return 0 if argv else 2
    if argv[0] not in _SUB:
        raise UserError(f"unknown data command {argv[0]!r}; choose one of: {', '.join(_SUB)}")
    args = build_parser().parse_args(argv[1:])
    from parscale.data.prepare import DataConfig
    from parscale.data.store import prepare_corpus

    cfg = DataConfig(files=tuple(args.data_files or ()), val_files=tuple(args.data_val_files),
                     tokenizer=args.data_tokenizer, vocab_size=args.data_vocab_size, text_field=args.data_text_field,
                     val_fraction=args.data_val_fraction, seed=args.data_seed)
    result = prepare_corpus(cfg, args.out, workers=args.workers, shard_tokens=args.shard_tokens,
                            on_bad_file=args.on_bad_file)
    print(json.dumps(result) if args.json else format_summary(args.out, result))
    warning = small_val_warning(result, args)
    if warning:
        print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
