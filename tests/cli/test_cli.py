"""The CLI dispatcher: unknown verbs and help are answered without a traceback."""
from parscale.cli.main import VERBS, main


def test_unknown_verb_is_a_clear_error(capsys):
    assert main(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown verb 'nonsense'" in err
    for verb in VERBS:
        assert verb in err


def test_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out
