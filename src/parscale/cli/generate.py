"""`parscale generate`: text from a saved ParScale model, printed as it is produced.

    parscale generate --model runs/tiny/final --prompt "def main(" --max-new-tokens 40
    parscale generate --model DIR --prompt "import " --do-sample --temperature 0.8 --top-p 0.95 --seed 1
    parscale generate --model DIR --prompt "class " --num-beams 4
    parscale generate --model runs/p1/final --streams p4=runs/p4/final-streams --prompt "def "
    parscale generate --model ParScale-1.8B-P4-Inst --chat --system "Be brief." --prompt "What is 2+2?"
    parscale generate --model ParScale-1.8B-P4-Inst --chat --interactive --do-sample --temperature 0.7
    parscale generate --model runs/p4/final --prompt "def " --int8
    parscale generate --model runs/p4/final --prompt "def " --max-new-tokens 200 --compile

Greedy and sampled tokens are printed as they are produced (transformers' `TextStreamer`);
beam search only knows its best sequence at the end, so it prints then. The tokenizer is read
from the model directory unless `--tokenizer DIR` names another one. The model directory may
hold our files, a released `qwen2_parscale` checkpoint or a plain transformers model (which
runs as P = 1); `--streams` loads a stream adapter onto it (see `parscale streams`).
`--int8` quantizes the backbone's weights to int8 after loading (`quantize_int8()`): less
memory and faster CPU decoding, at a small accuracy cost; `--int8-activations` rounds their
inputs to int8 per row too (`quantize_int8(activation_bits=8)`: faster with many streams on
AVX-512 VNNI, a larger accuracy cost).

`--compile` decodes with a static cache and a `torch.compile`d step (CUDA graphs on a GPU): the
first call compiles (seconds on a GPU, a minute or more on a small CPU), then each token is one
graph replay; worth it for long outputs, not for a few tokens.

`--chat` wraps the prompt as a user message in the tokenizer's chat template and prints only
the answer. `--interactive` reads one prompt per line from stdin and answers each; with
`--chat` the conversation so far goes with every turn. It ends on an empty line, `/exit` or
end of input (Ctrl-D).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from parscale.cli.options import Parser, hide
from parscale.errors import UserError

if TYPE_CHECKING:  # torch and transformers are imported only once a command runs
    from transformers import PreTrainedTokenizerBase

    from parscale.model.wrapper import ParScaleForCausalLM

logger = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
DTYPES = ("auto", "float32", "bfloat16", "float16")
EXIT_WORDS = ("", "/exit")


def build_parser() -> argparse.ArgumentParser:
    examples = [line.strip() for line in __doc__.splitlines() if line.startswith("    parscale generate")]
    p = Parser(prog="parscale generate", description=__doc__.split("\n")[0],
                                epilog="examples:\n  " + "\n  ".join(examples),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="directory written by save_pretrained (or a released checkpoint)")
    p.add_argument("--prompt", help="the text to continue (with --chat: the user's message); "
                                    "required unless --interactive")
    hide(p.add_argument("--tokenizer", "--data-tokenizer", help="tokenizer directory (default: the model directory)"),
         "--data-tokenizer")
    p.add_argument("--streams", metavar="[NAME=]ADAPTER_DIR",
                   help="generate with this stream adapter loaded onto the model (e.g. P = 4 streams on a "
                        "P = 1 backbone; see `parscale streams`)")
    p.add_argument("--chat", action="store_true",
                   help="apply the tokenizer's chat template to the prompt (a user message) and print the answer")
    p.add_argument("--system", help="a system message placed before the conversation (with --chat)")
    p.add_argument("--interactive", action="store_true",
                   help="read prompts line by line from stdin and answer each (with --chat: one conversation); "
                        "an empty line, /exit or Ctrl-D ends it")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam decoding")
    p.add_argument("--temperature", type=float, help="sampling temperature > 0 (with --do-sample; default 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (with --do-sample; default 1.0)")
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam search width (default 1 = no beam search); beam search cannot stream, so its "
                        "text is printed when it is done")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="compute dtype (default auto: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto: a GPU if there is one)")
    p.add_argument("--int8", action="store_true",
                   help="weight-only int8 for the backbone and lm_head after loading (CPU decoding reads a quarter "
                        "of the float32 weight bytes; a small accuracy cost, see docs/model.md)")
    p.add_argument("--int8-activations", action="store_true",
                   help="with --int8: round the activations to int8 per row too (W8A8; faster with many streams "
                        "on AVX-512 VNNI CPUs, a larger accuracy cost, see docs/model.md)")
    p.add_argument("--compile", action="store_true",
                   help="static cache + torch.compile'd decode step (CUDA graphs on a GPU); the first call "
                        "compiles, then decoding is faster: worth it for long outputs")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Turn every bad flag combination into one clear UserError before loading anything;
    sets `args.stream_spec` from --streams ((name or None, directory) or None)."""
    from parscale.cli.eval import _stream_specs
    from parscale.cli.model_dir import check_model_dir

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
    if args.int8_activations and not args.int8:
        raise UserError("--int8-activations rounds the activations of int8 layers; add --int8")
    if args.system is not None and not args.chat:
        raise UserError("--system only applies to chat models; add --chat")
    if args.interactive and args.prompt is not None:
        raise UserError("--interactive reads its prompts from stdin; drop --prompt (or --interactive)")
    if not args.interactive and not args.prompt:
        raise UserError("--prompt is missing or empty; give some text to continue, or use --interactive")
    check_model_dir(args.model)  # a run, adapter or data directory is named as such
    args.stream_spec = _stream_specs([args.streams])[0] if args.streams else None


def check_tokenizer_dir(directory: Path, from_flag: bool) -> None:
    """A model dir without a tokenizer is a clear error, raised before the model is loaded."""
    if not directory.is_dir() or not any((directory / name).is_file() for name in TOKENIZER_FILES):
        fix = "check the path" if from_flag else "pass --tokenizer DIR"
        raise UserError(f"no tokenizer in {directory} (looked for {', '.join(TOKENIZER_FILES)}); {fix}")


def generation_kwargs(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, device=None) -> dict:
    """`generate`'s keywords for the flags; `device` (the model's) picks the compile mode of --compile."""
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams)
    if args.do_sample:
        kwargs.update(temperature=args.temperature or 1.0, top_p=args.top_p or 1.0, top_k=0)
    if args.compile:
        from parscale.model.decoding import compiled_generate_kwargs

        kwargs.update(compiled_generate_kwargs(device if device is not None else "cpu"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kwargs["pad_token_id"] = pad
    return kwargs


def load(args: argparse.Namespace) -> tuple[ParScaleForCausalLM, PreTrainedTokenizerBase]:
    """(model, tokenizer): the tokenizer first, so a missing one or chat template fails fast."""
    import torch

    from parscale.cli.eval import _resolve_device
    from parscale.data.tokenizer import load_tokenizer
    from parscale.model.wrapper import ParScaleForCausalLM

    tokenizer_dir = Path(args.tokenizer or args.model)
    check_tokenizer_dir(tokenizer_dir, from_flag=args.tokenizer is not None)
    tokenizer = load_tokenizer(tokenizer_dir, require_eos=False)
    if args.chat and not tokenizer.chat_template:
        raise UserError(f"the tokenizer in {tokenizer_dir} has no chat template, so --chat cannot format "
                        "messages; drop --chat, or pass an instruct model's tokenizer with --tokenizer DIR")
    device = _resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else None
    model = ParScaleForCausalLM.from_pretrained(args.model, torch_dtype=dtype).to(device)
    if args.stream_spec is not None:
        name, directory = args.stream_spec
        model.set_streams(model.load_streams(directory, name=name))
    if args.int8:
        model.quantize_int8(activation_bits=8 if args.int8_activations else 16)
    return model, tokenizer


def encode(model: ParScaleForCausalLM, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace, prompt: str,
           history: list[dict]) -> dict:
    """The model's inputs for one turn: the prompt itself, or with --chat the templated conversation."""
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        messages += history + [{"role": "user", "content": prompt}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    ids = encoded["input_ids"]
    if ids.numel() == 0:
        raise UserError("the prompt encodes to no tokens; give some text the tokenizer knows")
    if int(ids.max()) >= model.config.vocab_size:
        raise UserError(
            f"the tokenizer produced id {int(ids.max())} but the model has vocab_size {model.config.vocab_size}; "
            "pass the tokenizer the model was trained with (--tokenizer DIR)"
        )
    device = model.get_input_embeddings().weight.device
    return {key: encoded[key].to(device) for key in ("input_ids", "attention_mask") if key in encoded}


def respond(model: ParScaleForCausalLM, tokenizer: PreTrainedTokenizerBase, inputs: dict,
            args: argparse.Namespace) -> str:
    """Generate one answer, printing it to stdout as it is produced (at the end for beam search)."""
    import torch
    from transformers import TextStreamer

    # Beam search cannot stream: transformers refuses a streamer there, the best beam is known only at the end.
    streamer = None if args.num_beams > 1 else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(**inputs, streamer=streamer, **generation_kwargs(args, tokenizer, model.device))
    new = out[0, inputs["input_ids"].shape[1]:]
    logger.info("P=%d streams, %d new token%s", model.parscale_config.n_streams, len(new), "" if len(new) == 1 else "s")
    answer = tokenizer.decode(new, skip_special_tokens=True)
    if streamer is None:
        print(answer, flush=True)
    return answer


def interact(model: ParScaleForCausalLM, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace) -> None:
    """Answer stdin line by line; with --chat every turn sees the conversation so far."""
    history: list[dict] = []
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        prompt = line.rstrip("\r\n")
        if not line or prompt.strip() in EXIT_WORDS:
            return
        try:
            answer = respond(model, tokenizer, encode(model, tokenizer, args, prompt, history), args)
        except KeyboardInterrupt:
            print(flush=True)  # end the half-printed answer's line; the CLI then says it was interrupted
            raise
        if args.chat:
            history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import torch

    model, tokenizer = load(args)
    torch.manual_seed(args.seed)
    if args.interactive:
        interact(model, tokenizer, args)
        return 0
    inputs = encode(model, tokenizer, args, args.prompt, [])
    if not args.chat:  # a continuation is printed after the text it continues
        print(args.prompt, end="", flush=True)
    respond(model, tokenizer, inputs, args)
    return 0
