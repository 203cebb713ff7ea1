"""`parscale train`: pretrain from scratch, or convert a trained P=1 model and post-train it (text or chat data).

Every `TrainConfig` option is a flag (`--seq-len`, `--P`, ...), every `DataConfig` option a
`--data-*` flag (`--data-files`, `--data-vocab-size`, ...). `--config run.yaml` gives a
file of the same options; flags override it. `--resume RUN_DIR` continues a run from its
own `config.yaml` and its last complete checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from parscale.cli.options import Parser, hide
from parscale.errors import UserError

log = logging.getLogger(__name__)

_HELP = {  # in the user's words; a field without an entry falls back to its comment in TrainConfig
    "out": "run directory: checkpoints, config.yaml, metrics.jsonl, loss.png and the final model in final/",
    "preset": "architecture preset (default: tiny, unless --model-config or --init-from is given)",
    "model_config": "a transformers config.json (file or directory) to train from scratch instead of a preset",
    "init_from": "two-stage training: a trained P=1 model directory to convert to P streams",
    "P": "number of parallel streams", "prefix_tokens": "learnable key/value prefix tokens per stream and layer",
    "attn_smooth": "smoothing of the aggregation weights toward uniform (the paper's epsilon)",
    "prefix_at_p1": "P=1 with one learnable prefix: the control run for the streams",
    "prefix_init_std": "standard deviation of the prefixes' random initialisation",
    "prefix_mlp_hidden": "width of a small MLP that produces the prefixes; 0: learn the prefixes directly",
    "train": "full: every weight learns; streams: the backbone is frozen and only the streams learn",
    "seq_len": "tokens per training sequence",
    "batch_size": "sequences per update, over all processes and accumulation steps",
    "grad_accum": "micro-batches each update is split into (gradient accumulation)",
    "order_start": "sequences of the data order to skip (default: where the --init-from run stopped, else 0)",
    "steps": "optimizer updates in the whole run (a larger value on --resume extends a finished run)",
    "lr": "peak learning rate (AdamW)", "warmup_steps": "warm-up updates (default: 5%% of --steps)",
    "schedule": "learning-rate schedule after warm-up", "min_lr_ratio": "final learning rate as a share of --lr",
    "weight_decay": "AdamW weight decay, on weight matrices only (never prefixes, norms or biases)",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "grad_clip": "clip the gradient norm to this; 0: no clipping",
    "stream_lr_mult": "learning-rate multiplier for the stream parameters (prefixes, aggregation)",
    "stream_similarity_penalty": "weight of a loss term that pushes the streams apart: the mean pairwise "
                                 "max(cos, 0) of their final hidden states; 0: off",
    "eval_every": "measure the held-out loss every N updates; 0: only at the end",
    "eval_tokens": "held-out tokens per evaluation (default: all that --data-val-tokens keeps)",
    "save_every": "write a checkpoint every N updates; 0: only at the end", "keep_last": "checkpoints kept on disk",
    "seed": "seed of the initialisation and the batch order",
    "device": "auto, cpu, cuda, cuda:N or mps; auto: a GPU if there is one (on CUDA, AdamW is fused)",
    "dtype": "auto: bf16 autocast on GPU, float32 on CPU", "fsdp": "shard the model with FSDP under torchrun",
    "grad_checkpoint": "recompute each decoder layer's activations in the backward: less memory for about a "
                       "third more compute, the same loss and gradients",
    "compile": "torch.compile the model for the training forward and backward (the first update compiles; "
               "the CPU needs a C++ compiler, CUDA triton)",
    "peak_tflops": "the device's peak TFLOP/s, for the mfu in metrics.jsonl (default: a known GPU's bf16 "
                   "peak under bf16 autocast; without one, no mfu is logged)",
}
_DATA_HELP = {  # the --data-* flags; a YAML file gives them under `data:` without the prefix
    "source": "stdlib (this Python's standard-library sources), files (--data-files) or dir (--data-dir) "
              "(default: dir with --data-dir, files with --data-files, else stdlib)",
    "files": "your text, JSON Lines or parquet files, or directories of them: a text file is one document, "
             "a JSON line or parquet row one document",
    "text_field": "the JSON/parquet field holding the text",
    "val_files": "separate validation files (default: a hash of each document holds out --data-val-fraction "
                 "of them)",
    "val_fraction": "share of the documents held out for validation when no --data-val-files are given",
    "tokenizer": "a local tokenizer directory (default: the --init-from model's, else a byte-level BPE trained "
                 "on the training split)",
    "vocab_size": "vocabulary size of the BPE trained when no tokenizer is given",
    "val_tokens": "held-out tokens kept for validation; none: all of them",
    "seed": "salt of the train/validation split; keep it fixed across runs you compare (--seed orders the batches)",
    "dir": "a directory made by `parscale data prepare` to train on (its tokenizer comes with it)",
    "format": "text: documents, the loss on every token; chat: JSON Lines conversations, one "
              '{"messages": [{"role": ..., "content": ...}, ...]} per line, rendered with the tokenizer\'s chat '
              "template, the loss on the assistant turns only (needs --data-tokenizer or --init-from)",
}
_METAVAR = {"out": "RUN_DIR", "model_config": "FILE", "init_from": "DIR", "cache_dir": "DIR", "device": "DEVICE",
            "data_files": "FILE_OR_DIR", "data_val_files": "FILE_OR_DIR", "data_tokenizer": "DIR",
            "data_dir": "DIR", "data_text_field": "FIELD"}


def _cache_help() -> str:
    from parscale.cache import cache_dir

    return f"where tokenized data are cached, shared by every run (default: {cache_dir('data')})"


_EPILOG = ("Instruction tuning: --data-format chat --data-files chats.jsonl --data-tokenizer DIR reads one "
           '{"messages": [{"role": ..., "content": ...}, ...]} per line, renders it with the tokenizer\'s chat '
           "template and puts the loss on the assistant turns only (with --init-from, after pretraining). "
           "The saved model also fine-tunes with transformers' Trainer and TRL's SFTTrainer: "
           "ParScaleForCausalLM.from_pretrained(RUN_DIR/final), see the README.")

# Other verbs' spellings of the same options: accepted, not listed in --help.
_ALIASES = {"data_tokenizer": ("--tokenizer",), "data_files": ("--data",)}


def _field_help(cls) -> dict[str, str]:
    """Each field's help from its class: TrainConfig's trailing comments, DataConfig's Args.

    Read from the source, so the help and the dataclass cannot drift apart."""
    import inspect
    import re

    found = {m[1]: m[2].strip() for m in re.finditer(r"^    (\w+): [^\n#]*#\s*(.+)$", inspect.getsource(cls), re.M)}
    args = (inspect.getdoc(cls) or "").partition("Args:")[2]
    for m in re.finditer(r"^    (\w+): (.+(?:\n {8}.+)*)", args, re.M):
        found.setdefault(m[1], " ".join(m[2].split()))
    return {k: v.replace("%", "%%") for k, v in found.items()}


def _choices() -> dict[str, tuple]:
    from parscale.data.config import FORMATS, SOURCES
    from parscale.train.config import DTYPES, TRAIN_MODES
    from parscale.train.presets import PRESETS
    from parscale.train.schedule import SCHEDULES

    return {"preset": tuple(PRESETS), "train": TRAIN_MODES, "schedule": SCHEDULES, "dtype": DTYPES,
            "data_source": SOURCES, "data_format": FORMATS}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _converter(hint: str):
    """A string -> value converter from a dataclass field's annotation (`int | None` -> int)."""
    for key, conv in (("int", int), ("float", float)):
        if hint.startswith(key):
            return conv
    return str


def _add_fields(parser, cls, prefix: str = "") -> None:
    """One flag per field; the help states the field's real default (the test holds it to that)."""
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}  # annotations are strings here
    own = _DATA_HELP if prefix else {**_HELP, "cache_dir": _cache_help()}
    helps, choices = {**_field_help(cls), **own}, _choices()
    for f in dataclasses.fields(cls):
        if f.name == "data":
            continue
        hint, dest = hints[f.name], prefix + f.name
        flags = [_flag(dest), *_ALIASES.get(dest, ())]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = helps.get(f.name, f.name.replace("_", " "))
        if default is not None and default is not False and default not in ("", ()) and "default" not in help_:
            help_ += f" (default: {default})"
        kind: dict = {}
        if dest in choices:
            kind = {"choices": choices[dest]}
        elif hint == "bool":
            kind = {"action": "store_true"}
        elif "tuple" in hint:
            kind = {"nargs": "+", "metavar": _METAVAR.get(dest)}
        else:
            conv = _converter(hint)
            kind = {"type": _none_or(conv), "metavar": _METAVAR.get(dest, {int: "N", float: "X"}.get(conv, dest.upper()))}
        hide(parser.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, help=help_, **kind),
             *_ALIASES.get(dest, ()))


def _none_or(conv):
    def parse(text: str):
        return None if text.lower() == "none" else conv(text)
    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def build_parser() -> argparse.ArgumentParser:
    from parscale.data.config import DataConfig
    from parscale.train.config import TrainConfig

    parser = Parser(
        prog="parscale train", description=__doc__.split("\n\n")[0], epilog=_EPILOG,
    )
    parser.add_argument("--config", metavar="FILE", help="a YAML file of options (flags override it)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    _add_fields(parser, TrainConfig)
    data = parser.add_argument_group("data (in a YAML file, the same options go under data: without the prefix)")
    _add_fields(data, DataConfig, prefix="data_")
    return parser


def resolve_config(argv: list[str]):
    """The run's TrainConfig and whether it resumes: file < flags; a resume reads the run's own."""
    from parscale.train.config import TrainConfig, load_yaml, merge_for_resume

    args = vars(build_parser().parse_args(argv))
    config_file, resume = args.pop("config", None), args.pop("resume", None)
    data_flags = {k[len("data_"):]: v for k, v in list(args.items()) if k.startswith("data_")}
    flags = {k: v for k, v in args.items() if not k.startswith("data_")}
    if resume:
        if config_file:
            raise UserError("--resume reads the run's own config.yaml; drop --config")
        saved_path = Path(resume) / "config.yaml"
        if not saved_path.is_file():
            raise UserError(f"{resume!r} is not a run directory (no config.yaml); check the path "
                            "or start a new run with --out")
        saved = load_yaml(saved_path)
        if data_flags and any(saved.get("data", {}).get(k) != _plain(v) for k, v in data_flags.items()):
            raise UserError("cannot resume with different data options; drop the --data-* flags")
        if "out" in flags and Path(flags["out"]).resolve() != Path(resume).resolve():
            raise UserError("--resume RUN_DIR and --out name different directories; drop --out")
        fields = merge_for_resume(saved, flags)
        fields["out"] = str(resume)
        return TrainConfig.from_dict(fields), True
    fields = load_yaml(config_file) if config_file else {}
    fields.update(flags)
    if data_flags:
        fields["data"] = {**(fields.get("data") or {}), **data_flags}
        if data_flags.get("files") and "source" not in data_flags:
            fields["data"]["source"] = "files"  # giving files means training on them
        if data_flags.get("dir") and "source" not in data_flags:
            fields["data"]["source"] = "dir"  # and a prepared directory, on its shards
    return TrainConfig.from_dict(fields), False


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def main(argv: list[str]) -> int:
    from parscale.atomic import check_writable

    cfg, resume = resolve_config(argv)  # `--help` ends here, before torch is imported
    if cfg.init_from and not resume:  # a run, an adapter or data given as a model: named before any work
        from parscale.cli.model_dir import check_model_dir

        check_model_dir(cfg.init_from, "--init-from")
    check_writable(cfg.out, "--out", folder=True)
    from parscale.train.loop import train
    if not _is_main():  # under torchrun, rank 0 alone reports progress
        logging.getLogger("parscale").setLevel(logging.WARNING)
    train(cfg, resume=resume)  # logs where the final model went
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
