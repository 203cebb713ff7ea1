"""A toy chat format for the fine-tuning tests: which characters are the assistant's can be
read off the rendered text, because its markers never occur in the contents (users write
digits, the assistant letters).

    user "12"      -> "_12\n"
    assistant "ab" -> "=ab.\n"      (the loss is on "ab.\n"; "=" is the generation prompt)
"""
from __future__ import annotations

import json
import random

from _chartok import char_tokenizer

# `{% generation %}` marks the assistant's tokens for TRL's assistant_only_loss; parscale's
# own chat data reads the template without them.
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
            "={% generation %}{{ m['content'] }}.\n{% endgeneration %}"
            "{% else %}_{{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}={% endif %}")
EOS = "<eos>"


def chat_tokenizer(template: str | None = TEMPLATE):
    """The character tokenizer with an EOS token and (unless None) the toy chat template."""
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens({"eos_token": EOS})
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def render(turns: list[tuple[str, str]]) -> str:
    """The toy template by hand (no Jinja): what the tokenizer's template must produce."""
    return "".join(f"={content}.\n" if role == "assistant" else f"_{content}\n" for role, content in turns)


def assistant_chars(text: str) -> list[bool]:
    """Which characters the assistant wrote: after '=' up to and including the next newline
    (its content, the '.' and the newline that end its turn; not the '=' prompt itself)."""
    out, inside = [], False
    for ch in text:
        out.append(inside)
        if ch == "=":
            inside = True
        elif ch == "\n":
            inside = False
    return out


NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def conversations(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """The user gives digits, the assistant spells them; every other conversation has two exchanges."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = []
        for _ in range(1 + i % 2):
            digits = [rng.randrange(10) for _ in range(rng.randint(1, 3))]
            turns += [("user", " ".join(map(str, digits))), ("assistant", " ".join(NUMBERS[d] for d in digits))]
        out.append(turns)
    return out


def write_jsonl(path, convs) -> None:
    path.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n"
                            for turns in convs))


def chat_run_options(root):
    """(the micro run's options with chat data, its 16 training and its 4 validation conversations)."""
    from _trainkit import micro_setup

    opts = micro_setup(root)
    chat_tokenizer().save_pretrained(root / "tok")
    train, val = conversations(16, seed=1), conversations(4, seed=2)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "val.jsonl", val)
    opts["data"] = {"source": "files", "files": [str(root / "train.jsonl")],
                    "val_files": [str(root / "val.jsonl")], "tokenizer": str(root / "tok"), "format": "chat"}
    return opts, train, val
