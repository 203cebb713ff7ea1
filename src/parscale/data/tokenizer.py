"""The tokenizer: a byte-level BPE trained on the training split, or a local tokenizer directory.

Either way the result is a `transformers` fast tokenizer, so it saves beside the model
with `save_pretrained` and loads back with `AutoTokenizer.from_pretrained(dir)`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sized
from pathlib import Path

from parscale.errors import UserError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB = 257  # 256 byte symbols + the EOS token: the smallest byte-level vocabulary
_META = "parscale_tokenizer.json"


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) with `<|endoftext|>` as EOS.

    Byte-level means every string is encodable (no unknown token), which matters for
    source code full of rare symbols. `texts` may be a stream: the trainer keeps word
    counts, not the documents.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise UserError(f"vocab_size {vocab_size} is too small for a byte-level BPE; use at least {MIN_VOCAB}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    counted = _Counted(texts)
    tok.train_from_iterator(counted, trainer=trainer, length=len(texts) if isinstance(texts, Sized) else None)
    log.info("trained a byte-level BPE with %d tokens on %d documents", tok.get_vocab_size(), counted.n)
    if tok.get_vocab_size() < vocab_size:
        log.warning("the corpus only supports %d BPE tokens (%d were asked for): it is small",
                    tok.get_vocab_size(), vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


class _Counted:
    """An iterable that counts what it yields (for the log line of a streamed training set)."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.n = texts, 0

    def __iter__(self):
        for text in self.texts:
            self.n += 1
            yield text


def load_tokenizer(directory: str | os.PathLike, require_eos: bool = True):
    """A local tokenizer directory through `AutoTokenizer` (local files only, no remote code).

    Packing needs an EOS token between documents (`require_eos`); generation does not.
    AutoTokenizer also reads a model's config.json, and warns that it does not know the
    `qwen2_parscale` model type; that warning is muted here. Passing the backbone config
    instead would be wrong: it makes AutoTokenizer pick the backbone's tokenizer class,
    which tokenizes our byte-level BPE differently.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise UserError(f"the tokenizer directory {str(directory)!r} does not exist; give a local "
                        "directory holding tokenizer.json (nothing is downloaded)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"cannot load a tokenizer from {path}: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    if not getattr(tok, "is_fast", False):
        raise UserError(f"the tokenizer in {path} is not a fast (tokenizers-backed) tokenizer; "
                        "save it with tokenizer.json")
    if require_eos and tok.eos_token_id is None:
        raise UserError(f"the tokenizer in {path} has no EOS token, which separates packed documents; "
                        "set eos_token in its tokenizer_config.json")
    return tok


def save_tokenizer(tok, directory: Path, meta: dict) -> None:
    """Save `tok` plus a small metadata file into `directory`, atomically (temp dir, then rename)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tok.save_pretrained(str(tmp))
        (tmp / _META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if directory.exists() and not (directory / _META).is_file():
            shutil.rmtree(directory)  # an incomplete copy from an interrupted run
        try:
            os.replace(tmp, directory)
        except OSError:
            if not (directory / _META).is_file():  # not a complete copy written meanwhile by another process
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_cached_tokenizer(directory: Path, vocab_size: int):
    """The tokenizer cached in `directory` if complete and of the requested size, else None."""
    meta_path = directory / _META
    if not (directory / "tokenizer.json").is_file() or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("vocab_size") != vocab_size:
        log.warning("cached tokenizer in %s has vocab_size %s, not %s: retraining",
                    directory, meta.get("vocab_size"), vocab_size)
        return None
    tok = load_tokenizer(directory)
    if len(tok) > vocab_size:
        log.warning("cached tokenizer in %s has %d tokens (> %d): retraining", directory, len(tok), vocab_size)
        return None
    return tok
