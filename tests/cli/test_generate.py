"""`parscale generate`: end to end on a tiny saved model with a tiny character tokenizer."""
from __future__ import annotations

import string

import pytest
import torch
from _chartok import char_tokenizer

from parscale.cli.main import main as cli_main
from parscale.cli.generate import main
from parscale.model.config import ParScaleConfig
from parscale.errors import UserError
from parscale.model.wrapper import to_parscale

@pytest.fixture
def saved(tmp_path, tiny_factory):
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3), seed=0).eval()
    with torch.no_grad():
        model.model.aggregate_layer[2].weight.normal_()
    model.save_pretrained(tmp_path / "model")
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(tmp_path / "model")
    return model, tokenizer, tmp_path / "model"


def test_greedy_output_matches_the_library(saved, capsys):
    model, tokenizer, directory = saved
    assert main(["--model", str(directory), "--prompt", "def f(x):", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    ids = tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert printed == "def f(x):" + tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(printed) > len("def f(x):")


def test_sampling_and_beams_run(saved, capsys):
    _, _, directory = saved
    sample = ["--model", str(directory), "--prompt", "import ", "--do-sample", "--temperature", "0.7", "--top-p", "0.9",
              "--max-new-tokens", "6"]
    assert main(sample + ["--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(sample + ["--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # seeded
    assert main(["--model", str(directory), "--prompt", "x = ", "--num-beams", "3", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("x = ")


def _library(model, tokenizer, prompt, seed=None, **kwargs):
    """What `model.generate` itself gives for these arguments (the independent expectation)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, pad_token_id=0, **kwargs)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_sampling_and_beam_flags_give_what_the_library_gives_with_them(saved, capsys):
    model, tokenizer, directory = saved
    prompt = "y = 1"
    greedy = _library(model, tokenizer, prompt, do_sample=False)
    sampled = _library(model, tokenizer, prompt, seed=3, do_sample=True, temperature=1.5, top_p=1.0, top_k=0)
    beams = _library(model, tokenizer, prompt, do_sample=False, num_beams=3)
    assert len({greedy, sampled, beams}) == 3  # this prompt tells the three decoders apart
    base = ["--model", str(directory), "--prompt", prompt, "--max-new-tokens", "8"]
    for flags, expected in ((["--do-sample", "--temperature", "1.5", "--seed", "3"], sampled),
                            (["--num-beams", "3"], beams)):
        assert main(base + flags) == 0
        assert capsys.readouterr().out.rstrip("\n") == expected, flags


def test_separate_tokenizer_directory(saved, tmp_path, capsys):
    _, tokenizer, directory = saved
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).rename(tmp_path / name)
    with pytest.raises(UserError, match="no tokenizer in .*pass --tokenizer DIR"):
        main(["--model", str(directory), "--prompt", "a"])
    assert main(["--model", str(directory), "--tokenizer", str(tmp_path), "--prompt", "a", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("a")


@pytest.mark.parametrize(
    "extra,pattern",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--num-beams", "0"], "--num-beams must be >= 1"),
        (["--temperature", "0.5"], "add --do-sample"),
        (["--do-sample", "--temperature", "0"], "--temperature must be > 0"),
        (["--do-sample", "--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    ],
)
def test_bad_flags_are_user_errors(saved, extra, pattern):
    _, _, directory = saved
    with pytest.raises(UserError, match=pattern):
        main(["--model", str(directory), "--prompt", "a", *extra])


def test_cli_exit_code_and_message_without_traceback(tmp_path, capsys):
    assert cli_main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_a_trained_bpe_beside_a_qwen2_parscale_model_tokenizes_as_saved(tmp_path, tiny_factory):
    """AutoTokenizer must keep our byte-level BPE's class even though config.json says
    qwen2_parscale: the backbone's own tokenizer class would split text differently."""
    from parscale.data.tokenizer import load_tokenizer, train_bpe

    docs = ["def café(x):\n    return x  # ünïcode\n", "class A:\n    pass\n"] * 20
    tokenizer = train_bpe(docs, 300)
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3), seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded = load_tokenizer(tmp_path / "model")
    text = "def café(y):\n        return  y # ü\n"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


# ---------------------------------------------------------------- streaming
def _continuation(model, tokenizer, ids, seed=None, **kwargs) -> str:
    """Decoded new tokens of a plain `model.generate` call (no streamer): the independent expectation."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=kwargs.pop("max_new_tokens", 8), pad_token_id=0, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture
def spy(monkeypatch):
    """Records the input ids of the CLI's `generate` calls and whether each has returned yet."""
    from parscale.model.wrapper import ParScaleForCausalLM

    calls: list[dict] = []
    original = ParScaleForCausalLM.generate

    def generate(self, *args, **kwargs):
        if "streamer" not in kwargs:  # the tests' own reference calls; the CLI always passes streamer=
            return original(self, *args, **kwargs)
        call = {"input_ids": kwargs["input_ids"].clone(), "done": False}
        calls.append(call)
        out = original(self, *args, **kwargs)
        call["done"] = True
        return out

    monkeypatch.setattr(ParScaleForCausalLM, "generate", generate)
    return calls


def test_sampled_text_is_streamed_and_equals_the_unstreamed_decode(saved, capsys):
    model, tokenizer, directory = saved
    ids = tokenizer("y = 1", return_tensors="pt")["input_ids"]
    expected = _continuation(model, tokenizer, ids, seed=5, max_new_tokens=24, do_sample=True, temperature=1.5,
                             top_p=1.0, top_k=0)
    assert main(["--model", str(directory), "--prompt", "y = 1", "--max-new-tokens", "24", "--do-sample",
                 "--temperature", "1.5", "--seed", "5"]) == 0
    assert capsys.readouterr().out == "y = 1" + expected + "\n"


def test_tokens_are_printed_before_generate_returns(saved, spy, monkeypatch, capsys):
    from transformers import TextStreamer

    model, tokenizer, directory = saved
    ids = tokenizer("ab", return_tensors="pt")["input_ids"]
    expected = _continuation(model, tokenizer, ids, max_new_tokens=6)
    chunks = []
    printed = TextStreamer.on_finalized_text

    def record(self, text, stream_end=False):
        chunks.append((text, spy[-1]["done"]))
        printed(self, text, stream_end)

    monkeypatch.setattr(TextStreamer, "on_finalized_text", record)
    assert main(["--model", str(directory), "--prompt", "ab", "--max-new-tokens", "6"]) == 0
    early = [text for text, done in chunks if text and not done]
    assert len(early) > 1, chunks  # more than one piece of text reached stdout while generate was running
    assert "".join(text for text, _ in chunks) == expected
    assert capsys.readouterr().out == "ab" + expected + "\n"


# ---------------------------------------------------------------- stream adapters
# Llama's untied head: the tiny tied Qwen2 greedily repeats the last token whatever its streams.
FULL_VOCAB = string.digits + string.ascii_letters + string.punctuation + " "  # ids 2..96: every id decodes


@pytest.fixture
def backbone(tmp_path, tiny_factory):
    """A plain P = 1 backbone with a tokenizer, and a P = 4 model on the same backbone."""
    tiny_factory("llama").save_pretrained(tmp_path / "base")
    char_tokenizer(FULL_VOCAB).save_pretrained(tmp_path / "base")
    full = to_parscale(tiny_factory("llama"), ParScaleConfig(4, 3), seed=4).eval()
    with torch.no_grad():
        full.model.aggregate_layer[2].weight.normal_(generator=torch.Generator().manual_seed(4))
    full.save_streams(tmp_path / "p4")
    return full, tmp_path


def test_streams_flag_generates_what_the_full_model_generates(backbone, tiny_factory, capsys):
    full, root = backbone
    tokenizer = char_tokenizer(FULL_VOCAB)
    prompt = "def f(x):"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = _continuation(full, tokenizer, ids, max_new_tokens=10)
    assert expected != _continuation(tiny_factory("llama"), tokenizer, ids, max_new_tokens=10)  # the streams matter
    for spec in (str(root / "p4"), f"four={root / 'p4'}"):
        assert main(["--model", str(root / "base"), "--streams", spec, "--prompt", prompt,
                     "--max-new-tokens", "10"]) == 0
        assert capsys.readouterr().out == prompt + expected + "\n", spec


def test_an_adapter_of_another_backbone_is_one_error_line(backbone, tiny_factory, capsys):
    _, root = backbone
    other = to_parscale(tiny_factory("llama", seed=1), ParScaleConfig(2, 3), seed=0)
    other.save_streams(root / "other")
    code = cli_main(["generate", "--model", str(root / "base"), "--streams", str(root / "other"), "--prompt", "a"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "trained on another backbone" in err
    assert cli_main(["generate", "--model", str(root / "base"), "--streams", str(root / "nope"), "--prompt", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- chat and interactive
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] + ':' + m['content'] + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'a:' }}{% endif %}")


def _rendered_ids(tokenizer, messages) -> torch.Tensor:
    """The template rendered by plain jinja2 (not apply_chat_template), then tokenized."""
    import jinja2

    text = jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt")["input_ids"]


@pytest.fixture
def chat(saved):
    model, tokenizer, directory = saved
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return model, tokenizer, directory


def test_chat_feeds_the_templated_conversation_and_prints_the_answer(chat, spy, capsys):
    model, tokenizer, directory = chat
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x = 1"}]
    ids = _rendered_ids(tokenizer, messages)
    assert tokenizer.decode(ids[0]) == "s:be brief\nu:x = 1\na:"  # what the template means, by hand
    assert main(["--model", str(directory), "--chat", "--system", "be brief", "--prompt", "x = 1",
                 "--max-new-tokens", "6"]) == 0
    assert len(spy) == 1 and torch.equal(spy[0]["input_ids"], ids)
    assert capsys.readouterr().out == _continuation(model, tokenizer, ids, max_new_tokens=6) + "\n"


def test_chat_without_a_template_is_a_clear_error(saved, capsys):
    _, _, directory = saved
    assert cli_main(["generate", "--model", str(directory), "--chat", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "drop --chat" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("ending", ["", "\n", "/exit\n"], ids=["eof", "empty-line", "exit"])
def test_interactive_chat_carries_the_conversation(chat, spy, monkeypatch, capsys, ending):
    import io

    model, tokenizer, directory = chat
    monkeypatch.setattr("sys.stdin", io.StringIO("x = 1\ny = 2\n" + ending + ("ab\n" if ending else "")))
    assert main(["--model", str(directory), "--chat", "--interactive", "--max-new-tokens", "5"]) == 0
    first = [{"role": "user", "content": "x = 1"}]
    answer = _continuation(model, tokenizer, _rendered_ids(tokenizer, first), max_new_tokens=5)
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "y = 2"}]
    assert answer.strip() and len(spy) == 2  # the line after the ending was not read as a prompt
    assert torch.equal(spy[0]["input_ids"], _rendered_ids(tokenizer, first))
    assert torch.equal(spy[1]["input_ids"], _rendered_ids(tokenizer, second))
    assert "u:x = 1\na:" + answer + "\nu:y = 2\na:" in tokenizer.decode(spy[1]["input_ids"][0])
    reply = _continuation(model, tokenizer, _rendered_ids(tokenizer, second), max_new_tokens=5)
    assert capsys.readouterr().out == answer + "\n" + reply + "\n"


def test_interactive_without_chat_continues_each_line_alone(saved, spy, monkeypatch, capsys):
    import io

    model, tokenizer, directory = saved
    monkeypatch.setattr("sys.stdin", io.StringIO("ab\ny = 1\n/exit\n"))
    assert main(["--model", str(directory), "--interactive", "--max-new-tokens", "4"]) == 0
    expected = [_continuation(model, tokenizer, tokenizer(p, return_tensors="pt")["input_ids"], max_new_tokens=4)
                for p in ("ab", "y = 1")]
    assert [tokenizer.decode(call["input_ids"][0]) for call in spy] == ["ab", "y = 1"]
    assert capsys.readouterr().out == expected[0] + "\n" + expected[1] + "\n"


class _InterruptedStdin:
    """One line, then Ctrl-C while waiting for the next."""

    def __init__(self):
        self.lines = ["ab\n"]

    def isatty(self):
        return False

    def readline(self):
        if self.lines:
            return self.lines.pop()
        raise KeyboardInterrupt


def test_ctrl_c_while_reading_ends_the_interactive_mode_with_one_line_and_130(saved, monkeypatch, capsys):
    model, tokenizer, directory = saved
    monkeypatch.setattr("sys.stdin", _InterruptedStdin())
    assert cli_main(["generate", "--model", str(directory), "--interactive", "--max-new-tokens", "3"]) == 130
    captured = capsys.readouterr()
    expected = _continuation(model, tokenizer, tokenizer("ab", return_tensors="pt")["input_ids"], max_new_tokens=3)
    assert captured.out == expected + "\n"
    assert "interrupted" in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err


def test_ctrl_c_while_answering_ends_the_half_printed_line(saved, monkeypatch, capsys):
    import io

    from transformers import TextStreamer

    model, tokenizer, directory = saved
    first = _continuation(model, tokenizer, tokenizer("ab", return_tensors="pt")["input_ids"], max_new_tokens=1)
    assert first.isalpha()  # a letter, which the streamer prints at once
    printed = TextStreamer.on_finalized_text

    def print_then_stop(self, text, stream_end=False):
        printed(self, text, stream_end)
        if text:
            raise KeyboardInterrupt

    monkeypatch.setattr(TextStreamer, "on_finalized_text", print_then_stop)
    monkeypatch.setattr("sys.stdin", io.StringIO("ab\n"))
    assert cli_main(["generate", "--model", str(directory), "--interactive", "--max-new-tokens", "5"]) == 130
    captured = capsys.readouterr()
    assert captured.out == first + "\n"  # one token was printed, then the line was ended
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err


@pytest.mark.parametrize(
    "extra,pattern",
    [
        (["--system", "be brief"], "--system only applies to chat models; add --chat"),
        (["--interactive"], "--interactive reads its prompts from stdin; drop --prompt"),
        (["--int8-activations"], "--int8-activations rounds the activations of int8 layers; add --int8"),
    ],
)
def test_bad_chat_and_interactive_flags_are_user_errors(saved, extra, pattern):
    _, _, directory = saved
    with pytest.raises(UserError, match=pattern):
        main(["--model", str(directory), "--prompt", "a", *extra])
    with pytest.raises(UserError, match="--prompt is missing or empty; .* or use --interactive"):
        main(["--model", str(directory)])


@pytest.mark.slow
def test_a_real_sigint_in_interactive_mode_exits_130_without_traceback(chat):
    """The signal path itself (the CLI's handler, not a patched stdin), in a separate process."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    _, _, directory = chat
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "parscale", "generate", "--model", str(directory), "--chat",
                             "--interactive", "--max-new-tokens", "4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        proc.stdin.write("x = 1\n")
        proc.stdin.flush()
        assert proc.stdout.readline().endswith("\n")  # the first answer is out; it now waits for a line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "parscale generate: interrupted (SIGINT); nothing was saved"


def test_compile_flag_decodes_with_a_static_cache_and_a_compiled_step(saved, monkeypatch, capsys):
    """--compile hands generate a static cache and a CompileConfig (compiling on this CPU too);
    the compiled step itself is checked against eager decoding in tests/model/test_prefix_attention.py,
    so generate is stubbed here to record its keywords."""
    from parscale.model.wrapper import ParScaleForCausalLM

    seen = {}

    def generate(self, input_ids=None, **kwargs):
        seen.update(kwargs)
        return torch.cat([input_ids, input_ids[:, -1:]], dim=1)

    monkeypatch.setattr(ParScaleForCausalLM, "generate", generate)
    _, _, directory = saved
    assert main(["--model", str(directory), "--prompt", "ab", "--max-new-tokens", "3", "--compile"]) == 0
    assert seen["cache_implementation"] == "static"
    config = seen["compile_config"]
    assert config.fullgraph and config._compile_all_devices and config.mode == "default"  # CPU: no CUDA graphs
    seen.clear()
    assert main(["--model", str(directory), "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    assert "compile_config" not in seen and "cache_implementation" not in seen
