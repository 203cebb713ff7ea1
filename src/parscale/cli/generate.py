"""`parscale generate`: text from a saved ParScale model (greedy, sampling or beam search).

    parscale generate --model runs/tiny/final --prompt "def main(" --max-new-tokens 40
    parscale generate --model DIR --prompt "import " --do-sample --temperature 0.8 --top-p 0.95 --seed 1
    parscale generate --model DIR --prompt "class " --num-beams 4

The tokenizer is read from the model directory unless `--tokenizer DIR` names another one.
The model directory may hold our files, a released `qwen2_parscale` checkpoint or a plain
transformers model (which runs as P = 1).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from parscale.errors import UserError

logger = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parscale generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="directory written by save_pretrained (or a released checkpoint)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam decoding")
    p.add_argument("--temperature", type=float, help="sampling temperature > 0 (with --do-sample; default 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (with --do-sample; default 1.0)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1 = no beam search)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="compute dtype (default auto: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto: a GPU if there is one)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Turn every bad flag combination into one clear UserError before loading anything."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise UserError(f"--num-beams must be >= 1, got {args.num_beams}")
    if not args.do_sample and (args.temperature is not None or args.top_p is not None):
        raise UserError("--temperature and --top-p only apply when sampling; add --do-sample")
    if args.temperature is not None and args.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}; use greedy decoding (no --do-sample) for 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt:
        raise UserError("--prompt is empty; give some text to continue")
    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model} is not a directory; pass the directory written by save_pretrained")


def check_tokenizer_dir(directory: Path, from_flag: bool) -> None:
    """A model dir without a tokenizer is a clear error, raised before the model is loaded."""
    if not directory.is_dir() or not any((directory / name).is_file() for name in TOKENIZER_FILES):
        fix = "check the path" if from_flag else "pass --tokenizer DIR"
        raise UserError(f"no tokenizer in {directory} (looked for {', '.join(TOKENIZER_FILES)}); {fix}")


def generation_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams)
    if args.do_sample:
        kwargs.update(temperature=args.temperature or 1.0, top_p=args.top_p or 1.0, top_k=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kwargs["pad_token_id"] = pad
    return kwargs


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import torch

    from parscale.model.wrapper import ParScaleForCausalLM
    from parscale.data.tokenizer import load_tokenizer

    tokenizer_dir = Path(args.tokenizer or args.model)
    check_tokenizer_dir(tokenizer_dir, from_flag=args.tokenizer is not None)
    from parscale.cli.eval import _resolve_device

    device = _resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else None
    model = ParScaleForCausalLM.from_pretrained(args.model, torch_dtype=dtype).to(device)
    tokenizer = load_tokenizer(tokenizer_dir, require_eos=False)
    encoded = tokenizer(args.prompt, return_tensors="pt")
    ids = encoded["input_ids"].to(device)
    if ids.numel() == 0:
        raise UserError("the prompt encodes to no tokens; give some text the tokenizer knows")
    if int(ids.max()) >= model.config.vocab_size:
        raise UserError(
            f"the tokenizer produced id {int(ids.max())} but the model has vocab_size {model.config.vocab_size}; "
            "pass the tokenizer the model was trained with (--tokenizer DIR)"
        )
    torch.manual_seed(args.seed)
    with torch.no_grad():
        mask = encoded.get("attention_mask")
        out = model.generate(ids, attention_mask=None if mask is None else mask.to(device),
                             **generation_kwargs(args, tokenizer))
    logger.info("P=%d streams, %d new tokens", model.parscale_config.n_streams, out.shape[1] - ids.shape[1])
    print(args.prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0
