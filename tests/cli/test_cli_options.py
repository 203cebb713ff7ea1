"""Option names: one name per concept across verbs, the old spellings still accepted (and not
listed), no abbreviations, and an unknown option answered with what it may have meant."""
from __future__ import annotations

import re

import pytest
from test_cli_errors import assert_one_error, cli

CASES = {  # args -> words of the one error line
    "a typo": (["train", "--stpes", "3", "--out", "r"], ["unknown option --stpes; did you mean --steps?"]),
    "a prefix of several": (["train", "--prefix", "4", "--out", "r"],
                            ["unknown option --prefix; did you mean --prefix-at-p1, --prefix-init-std, "
                             "--prefix-mlp-hidden or --prefix-tokens?"]),
    "a prefix of one": (["fit", "--data", "paper-stack", "--boot", "0"], ["did you mean --bootstrap?"]),
    "another verb's option": (["eval", "--model", "model", "--eval-every", "5"],
                              ["unknown option --eval-every: it is an option of parscale train", "eval --help"]),
    "another verb's name for it": (["train", "--max-tokens", "5", "--out", "r"],
                                   ["it is an option of parscale eval", "did you mean --eval-tokens?"]),
    "a sub-verb's option": (["streams", "extract", "--model", "a", "--out", "b", "--bsae", "c"],
                            ["did you mean --base?"]),
    "a cost sub-verb's option": (["cost", "compare", "--preset", "1.6B", "--batch", "1"],
                                 ["did you mean --batch-size?"]),
    # argparse checks the required options first: the typo of one was answered "--model is required"
    "a typo of a required option": (["generate", "--modle", "m", "--prompt", "hi"],
                                    ["unknown option --modle; did you mean --model?"]),
    "a sub-verb's required option": (["streams", "extract", "--modle", "a", "--out", "b"],
                                     ["unknown option --modle; did you mean --model?"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_unknown_option_is_one_line_naming_what_was_meant(tmp_path, case):
    args, words = CASES[case]
    line = assert_one_error(cli(args, cwd=tmp_path), args[0], *words)
    assert "ambiguous" not in line and "unrecognized" not in line
    assert not (tmp_path / "r").exists()


def _parsers():
    from parscale.cli import data, eval as eval_cli, fit, generate, train

    return {"train": train.build_parser(), "eval": eval_cli.build_parser(), "data": data.build_parser(),
            "fit": fit.build_parser(), "generate": generate.build_parser()}


# verb -> (the name --help shows, an old or another verb's spelling, a value, the other arguments)
ALIASES = [
    ("train", "--data-files", "--data", "a.txt", []),
    ("train", "--data-tokenizer", "--tokenizer", "tok", []),
    ("eval", "--data-files", "--data", "a.txt", ["--model", "m"]),
    ("eval", "--eval-tokens", "--max-tokens", "5", ["--model", "m"]),
    ("eval", "--tokenizer", "--data-tokenizer", "tok", ["--model", "m"]),
    ("eval", "--data-seed", "--split-seed", "3", ["--model", "m"]),
    ("data", "--data-files", "--data", "a.txt", ["--out", "d"]),
    ("data", "--data-tokenizer", "--tokenizer", "tok", ["--out", "d"]),
    ("fit", "--data", "--data-files", "runs.csv", []),
    ("generate", "--tokenizer", "--data-tokenizer", "tok", ["--model", "m"]),
]


@pytest.mark.parametrize("verb, shown, alias, value, rest", ALIASES)
def test_an_old_spelling_still_works_and_help_lists_one_name(verb, shown, alias, value, rest):
    parser = _parsers()[verb]
    given = vars(parser.parse_args([*rest, alias, value]))
    assert given == vars(parser.parse_args([*rest, shown, value]))
    assert any(value in str(v) for v in given.values())  # the value arrived
    text = parser.format_help()
    assert re.search(re.escape(shown) + r"(?![\w-])", text)
    assert not re.search(re.escape(alias) + r"(?![\w-])", text), (verb, alias)


def test_one_name_per_concept_across_verbs():
    from parscale.cli.options import option_names

    shown = {verb: set(option_names(p).values()) for verb, p in _parsers().items()}
    assert "--data-files" in shown["train"] & shown["eval"] & shown["data"]  # the text a verb reads
    assert "--eval-tokens" in shown["train"] & shown["eval"]  # held-out tokens to evaluate on
    assert {"--data", "--data-files"} <= set(option_names(_parsers()["fit"]))  # and fit takes either for its runs
