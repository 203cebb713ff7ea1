"""The argument parser every verb uses: whole option names only, old spellings accepted but not
shown, and an unknown option answered with the names it may have meant.

argparse's own habits are what a newcomer trips over: a prefix is taken for the option it
abbreviates (`--data` was "ambiguous" among eleven `--data-*` options, and a prefix that
happens to be unique today breaks when an option is added), and an unknown option gets a bare
"unrecognized arguments". Here a prefix is an unknown option like any other, and
`UnknownOption` names the close matches; `parscale VERB` adds the verbs that do take it.
"""
from __future__ import annotations

import argparse
import difflib
import sys

from parscale.errors import UserError


class UnknownOption(UserError):
    """An option this verb does not take, with the close matches among its own."""

    def __init__(self, prog: str, option: str, close: list[str]) -> None:
        self.prog, self.option, self.close = prog, option, close
        super().__init__(self.describe([]))

    def describe(self, verbs_taking_it: list[str]) -> str:
        """The message; `verbs_taking_it` are the other verbs that have this option."""
        text = f"unknown option {self.option}"
        if verbs_taking_it:
            text += f": it is an option of {' and '.join('parscale ' + v for v in verbs_taking_it)}"
        if self.close:
            text += f"; did you mean {_either(self.close)}?"
        return text + f" ({self.prog} --help lists its options)"


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def hide(action: argparse.Action, *names: str) -> argparse.Action:
    """Keep `names` (old spellings, another verb's) working for `action` without listing them in --help."""
    missing = set(names) - set(action.option_strings)
    if missing:
        raise ValueError(f"{sorted(missing)} are not names of {action.option_strings}")
    action.hidden_names = set(names) | getattr(action, "hidden_names", set())
    return action


class _HidesAliases(argparse.HelpFormatter):
    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "hidden_names", ())
        if not hidden:
            return super()._format_action_invocation(action)
        shown = [name for name in action.option_strings if name not in hidden]
        original = action.option_strings
        action.option_strings = shown
        try:
            return super()._format_action_invocation(action)
        finally:
            action.option_strings = original


def _hiding(formatter_class: type) -> type:
    if issubclass(formatter_class, _HidesAliases):
        return formatter_class
    return type(f"Hiding{formatter_class.__name__}", (_HidesAliases, formatter_class), {})


def option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every option string of `parser` and its sub-verbs' parsers -> the name --help shows for it."""
    found: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.update(option_names(sub))
        hidden = getattr(action, "hidden_names", ())
        shown = [name for name in action.option_strings if name not in hidden]
        for name in action.option_strings:
            found[name] = shown[0] if shown else name
    found.pop("-h", None), found.pop("--help", None)
    return found


def close_options(given: str, names: dict[str, str]) -> list[str]:
    """The options `given` may have meant: those it abbreviates (at most five), else the most alike."""
    if given.startswith("--") and len(given) > 2:
        prefixed = sorted({shown for name, shown in names.items() if name.startswith(given)})
        if 0 < len(prefixed) <= 5:
            return prefixed
    score = {name: difflib.SequenceMatcher(None, given.lstrip("-"), name.lstrip("-")).ratio() for name in names}
    best = max(score.values(), default=0.0)  # the dashes every name shares would make all of them look alike
    alike = sorted((name for name, s in score.items() if s >= 0.7 and s >= best - 0.1), key=lambda n: -score[n])
    return list(dict.fromkeys(names[name] for name in alike))[:3]


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` without abbreviations, with hidden aliases and 'did you mean'."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs["formatter_class"] = _hiding(kwargs.get("formatter_class", argparse.HelpFormatter))
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # kept for `error`: argparse checks the required options before it reports unknown ones
        self._given = list(args) if args is not None else sys.argv[1:]
        return super().parse_known_args(args, namespace)

    def _unknown_given(self) -> list[str]:
        """The words given to this parser that look like options it does not have."""
        names = set(option_names(self))
        return [word for word in getattr(self, "_given", [])
                if word.startswith("-") and word not in ("-", "--") and not self._negative_number_matcher.match(word)
                and word.partition("=")[0] not in names and word not in ("-h", "--help")]

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        unknown = [word for word in message[len(prefix):].split() if word.startswith("-")] \
            if message.startswith(prefix) else []
        if not unknown and message.startswith("the following arguments are required"):
            unknown = self._unknown_given()  # a misspelt required option: name it, not the missing one
        if unknown:
            option = unknown[0].partition("=")[0]
            raise UnknownOption(self.prog, option, close_options(option, option_names(self)))
        super().error(message)
