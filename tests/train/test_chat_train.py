"""`parscale train --data-format chat`: conversations through the tokenizer's chat template,
the loss on the assistant's tokens only, checked against a hand computation from the text."""
from __future__ import annotations

import math

import pytest
import torch
from _chatkit import EOS, assistant_chars, chat_run_options, chat_tokenizer, render, write_jsonl
from _trainkit import MICRO, cli_args, micro_setup, read_metrics, train_in_process

from parscale.cli.main import main as cli_main
from parscale.train import convert as convert_mod

SEP = "\x00"  # EOS in the decoded text (a character no conversation holds)


@pytest.fixture
def chat_setup(tmp_path):
    """The micro run's options with chat data: 16 training and 4 validation conversations."""
    return chat_run_options(tmp_path)


def _stream(convs) -> tuple[str, list[bool]]:
    """The packed text (conversations in file order, each followed by EOS) and its assistant characters."""
    text = "".join(render(turns) + SEP for turns in convs)
    return text, assistant_chars(text)


def _decode(ids) -> str:
    inverse = {i: (SEP if t == EOS else t) for t, i in chat_tokenizer().get_vocab().items()}
    return "".join(inverse[int(i)] for i in ids)


def hand_loss(logits: torch.Tensor, rows: torch.Tensor, stream: str, keep: list[bool]) -> float:
    """Mean NLL (float64) of the tokens the assistant wrote, each row found in the packed stream."""
    total, count = 0.0, 0
    for row_logits, ids in zip(logits, rows):
        text = _decode(ids)
        assert stream.count(text) == 1, text  # the row is one place of the stream
        at = stream.index(text)
        logp = row_logits.double().log_softmax(-1)
        for t in range(len(ids) - 1):
            if keep[at + t + 1]:
                total -= float(logp[t, ids[t + 1]])
                count += 1
    return total / count


def test_chat_run_scores_the_assistant_tokens_only(chat_setup, tmp_path, monkeypatch):
    opts, train, val = chat_setup
    built, seen = convert_mod.model_from_scratch, {}

    def recording(*args, **kwargs):
        model = built(*args, **kwargs)

        def hook(module, args, kwargs, output):  # the first training forward: step 1's batch, before any update
            if kwargs.get("labels") is not None and "ids" not in seen:
                seen.update(ids=kwargs["input_ids"].clone(), logits=output.logits.detach().clone())

        model.register_forward_hook(hook, with_kwargs=True)
        seen["model"] = model
        return model

    monkeypatch.setattr(convert_mod, "model_from_scratch", recording)
    final = train_in_process(out=str(tmp_path / "run"), P=2, steps=12,
                             **{**opts, "eval_every": 4, "save_every": 0, "lr": 1e-2})
    records = read_metrics(tmp_path / "run")
    stream, keep = _stream(train)
    at = [stream.index(_decode(row)) for row in seen["ids"]]
    window = [k for a in at for k in keep[a:a + opts["seq_len"]]]
    assert any(window) and not all(window)  # the batch mixes user and assistant tokens
    want = hand_loss(seen["logits"], seen["ids"], stream, keep)
    assert records[0]["train_loss"] == pytest.approx(want, abs=1e-5)  # float32 logits, float64 sums

    # The run learns the assistant's replies: held-out loss falls, well under uniform guessing.
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert val_losses[-1] < val_losses[0] < math.log(MICRO["vocab_size"])
    # The final held-out loss is over the validation assistant tokens: chunks of seq_len in order,
    # then the tail, as evaluation reads them.
    from parscale.model.wrapper import ParScaleForCausalLM

    model = ParScaleForCausalLM.from_pretrained(final)
    val_text, val_keep = _stream(val)
    ids = torch.tensor(chat_tokenizer()(val_text.replace(SEP, EOS), add_special_tokens=False)["input_ids"])
    assert _decode(ids) == val_text
    total, count, L = 0.0, 0, opts["seq_len"]
    with torch.no_grad():
        for a in range(0, len(ids), L):
            chunk = ids[a:a + L]
            if len(chunk) < 2:
                continue
            logp = model(input_ids=chunk[None]).logits[0].double().log_softmax(-1)
            for t in range(len(chunk) - 1):
                if val_keep[a + t + 1]:
                    total, count = total - float(logp[t, chunk[t + 1]]), count + 1
    assert val_losses[-1] == pytest.approx(total / count, abs=1e-5)


@pytest.mark.parametrize("case", ["not json", "no messages", "no template", "no assistant", "no tokenizer"])
def test_bad_chat_data_is_one_clear_error(chat_setup, tmp_path, capsys, case):
    opts, train, _ = chat_setup
    data = opts["data"]
    bad = tmp_path / "bad.jsonl"
    if case == "not json":
        bad.write_text('{"messages": [{"role": "user", "content": "1"}]}\n{oops\n')
        data, needle = {**data, "files": [str(bad)]}, f"{bad}, line 2: not JSON"
    elif case == "no messages":
        bad.write_text('{"text": "1 2"}\n')
        data, needle = {**data, "files": [str(bad)]}, f'{bad}, line 1: no "messages"'
    elif case == "no template":
        chat_tokenizer(template=None).save_pretrained(tmp_path / "plain-tok")
        data, needle = {**data, "tokenizer": str(tmp_path / "plain-tok")}, "has no chat template"
    elif case == "no assistant":
        write_jsonl(bad, [[t for t in turns if t[0] == "user"] for turns in train])
        data, needle = {**data, "files": [str(bad)]}, "no assistant turn in the train conversations"
    else:
        data = {k: v for k, v in data.items() if k != "tokenizer"}
        needle = "needs a tokenizer with a chat template"
    run = tmp_path / "run"
    assert cli_main(["train", *cli_args({**opts, "data": data}), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err
    assert not (run / "metrics.jsonl").exists()


def test_two_stage_instruction_tuning_reads_the_tokenizer_of_the_init_model(chat_setup, tmp_path):
    """Pretrain P = 1 on text with a chat tokenizer, then --init-from it at P = 2 on conversations:
    the chat run takes the stage-1 model's tokenizer (and its template) without --data-tokenizer."""
    opts, _, _ = chat_setup
    text_data = {**micro_setup(tmp_path)["data"], "tokenizer": opts["data"]["tokenizer"]}
    stage1 = train_in_process(out=str(tmp_path / "p1"), P=1, steps=2,
                              **{**opts, "data": text_data, "eval_every": 0, "save_every": 0})
    chat_data = {k: v for k, v in opts["data"].items() if k != "tokenizer"}
    opts = {k: v for k, v in opts.items() if k != "model_config"}
    stage2 = train_in_process(out=str(tmp_path / "p2"), init_from=str(stage1), P=2, steps=2,
                              **{**opts, "data": chat_data, "eval_every": 0, "save_every": 0})
    records = read_metrics(tmp_path / "p2")
    assert records[0]["step"] == 0 and records[0]["base_val_loss"] > 0  # the converted model, measured first
    assert (stage2 / "tokenizer_config.json").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(stage2).chat_template == chat_tokenizer().chat_template
