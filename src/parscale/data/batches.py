"""Batches from a packed token array, and the exact held-out loss.

`batch_at` is a pure function of (tokens, step, seed, batch size, sequence length, rank,
world size): it keeps no iterator state, so a resumed run sees exactly the batches an
uninterrupted run would, and a run on W processes sees the same global batch as a run
on one process (rank r takes its rows of it).
"""
from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from parscale.errors import UserError
from parscale.progress import progress


def num_chunks(n_tokens: int, seq_len: int) -> int:
    """How many whole `seq_len` chunks a packed array holds (the tail is dropped in training)."""
    return n_tokens // seq_len


def check_batch(tokens: np.ndarray, batch_size: int, seq_len: int, split: str = "train") -> None:
    """UserError unless `tokens` holds at least one full batch of distinct sequences."""
    if batch_size < 1 or seq_len < 2:
        raise UserError(f"batch size must be >= 1 and sequence length >= 2 (got {batch_size} and {seq_len})")
    need = batch_size * seq_len
    if len(tokens) < need:
        raise UserError(f"the {split} split has {len(tokens):,} tokens, fewer than one batch of "
                        f"{batch_size} x {seq_len} = {need:,}; give more data or lower --batch-size/--seq-len")


def check_val(tokens: np.ndarray, seq_len: int, fix: str | None = None) -> None:
    """UserError unless the validation split holds at least one full sequence; `fix` says how
    to get more validation tokens where the data came from (default: the --data-* options)."""
    if len(tokens) < seq_len:
        fix = fix or "give more validation data (--data-val-files) or a larger --data-val-fraction"
        raise UserError(f"the validation split has {len(tokens):,} tokens, fewer than one sequence of "
                        f"{seq_len} (--seq-len); {fix}, or lower --seq-len to at most {len(tokens)}")


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which chunks are visited in `epoch`: a fresh seeded shuffle per epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_chunk_ids(n: int, step: int, batch_size: int, seed: int, first_row: int = 0) -> np.ndarray:
    """Chunk indices of the global batch at `step`: rows first_row + step*B .. + B-1 of the endless
    sequence epoch 0 permutation, epoch 1 permutation, ... (a batch may straddle two epochs)."""
    start = first_row + step * batch_size
    rows = np.arange(start, start + batch_size, dtype=np.int64)
    epochs, pos = np.divmod(rows, n)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = epoch_permutation(n, seed, int(epoch))[pos[mask]]
    return out


def batch_at(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int = 0,
             rank: int = 0, world_size: int = 1, first_row: int = 0) -> torch.Tensor:
    """This rank's rows of the global batch for `step`: a LongTensor [batch_size // world_size, seq_len].

    Labels are the inputs themselves (the model shifts them). `batch_size` is the global
    batch; it must divide evenly among the `world_size` ranks. `first_row` skips that many
    sequences of the order: a run started from another continues where that one stopped.

    >>> x = batch_at(np.arange(1000), step=3, batch_size=4, seq_len=8, seed=0)
    >>> tuple(x.shape)
    (4, 8)
    """
    if step < 0 or first_row < 0:
        raise ValueError(f"step and first_row must be >= 0, got {step} and {first_row}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in range for world size {world_size}")
    if batch_size % world_size:
        raise UserError(f"the global batch size {batch_size} does not divide among {world_size} processes; "
                        f"use a multiple of {world_size}")
    check_batch(tokens, batch_size, seq_len)
    ids = global_chunk_ids(num_chunks(len(tokens), seq_len), step, batch_size, seed, first_row)
    local = batch_size // world_size
    ids = ids[rank * local:(rank + 1) * local]  # this rank's contiguous rows of the global batch
    starts = ids * seq_len
    rows = np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts])  # (b, L)
    return torch.from_numpy(rows)


def masked_labels(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Labels for a batch: the inputs, with -100 (ignored by the loss) where `mask` is 0.

    `mask` holds the rows `batch_at` gives for the same step from the 0/1 loss-mask array
    (chat data: 1 on the assistant's tokens); None keeps every token in the loss."""
    return x if mask is None else x.masked_fill(mask == 0, -100)


def order_fingerprint(tokens: np.ndarray) -> str:
    """A short hash that tells one packed training array from another: its length and 256
    evenly spaced blocks of 4,096 tokens (a few contiguous reads, even of a huge memory map)."""
    digest = hashlib.sha256(f"{len(tokens)}:{np.dtype(tokens.dtype).str}".encode())
    block, count = 4096, 256
    for start in np.linspace(0, max(0, len(tokens) - block), num=count, dtype=np.int64):
        digest.update(np.ascontiguousarray(tokens[start:start + block]).tobytes())
    return digest.hexdigest()[:16]


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The validation tokens in order, each token once: full [b, seq_len] batches, then the
    leftover tail (if it has at least 2 tokens, i.e. one prediction) as a [1, tail] batch."""
    if batch_size < 1 or seq_len < 2:
        raise UserError(f"batch size must be >= 1 and sequence length >= 2 (got {batch_size} and {seq_len})")
    n = num_chunks(len(tokens), seq_len)
    for first in range(0, n, batch_size):
        last = min(first + batch_size, n)
        block = np.asarray(tokens[first * seq_len:last * seq_len], dtype=np.int64)
        yield torch.from_numpy(block.reshape(last - first, seq_len))  # (b, L)
    tail = np.asarray(tokens[n * seq_len:], dtype=np.int64)
    if len(tail) >= 2:
        yield torch.from_numpy(tail.reshape(1, -1))  # (1, tail)


def count_predictions(n_tokens: int, seq_len: int) -> int:
    """How many next-token predictions `val_batches` makes over `n_tokens` tokens."""
    n, tail = divmod(n_tokens, seq_len)
    return n * (seq_len - 1) + max(tail - 1, 0)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=x)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def evaluate_nll(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 mask: np.ndarray | None = None) -> tuple[float, int]:
    """(sum of next-token NLLs in nats, number of predictions) over this rank's share of `tokens`.

    With a 0/1 `mask` beside the tokens, only predictions of tokens where it is 1 count.

    The batches of `val_batches` are dealt round-robin: rank r takes batches r, r+W, r+2W, ...
    so the shares partition the tokens and summing the pairs over ranks gives the exact
    loss of one process. Every rank makes the same number of forward calls (a rank short of
    one repeats its first batch and discards it), so a model whose forward is a collective,
    as under FSDP, never waits for a rank that has finished.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in range for world size {world_size}")
    n_chunks, tail = divmod(len(tokens), seq_len)
    n_batches = -(-n_chunks // batch_size) + (1 if tail >= 2 else 0)
    calls = -(-n_batches // world_size)  # forward calls per rank: the largest share
    total, count, first = 0.0, 0, None
    masks = val_batches(mask, seq_len, batch_size) if mask is not None else itertools.repeat(None)
    mine = itertools.islice(zip(val_batches(tokens, seq_len, batch_size), masks), rank, None, world_size)
    for x, m in progress(mine, total=calls, desc="evaluating", unit="batch", leave=False,
                         disable=rank != 0 or calls < 8):  # a bar where a long evaluation is worth watching
        first = x if first is None else first
        x = x.to(device)
        target = masked_labels(x, None if m is None else m.to(device))[:, 1:]  # (b, T-1), -100: not scored
        logits = _logits(model, x)[:, :-1].float()  # (b, T-1, V): position t predicts t+1
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        total += float(nll.double())
        count += int((target != -100).sum())
        calls -= 1
    for _ in range(calls):  # keep in step with the ranks that hold one batch more
        _logits(model, (first if first is not None else torch.from_numpy(
            np.asarray(tokens[:seq_len], dtype=np.int64))[None]).to(device))
    return total, count


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int,
                  max_tokens: int | None = None, device: str | torch.device = "cpu",
                  reduce: Callable[[list[float]], list[float]] | None = None, rank: int = 0,
                  world_size: int = 1, mask: np.ndarray | None = None) -> float:
    """Mean next-token NLL in nats over the first `max_tokens` tokens (all when None).

    Every prediction counts once, whatever batch it falls in: the sum of per-token NLLs
    (accumulated in float64) divided by the number of predictions, so a short tail batch
    weighs by its tokens, not as a whole batch. `batch_size` rows go into each forward call.
    With `world_size` > 1 each rank evaluates its share (`evaluate_nll`) and
    `reduce([nll, count])` must return the sums over ranks. The model is put in eval mode
    for the call and given back in the mode it came in. A 0/1 `mask` beside the tokens
    (chat data) restricts the mean to the predictions of tokens where it is 1.
    """
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
        mask = None if mask is None else mask[:max_tokens]
    if len(tokens) < 2:
        raise UserError(f"evaluation needs at least 2 tokens, got {len(tokens)}")
    if batch_size < 1 or seq_len < 2:
        raise UserError(f"batch size must be >= 1 and sequence length >= 2 (got {batch_size} and {seq_len})")
    was_training = model.training
    model.eval()
    try:
        total, count = evaluate_nll(model, tokens, seq_len, batch_size, device, rank, world_size, mask)
    finally:
        model.train(was_training)
    if reduce is not None:
        total, count = reduce([total, float(count)])
    if count == 0:
        raise UserError("the evaluated tokens hold no token the loss is on (chat data: no assistant token); "
                        "evaluate more tokens")
    loss = total / count
    if not math.isfinite(loss):
        raise FloatingPointError(f"the evaluation loss is {loss}: the model produces non-finite logits")
    return loss


def _max_positions(model_config) -> int | None:
    """`max_position_embeddings` of a config, looking into a nested backbone config if needed."""
    for cfg in (model_config, *(getattr(model_config, a, None) for a in ("backbone", "base_config", "text_config"))):
        value = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        if isinstance(value, int):
            return value
    return None


def check_seq_len(seq_len: int, model_config) -> None:
    """UserError if `seq_len` is above the model's `max_position_embeddings`."""
    if seq_len < 2:
        raise UserError(f"the sequence length must be at least 2 (one prediction), got {seq_len}")
    limit = _max_positions(model_config)
    if limit is not None and seq_len > limit:
        raise UserError(f"sequence length {seq_len} is above the model's maximum of {limit} positions "
                        f"(max_position_embeddings); use --seq-len {limit} or less")


def check_vocab_size(vocab_size: int, model_config) -> None:
    """UserError if the tokenizer has more tokens than the model's embedding table."""
    limit = None
    for cfg in (model_config, *(getattr(model_config, a, None) for a in ("backbone", "base_config", "text_config"))):
        value = getattr(cfg, "vocab_size", None) if cfg is not None else None
        if isinstance(value, int):
            limit = value
            break
    if limit is not None and vocab_size > limit:
        raise UserError(f"the tokenizer has {vocab_size} tokens but the model's vocabulary holds {limit}; "
                        f"use a tokenizer with at most {limit} tokens (--data-vocab-size) or a model with a larger vocab_size")
