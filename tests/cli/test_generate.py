"""`parscale generate`: end to end on a tiny saved model with a tiny character tokenizer."""
from __future__ import annotations


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
    assert "is not a directory" in err and "Traceback" not in err


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
