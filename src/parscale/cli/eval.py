"""`parscale eval`: held-out loss, perplexity and bits per byte of a model and its stream sets.

    parscale eval --model runs/tiny/final                      # stdlib validation split
    parscale eval --model runs/tiny/final --data notes/*.txt --split all --json
    parscale eval --model runs/tiny-p1/final --streams p2=runs/p2/final-streams p4=runs/p4/final-streams

With `--streams`, the backbone is loaded once and every stream set (an adapter directory, see
`parscale streams`) is evaluated on the same tokens, with the model as loaded first: one row
each in one table. Bits per byte divide the summed NLL (in bits) of the predictions by the
UTF-8 bytes of the predicted tokens.

The data are tokenized with the tokenizer saved beside the model (or `--tokenizer DIR`),
and split exactly as training splits them. When the model sits in a training run
(RUN_DIR/final or a checkpoint below RUN_DIR), the run's config.yaml supplies the
defaults (its data, split, sequence length and validation size), so plain
`parscale eval --model RUN_DIR/final` measures what the run called val_loss.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from parscale.cache import cache_dir
from parscale.cli.model_dir import check_adapter_dir, check_model_dir
from parscale.cli.options import Parser, hide
from parscale.errors import UserError

DEFAULT_MAX_TOKENS = 131072  # the validation size of training runs

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/parscale/data` (usually ~/.cache/parscale/data), shared with training."""
    return cache_dir("data")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="parscale eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a saved model directory (config.json + model.safetensors)")
    hide(p.add_argument("--data-files", "--data", dest="data", nargs="+", metavar="stdlib|FILE",
                   help="'stdlib' (the default corpus) or local text/JSONL/parquet files or directories "
                        "(default: the training run's data, else stdlib)"), "--data")
    p.add_argument("--split", choices=("val", "train", "all"), default="val",
                   help="which documents: val (the validation split), train (the training split) or all (default: val)")
    hide(p.add_argument("--tokenizer", "--data-tokenizer", dest="tokenizer",
                        help="a local tokenizer directory (default: the one saved with the model)"), "--data-tokenizer")
    hide(p.add_argument("--data-text-field", "--text-field", dest="text_field", help="JSON/parquet field holding the text (default: the run's, else text)"), "--text-field")
    hide(p.add_argument("--data-val-fraction", "--val-fraction", dest="val_fraction", type=float, help="held-out share of documents (default: the run's, else 0.02)"), "--val-fraction")
    hide(p.add_argument("--data-seed", "--split-seed", dest="split_seed", type=int, help="salt of the train/val split hash (default: the run's, else 0)"), "--split-seed")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run's, else the model's "
                                               "maximum up to 1024)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    hide(p.add_argument("--eval-tokens", "--max-tokens", dest="max_tokens", type=int, metavar="N",
                        help=f"evaluate the first N tokens of the split (default: the run's validation size, "
                             f"else {DEFAULT_MAX_TOKENS}; 0: all)"), "--max-tokens")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto: a GPU if there is one)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"where tokenized data are cached (default: {default_cache_dir()})")
    p.add_argument("--streams", nargs="+", default=[], metavar="NAME=ADAPTER_DIR",
                   help="stream adapters to evaluate on the same backbone and tokens, one row each "
                        "(NAME= is optional; default name p{P})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device {name!r}: {err}; use cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    return device


def _tokenizer_dir(args) -> Path:
    tok_dir = Path(args.tokenizer or args.model).expanduser()
    if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
        raise UserError(f"no tokenizer in {tok_dir} (no tokenizer.json); training saves it beside the "
                        "weights, otherwise give one with --tokenizer DIR")
    return tok_dir


def _load_model(directory: Path, device):
    from parscale.model.wrapper import ParScaleForCausalLM

    return ParScaleForCausalLM.from_pretrained(directory).to(device)


def run_settings(model_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """The training run's config.yaml above `model_dir` (RUN_DIR/final, RUN_DIR/checkpoints/X), if any."""
    import yaml

    for parent in (model_dir.parent, model_dir.parent.parent):
        path = parent / "config.yaml"
        if path.is_file():
            try:
                raw = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                return None, {}
            if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
                return path, raw
    return None, {}


def fill_defaults(args, run: dict[str, Any]) -> None:
    """Unset options take the training run's values, else the built-in defaults."""
    data = run.get("data", {})
    # A run trained on a prepared directory (--data-dir) is evaluated on that directory's split.
    args.data_dir = data.get("dir") if args.data is None and data.get("source") == "dir" else None
    if args.data is None:
        files = data.get("files") if data.get("source") == "files" else None
        args.data, args.val_files = (list(files), list(data.get("val_files") or [])) if files else (["stdlib"], [])
    else:
        args.val_files = []
    args.text_field = args.text_field or data.get("text_field") or "text"
    args.val_fraction = args.val_fraction if args.val_fraction is not None else data.get("val_fraction", 0.02)
    args.split_seed = args.split_seed if args.split_seed is not None else data.get("seed", 0)
    if args.seq_len is None and isinstance(run.get("seq_len"), int):
        args.seq_len = run["seq_len"]
    if args.max_tokens is None:
        caps = [c for c in (data.get("val_tokens"), run.get("eval_tokens")) if isinstance(c, int)]
        args.max_tokens = min(caps) if caps else (0 if run else DEFAULT_MAX_TOKENS)


def _data_config(args, tok_dir: Path):
    from parscale.data.config import DataConfig

    if args.data_dir:
        return DataConfig(dir=args.data_dir, tokenizer=str(tok_dir), val_tokens=None)
    stdlib = args.data == ["stdlib"]
    return DataConfig(source="stdlib" if stdlib else "files", files=() if stdlib else tuple(args.data),
                      val_files=() if stdlib else tuple(args.val_files), text_field=args.text_field,
                      val_fraction=args.val_fraction, tokenizer=str(tok_dir), val_tokens=None, seed=args.split_seed)


def _tokens(cfg, split: str, cache_dir: Path):
    """(token array, document count, vocabulary size) of the chosen split."""
    from parscale.data import corpus
    from parscale.data import prepare as data_mod
    from parscale.data.tokenizer import load_tokenizer

    if split == "all" and cfg.source == "dir":
        raise UserError(f"--split all reads the source files; the run trained on the prepared directory "
                        f"{cfg.dir}: evaluate its val or train split, or give the files with --data")
    if split == "all":  # every document, unsplit: not a training artefact, so not cached
        tok = load_tokenizer(cfg.tokenizer)
        if cfg.source == "stdlib":
            docs = [text for _, text in corpus.read_stdlib_documents(corpus.stdlib_files())]
        else:
            docs = corpus.load_documents(cfg.files, cfg.text_field, cache_dir / "hf_datasets")
            if cfg.val_files:
                docs += corpus.load_documents(cfg.val_files, cfg.text_field, cache_dir / "hf_datasets")
        return data_mod.tokenize_documents(docs, tok), len(docs), len(tok)
    tokens, info, tok, _ = data_mod.prepare_split(cfg, cache_dir, split)
    return tokens, info["docs"], len(tok)


def evaluate(args) -> dict:
    """Run the evaluation described by parsed `args`; returns the result record."""
    from parscale.data import corpus
    from parscale.data.batches import check_seq_len, check_vocab_size, count_predictions

    model_dir = check_model_dir(args.model)  # a run, adapter or data directory is named as such
    run_path, run = run_settings(model_dir)
    if run_path is not None:
        log.info("defaults from the training run's %s", run_path)
    fill_defaults(args, run)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_tokens < 0:
        raise UserError(f"--eval-tokens must be 0 (all) or more, got {args.max_tokens}")
    if args.data != ["stdlib"]:
        corpus.check_files(args.data + args.val_files)  # a misspelt path fails before the model loads
    specs = _stream_specs(args.streams)
    tok_dir = _tokenizer_dir(args)
    cfg = _data_config(args, tok_dir)
    device = _resolve_device(args.device)
    model = _load_model(model_dir, device)
    max_pos = getattr(model.config, "max_position_embeddings", None) or 1024
    seq_len = args.seq_len if args.seq_len is not None else min(max_pos, 1024)
    check_seq_len(seq_len, model.config)
    tokens, n_docs, vocab = _tokens(cfg, args.split, args.cache_dir or default_cache_dir())
    check_vocab_size(vocab, model.config)
    if args.max_tokens:
        tokens = tokens[:args.max_tokens]
    if len(tokens) < 2:
        raise UserError(f"the {args.split} split holds {len(tokens)} tokens; nothing to evaluate")
    rows = evaluate_sets(model, specs, tokens, seq_len, args.batch_size, device,
                         _predicted_bytes(tokens, seq_len, cfg.tokenizer))
    named = {"stdlib": "stdlib", "dir": cfg.dir}.get(cfg.source, list(cfg.files))
    return {"model": str(model_dir), "data": named,
            "split": args.split, "documents": n_docs, "tokens": int(len(tokens)),
            "predictions": count_predictions(len(tokens), seq_len), "seq_len": seq_len,
            **{k: rows[0][k] for k in ("loss", "perplexity", "bits_per_byte", "seconds")}, "sets": rows}


def _stream_specs(values: list[str]) -> list[tuple[str | None, Path]]:
    """`NAME=DIR` or `DIR` -> (name or None, directory); every directory must be an adapter."""
    specs = []
    for value in values:
        name, _, directory = value.rpartition("=") if "=" in value else ("", "", value)
        specs.append((name or None, check_adapter_dir(directory)))
    return specs


def _predicted_bytes(tokens, seq_len: int, tokenizer_dir: str) -> int:
    """UTF-8 bytes of the tokens that are predicted (all but the first of each seq_len window)."""
    from parscale.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir, require_eos=False)
    ids = [int(t) for t in tokens]
    firsts = sum(len(tok.decode(ids[s:s + 1]).encode()) for s in range(0, len(ids), seq_len))
    return max(1, len(tok.decode(ids).encode()) - firsts)


def evaluate_sets(model, specs, tokens, seq_len: int, batch_size: int, device, n_bytes: int) -> list[dict]:
    """One row per stream set (the model as loaded first), all on the same tokens."""
    import time

    from parscale.data.batches import count_predictions, evaluate_loss
    from parscale.progress import progress

    names = [model.active_streams or "base"]
    names += [model.load_streams(directory, name=name) for name, directory in specs]
    predictions = count_predictions(len(tokens), seq_len)
    rows = []
    for name in progress(names, desc="stream sets", unit="set", disable=len(names) == 1):
        model.set_streams(None if name == "base" else name)
        start = time.perf_counter()
        loss = evaluate_loss(model, tokens, seq_len=seq_len, batch_size=batch_size, max_tokens=None, device=device)
        rows.append({"streams": name, "P": model.parscale_config.n_streams, "loss": loss,
                     "perplexity": math.exp(min(loss, 700.0)),
                     "bits_per_byte": loss * predictions / math.log(2) / n_bytes, "predictions": predictions,
                     "seconds": time.perf_counter() - start})
    return rows


def format_table(result: dict) -> str:
    data = result["data"] if isinstance(result["data"], str) else ", ".join(result["data"])
    docs = f"{result['documents']:,} document{'' if result['documents'] == 1 else 's'}"
    head = [("model", result["model"]), ("data", f"{data} ({result['split']} split, {docs})"),
            ("tokens", f"{result['tokens']:,} ({result['predictions']:,} predictions, seq_len {result['seq_len']})")]
    lines = [f"{name:<7} {value}" for name, value in head]
    lines += ["", f"{'streams':<10} {'P':>2} {'loss':>8} {'perplexity':>11} {'bits/byte':>9} {'tokens':>9} {'seconds':>8}"]
    lines += [f"{r['streams']:<10} {r['P']:>2} {r['loss']:>8.4f} {r['perplexity']:>11.2f} {r['bits_per_byte']:>9.4f} "
              f"{r['predictions']:>9,} {r['seconds']:>8.1f}" for r in result["sets"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    result = evaluate(args)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
