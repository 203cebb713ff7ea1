"""A one-character-per-token tokenizer the tests build in-process (nothing is downloaded)."""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHARS = string.ascii_lowercase + string.digits + " ():=.,_\n"


def char_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(chars)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>")
