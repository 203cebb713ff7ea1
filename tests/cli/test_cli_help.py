"""Every verb's `--help` states the defaults the code really uses, in the user's words.

A help text states a default as "(default: 48)", "(default 1000; ...)", "(default auto: ...)" or
"(default: the run's, else 0.02)". Each stated value is checked against what the code does:
argparse's own default, the TrainConfig/DataConfig field behind a `train` flag (those flags
default to "not given", so that a YAML file can set them), or, where the code decides later
(argparse's default is None), the value that code computes.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from types import SimpleNamespace

import pytest
from test_cli_errors import _all_parsers

STATED = re.compile(r"(?:\bdefault:?|, else)\s+([^\s;)]+)")  # "1,2,4,8" is one value; "tiny," is "tiny"


def _every_parser() -> list[argparse.ArgumentParser]:
    from parscale.cli import data as data_cli, serve, streams

    subs = [a.choices.values() for a in streams.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return _all_parsers() + [data_cli.build_parser(), serve.build_parser(), *[p for s in subs for p in s]]


def _field_defaults() -> dict[str, object]:
    """`train`'s flags by dest: the dataclass defaults the run uses when a flag is not given."""
    from parscale.data.config import DataConfig
    from parscale.train.config import TrainConfig

    found = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    found.update({"data_" + f.name: f.default for f in dataclasses.fields(DataConfig)})
    return found


def _decided_later() -> dict[tuple[str, str], object]:
    """Options whose argparse default is None, and the value the code then uses."""
    from parscale.cache import cache_dir
    from parscale.cli import demo, eval as eval_cli, generate
    from parscale.cost.hardware import resolve
    from parscale.data.config import DataConfig
    from parscale.data.store import default_cache_dir
    from parscale.demo.plan import DemoConfig
    from parscale.train.config import TrainConfig
    from parscale.train.data_order import start_row

    ev = eval_cli.build_parser().parse_args(["--model", "m"])
    eval_cli.fill_defaults(ev, {})  # outside a training run
    sampling = generate.generation_kwargs(
        generate.build_parser().parse_args(["--model", "m", "--prompt", "x", "--do-sample"]),
        SimpleNamespace(pad_token_id=0, eos_token_id=0))
    run = TrainConfig(out="x", steps=1000)
    cost = next(p for p in _all_parsers() if p.prog.startswith("parscale cost ["))
    profile = resolve(cost.get_default("profile"))  # the profile `parscale cost` uses without --profile
    demo_args = demo.build_parser().parse_args([])
    return {
        ("parscale eval", "--data-files"): ev.data[0], ("parscale eval", "--data-text-field"): ev.text_field,
        ("parscale eval", "--data-val-fraction"): ev.val_fraction, ("parscale eval", "--data-seed"): ev.split_seed,
        ("parscale eval", "--eval-tokens"): ev.max_tokens,
        ("parscale eval", "--cache-dir"): default_cache_dir(),
        ("parscale generate", "--temperature"): sampling["temperature"],
        ("parscale generate", "--top-p"): sampling["top_p"],
        ("parscale demo", "--workers"): demo.default_workers(),
        ("parscale demo", "--budget"): demo_args.budget or demo.DEFAULT_BUDGET,
        ("parscale demo", "--seeds"): len(DemoConfig.preset("x").seeds),
        ("parscale train", "--cache-dir"): default_cache_dir(),
        ("parscale train", "--preset"): TrainConfig(out="x").preset,
        ("parscale train", "--data-source"): DataConfig().source,
        ("parscale train", "--warmup-steps"): f"{100 * run.warmup_steps / run.steps:g}%",
        ("parscale train", "--order-start"): start_row(SimpleNamespace(order_start=None, init_from=None), None),
        **{(prog, "--flops-efficiency"): profile.flops_efficiency for prog in _cost_progs()},
        **{(prog, "--hbm-memory-efficiency"): profile.memory_efficiency for prog in _cost_progs()},
        **{(prog, "--cache-dir"): cache_dir() for prog in _cost_progs()},
    }


def _cost_progs() -> list[str]:
    return [p.prog for p in _all_parsers() if p.prog.startswith("parscale cost")]


def _same(stated: str, value) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(stated) == float(value)
        except ValueError:
            return False
    return stated == str(value)


def _literal(token: str, action: argparse.Action) -> bool:
    """A value the user could type or find, not a description ("the run's", "a GPU if ...")."""
    return token[:1].isdigit() or token[:1] in "/~'\"" or token in (action.choices or ())


def _empty(value) -> bool:
    return value is None or value is argparse.SUPPRESS or value in ((), [], "")


def test_every_default_a_help_states_is_the_one_the_code_uses(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    fields, later, wrong, checked = _field_defaults(), _decided_later(), [], 0
    for parser in _every_parser():
        for action in parser._actions:
            help_ = (action.help or "").replace("%%", "%")
            stated = [m[1].rstrip(":,") for m in STATED.finditer(help_)]
            real = fields.get(action.dest) if parser.prog == "parscale train" else action.default
            key = (parser.prog, action.option_strings[0] if action.option_strings else action.dest)
            if not _empty(real) and real is not False:
                if parser.prog == "parscale train" and not stated:
                    wrong.append((key, "does not state its default", real))
                elif stated and not _same(stated[0], real):
                    wrong.append((key, stated[0], real))
                checked += bool(stated)
                continue
            literals = [token for token in stated if _literal(token, action)]
            if literals and key not in later:
                wrong.append((key, "states a value the test cannot check: add it to _decided_later", literals))
            elif literals:
                checked += 1
                if not any(_same(token, later[key]) for token in literals):
                    wrong.append((key, literals, later[key]))
    assert not wrong, "\n".join(map(str, wrong))
    assert checked > 60  # the pattern finds the defaults: every verb states some


@pytest.mark.parametrize("verb", ["train", "data"])
def test_train_help_speaks_the_users_words(verb, capsys):
    """No class names, no Python None, no internal identifiers: the flags and what they do."""
    from parscale.cli.main import main

    with pytest.raises(SystemExit):
        main([verb, *(["prepare"] if verb == "data" else []), "--help"])
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1].split("Instruction tuning:")[0]  # the epilog names the Python API
    assert not re.findall(r"\bNone\b|Config\b|\b[a-z0-9]+_[a-z0-9_]+\b", options)
    if verb == "train":
        from parscale.data.store import default_cache_dir

        assert str(default_cache_dir()) in "".join(text.split())  # wrapped at any hyphen of the path
        assert "RUN_DIR/data" not in text
