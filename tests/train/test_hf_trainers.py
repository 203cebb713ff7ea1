"""Fine-tuning a ParScale model with transformers' `Trainer` and TRL's `SFTTrainer`, offline.

Every loss the trainers compute is checked against an independent one: each sequence run
alone (unpadded, one forward per sequence) through the model, scored with a float64
cross-entropy over the tokens a hand-written rule marks as targets (`_chatkit`: the toy
chat template shows which characters are the assistant's).
"""
from __future__ import annotations

import pytest
import torch
from _chatkit import assistant_chars, chat_tokenizer
from datasets import Dataset

from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale

CONVERSATIONS = [
    [("user", "12 3"), ("assistant", "abc"), ("user", "45"), ("assistant", "de fgh")],
    [("user", "7"), ("assistant", "xyz uv")],
    [("user", "890 1"), ("assistant", "k")],
    [("user", "2 2"), ("assistant", "four"), ("user", "3"), ("assistant", "three it is")],
]
TEXTS = ["def f(x):\n    return x", "a = 1", "print(a, b)\nc = 22", "import os"]


def _messages(turns):
    return [{"role": role, "content": content} for role, content in turns]


@pytest.fixture
def tok():
    return chat_tokenizer()


def _model(tiny_factory, tok, n_streams: int, seed: int = 0):
    base = tiny_factory("qwen2", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = to_parscale(base, ParScaleConfig(n_streams=n_streams, n_prefix_tokens=4), seed=seed)
    # Large prefixes and non-zero aggregation weights, so that the streams, and where each query
    # sits relative to the prefix, visibly change every loss (the N(0, 0.02) init barely does).
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.stream_parameters():
            if "prefix" in name or "aggregate_layer.2" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model.train()


def reference_loss(model, rows: list[list[int]], targets: list[list[bool]]) -> float:
    """Token-weighted mean NLL: each row alone, float64; position t scores token t+1 if targets[t+1]."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, keep in zip(rows, targets):
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (L, V)
            logp = logits[:-1].log_softmax(-1)
            nxt = torch.tensor(ids[1:])
            chosen = torch.tensor(keep[1:])
            total -= float(logp[torch.arange(len(nxt)), nxt][chosen].sum())
            count += int(chosen.sum())
    return total / count


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, logging_steps=1, per_device_train_batch_size=4, max_steps=1)
    return TrainingArguments(**{**base, **kw})


def _lm_trainer(model, tok, tmp_path, padding_side="right", **kw):
    from transformers import DataCollatorForLanguageModeling, Trainer

    tok.padding_side = padding_side
    rows = [{"input_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TEXTS]
    return Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=Dataset.from_list(rows),
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False))


def test_base_model_then_lm_head_is_the_model(tiny_factory, tok):
    """What TRL's fused LM head computes: `base_model` (the whole ParScale body), then `lm_head`."""
    model = _model(tiny_factory, tok, 2).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])
    mask = (ids != 0).long()  # one left-padded row
    with torch.no_grad():
        body = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        assert body.last_hidden_state.shape == (2, 5, 32)  # B rows, aggregated over the streams
        torch.testing.assert_close(model.lm_head(body.last_hidden_state),
                                   model(input_ids=ids, attention_mask=mask).logits)
    assert model.base_model.config is model.model.config  # other reads go to the decoder


# ---------------------------------------------------------------- transformers.Trainer
def test_trainer_trains_every_weight(tiny_factory, tok, tmp_path):
    model = _model(tiny_factory, tok, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _lm_trainer(model, tok, tmp_path, max_steps=6, learning_rate=1e-2, num_train_epochs=6)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses  # the same 4 rows each step
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()), "a weight did not learn"
    # Trainer's own save writes our format: the trained model comes back with its streams
    from parscale.model.wrapper import ParScaleForCausalLM

    trainer.save_model(str(tmp_path / "saved"))
    again = ParScaleForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model.eval()(ids).logits)


def test_trainer_with_freeze_backbone_trains_only_the_streams(tiny_factory, tok, tmp_path):
    model = _model(tiny_factory, tok, 2)
    model.freeze_backbone()
    stream = {n for n, _ in model.stream_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _lm_trainer(model, tok, tmp_path, max_steps=3, learning_rate=1e-2).train()
    for name, param in model.named_parameters():
        if name in stream:
            assert not torch.equal(before[name], param), f"stream parameter {name} did not change"
        else:
            assert torch.equal(before[name], param), f"backbone parameter {name} changed"


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_trainer_loss_on_a_padded_batch_equals_each_sequence_alone(tiny_factory, tok, tmp_path, padding_side):
    model = _model(tiny_factory, tok, 2)
    trainer = _lm_trainer(model, tok, tmp_path, padding_side=padding_side)
    batch = next(iter(trainer.get_train_dataloader()))
    mask = batch["attention_mask"].bool()
    assert not mask.all() and bool((~mask[:, 0]).any()) == (padding_side == "left")  # padding where asked
    # The stock collator labels a left-padded row's first token, which the shift then has the pad
    # before it predict (so in every transformers causal LM); a per-sequence loss has no such term.
    batch["labels"][:, 1:][~mask[:, :-1]] = -100
    rows = [ids[m].tolist() for ids, m in zip(batch["input_ids"], mask)]
    want = reference_loss(model, rows, [[True] * len(r) for r in rows])
    n_targets = sum(len(r) - 1 for r in rows)
    got = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(n_targets))
    # float32 forward over a ~4-nat loss: rounding stays near 1e-6
    assert float(got.detach()) == pytest.approx(want, abs=2e-5)


# ---------------------------------------------------------------- trl.SFTTrainer
def _sft(model, tok, tmp_path, kind: str, packing: bool = False, **kw):
    from trl import SFTConfig, SFTTrainer

    if kind == "assistant":  # multi-turn conversations, loss on every assistant turn
        rows = [{"messages": _messages(c)} for c in CONVERSATIONS]
    else:  # prompt / completion conversations, loss on the completion
        rows = [{"prompt": _messages(c[:1]), "completion": _messages(c[1:2])} for c in CONVERSATIONS]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), report_to="none", use_cpu=True, save_strategy="no",
                     disable_tqdm=True, logging_steps=1, max_steps=2, per_device_train_batch_size=4,
                     max_length=64, packing=packing, activation_checkpointing=False,
                     assistant_only_loss=kind == "assistant", completion_only_loss=kind == "completion", **kw)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)


def _sequences(batch) -> list[list[int]]:
    """The unpadded sequences of a batch: padded rows by their mask, a packed row by its position resets."""
    if "attention_mask" in batch:
        return [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    ids, pos = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
    return [ids[a:b] for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("kind,n_streams,frozen", [("assistant", 2, False), ("completion", 2, False),
                                                    ("assistant", 4, True)])
def test_sft_loss_is_on_the_assistant_tokens_only(tiny_factory, tok, tmp_path, kind, n_streams, frozen):
    """P = 4 with padding is the reported mask-shape failure: it must run and score correctly
    (here with the backbone frozen: then only the streams may change)."""
    model = _model(tiny_factory, tok, n_streams)
    if frozen:
        model.freeze_backbone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _sft(model, tok, tmp_path, kind, learning_rate=1e-3)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" in batch and not batch["attention_mask"].bool().all()  # a padded batch
    rows = _sequences(batch)
    targets = [assistant_chars(tok.decode(r)) for r in rows]
    for ids, labels, mask, row, keep in zip(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                            rows, targets):
        want_labels = [t if k else -100 for t, k in zip(row, keep)]
        assert labels[mask.bool()].tolist() == want_labels, tok.decode(row)
    want = reference_loss(model, rows, targets)
    n_targets = sum(sum(k[1:]) for k in targets)
    got = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(n_targets))
    assert float(got.detach()) == pytest.approx(want, abs=2e-5)
    assert trainer.train().training_loss > 0  # and real training steps run
    stream = {n for n, _ in model.stream_parameters()}
    for name, param in model.named_parameters():
        assert torch.equal(before[name], param) == (frozen and name not in stream), name


def test_sft_with_packing_keeps_each_conversation_to_itself(tiny_factory, tok, tmp_path):
    """TRL 1.16 packs (strategy bfd) padding-free: one row, no attention mask, `position_ids`
    restarting at each conversation. Those restarts must keep attention within a conversation,
    so the packed loss equals each conversation scored alone."""
    model = _model(tiny_factory, tok, 2)
    trainer = _sft(model, tok, tmp_path, "assistant", packing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    rows = _sequences(batch)
    assert len(rows) == len(CONVERSATIONS)
    targets = [assistant_chars(tok.decode(r)) for r in rows]
    want = reference_loss(model, rows, targets)
    n_targets = sum(sum(k[1:]) for k in targets)
    got = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(n_targets))
    assert float(got.detach()) == pytest.approx(want, abs=2e-5)
