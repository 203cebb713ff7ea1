"""Chat data: conversations rendered with the tokenizer's chat template, the loss on the assistant turns.

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

one conversation per line (JSON Lines). Each conversation becomes its template's tokens
followed by EOS, packed back to back like text documents (`prepare`), with a parallel 0/1
array marking the tokens the loss is on: those that overlap what the assistant's turns add
(their content and whatever the template closes the turn with, e.g. `<|im_end|>`). The
split, the cache and the batch order work as for text, so a run, its resume and its
evaluation treat both alike.

Which tokens are the assistant's is found by rendering the conversation up to each assistant
turn twice, without and with that turn, rather than through `{% generation %}` markers
(`return_assistant_tokens_mask`): released chat templates mostly lack those markers, and
the prefix rule works with any template whose rendering of a conversation's beginning is a
prefix of the whole (checked; a template that rewrites earlier turns is refused).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from parscale.data import corpus, shards
from parscale.data.tokenizer import load_tokenizer
from parscale.errors import UserError

log = logging.getLogger(__name__)

_FORMAT = 2  # bump when the cached chat arrays change meaning (2: a token overlapping a turn is kept)


def read_conversations(path: Path) -> list[list[dict]]:
    """The conversations of one JSON Lines file; a bad line is a UserError naming the file and line."""
    conversations = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not JSON ({err.msg}); --data-format chat reads one "
                                '{"messages": [...]} object per line') from None
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages:
                raise UserError(f'{where}: no "messages" list; each line must be '
                                '{"messages": [{"role": ..., "content": ...}, ...]}')
            for message in messages:
                if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                        and isinstance(message.get("content"), str)):
                    raise UserError(f"{where}: every message needs a string role and content, got {message!r}")
            conversations.append(messages)
    return conversations


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans the assistant turns add to it)."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)  # ends with the assistant header
        upto = _render(tokenizer, messages[:i + 1])
        if not (text.startswith(upto) and upto.startswith(before)):
            raise UserError("the tokenizer's chat template does not render the start of a conversation as a "
                            "prefix of the whole (it rewrites earlier turns), so the assistant's tokens cannot "
                            "be told apart; use a template that renders turns in order")
        spans.append((len(before), len(upto)))
    return text, spans


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, 1 where the token overlaps an assistant turn else 0), without EOS.

    Overlap, not "starts inside": a byte-level BPE joins a header's trailing space to the
    next word (`"Assistant: "` + `"Sure"` gives the token `" Sure"`), and that token is the
    assistant's first word. An empty token counts as one character at its start.
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start < b and max(end, start + 1) > a for a, b in spans))
            for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def pack(tokenizer, conversations: Sequence[list[dict]]) -> tuple[np.ndarray, np.ndarray]:
    """Every conversation's tokens followed by EOS (outside the loss), concatenated: (tokens, mask)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[int] = []
    for messages in conversations:
        conv_ids, conv_mask = encode_conversation(tokenizer, messages)
        ids += conv_ids + [eos]
        mask += conv_mask + [0]
    return (np.asarray(ids, dtype=shards.token_dtype(len(tokenizer))), np.asarray(mask, dtype=np.uint8))


def check_chat_tokenizer(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer in {where} has no chat template, so --data-format chat cannot render "
                        "the conversations; use the tokenizer of a chat model, or set chat_template in its "
                        "tokenizer_config.json")


def _split(cfg, conversations: list[list[dict]]) -> tuple[list, list]:
    keys = [json.dumps(c, sort_keys=True) for c in conversations]
    is_val = corpus.split_keys(keys, cfg.val_fraction, cfg.seed)  # keyed by content, as text documents are
    return ([c for c, v in zip(conversations, is_val) if not v], [c for c, v in zip(conversations, is_val) if v])


def _read_all(paths: Sequence[str]) -> list[list[dict]]:
    return [c for p in corpus.check_files(paths, "chat file") for c in read_conversations(p)]


def _cache_key(cfg, tokenizer) -> str:
    files = corpus.fingerprint([Path(p) for p in (*cfg.files, *cfg.val_files)])
    payload = {"files": files, "n_train_files": len(cfg.files), "val_fraction": cfg.val_fraction, "seed": cfg.seed,
               "tokenizer": shards.tokenizer_hash(tokenizer), "template": tokenizer.chat_template, "format": _FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


_ARRAYS = ("train", "train_mask", "val", "val_mask")


def prepare_chat(cfg, cache_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict, object, Path]:
    """({train, train_mask, val, val_mask} arrays, their counts, tokenizer, cache entry), cached."""
    cfg.check_chat_tokenizer_given()
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_chat_tokenizer(tokenizer, cfg.tokenizer)
    where = Path(cache_dir) / f"chat-{_cache_key(cfg, tokenizer)}"
    if (where / "stats.json").is_file():
        log.info("reusing cached chat data in %s", where)
        arrays = {name: np.load(where / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        return arrays, json.loads((where / "stats.json").read_text()), tokenizer, where
    if cfg.val_files:
        train, val = _read_all(cfg.files), _read_all(cfg.val_files)
    else:
        train, val = _split(cfg, _read_all(cfg.files))
    if not train or not val:
        raise UserError(f"the chat data has {len(train)} training and {len(val)} validation conversations; "
                        "both need at least one (add conversations or give --data-val-files)")
    arrays = {}
    arrays["train"], arrays["train_mask"] = pack(tokenizer, train)
    arrays["val"], arrays["val_mask"] = pack(tokenizer, val)
    for split in ("train", "val"):
        if not arrays[f"{split}_mask"].any():
            files = cfg.val_files if split == "val" and cfg.val_files else cfg.files
            raise UserError(f"no assistant turn in the {split} conversations of {', '.join(files)}: the loss is "
                            'on the assistant\'s tokens only; add messages with "role": "assistant"')
    stats = {"train_docs": len(train), "val_docs": len(val), "train_targets": int(arrays["train_mask"].sum()),
             "val_targets": int(arrays["val_mask"].sum())}
    _write(where, arrays, stats)
    return arrays, stats, tokenizer, where


def _write(where: Path, arrays: dict[str, np.ndarray], stats: dict) -> None:
    """Write the cache entry beside its place, then rename it in (a crash leaves no half entry)."""
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{where.name}.", dir=where.parent))
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "stats.json").write_text(json.dumps(stats))
        if where.exists():
            shutil.rmtree(where)  # an entry without stats.json: left by an interrupted write
        os.replace(tmp, where)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
