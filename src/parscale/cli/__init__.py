"""The command line: `parscale VERB ...`.

Lives here: `main` (the dispatcher), one module per verb (`train`, `eval`, `generate`, `fit`,
`cost`, `demo`, `streams`), each exposing `main(argv) -> int` and building its flags with
`options.Parser` (whole names only, old spellings hidden, "did you mean" for an unknown option),
and `model_dir` (what a directory given as a model is when it is not one: the check every verb
that takes a model runs first). A verb's module imports its heavy dependencies itself, so `parscale fit` and `parscale cost` start
without torch.
"""
from parscale.cli.main import main

__all__ = ["main"]
