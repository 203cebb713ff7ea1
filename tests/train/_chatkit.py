"""A toy chat format for the fine-tuning tests: which characters are the assistant's can be
read off the rendered text, because its markers never occur in the contents (users write
digits, the assistant letters).

    user "12"      -> "_12\n"
    assistant "ab" -> "=ab.\n"      (the loss is on "ab.\n"; "=" is the generation prompt)
"""
from __future__ import annotations

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
