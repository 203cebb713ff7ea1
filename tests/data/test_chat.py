"""Which tokens of a conversation are the assistant's: a ChatML-style template with special tokens,
and a plain-text header whose last space a byte-level BPE joins to the next word."""
from __future__ import annotations

import pytest
from _chartok import char_tokenizer

from parscale.data.chat import encode_conversation
from parscale.data.tokenizer import train_bpe
from parscale.errors import UserError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(template: str):
    tok = char_tokenizer()
    tok.add_special_tokens({"eos_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def test_the_assistant_tokens_are_its_content_and_end_of_turn():
    tok = _tokenizer(CHATML)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "12"},
                {"role": "assistant", "content": "twelve"}, {"role": "user", "content": "3"},
                {"role": "assistant", "content": "three"}]
    ids, mask = encode_conversation(tok, messages)
    # by hand: one token per character, one per special token; the assistant turns add
    # "twelve<|im_end|>\n" and "three<|im_end|>\n" after their "<|im_start|>assistant\n" headers
    expected_ids, expected_mask = [], []
    for m in messages:
        head = [tok.convert_tokens_to_ids("<|im_start|>")] + tok(m["role"] + "\n", add_special_tokens=False)["input_ids"]
        body = tok(m["content"], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        body += tok("\n", add_special_tokens=False)["input_ids"]
        expected_ids += head + body
        expected_mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
    assert ids == expected_ids
    assert mask == expected_mask
    assert tok.decode([i for i, k in zip(ids, mask) if k]) == "twelve<|im_end|>\nthree<|im_end|>\n"


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # the last assistant turn is shown in capitals, the earlier ones not: a conversation's
    # beginning is not a prefix of the whole
    rewriting = ("{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}{{ m['content'] | upper }}"
                 "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}")
    tok = _tokenizer(rewriting)
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "one"},
                {"role": "user", "content": "2"}, {"role": "assistant", "content": "two"}]
    with pytest.raises(UserError, match="rewrites earlier turns"):
        encode_conversation(tok, messages)


SPACED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}\n"
          "{% else %}User: {{ m['content'] }}\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}Assistant: {% endif %}")


def test_a_header_space_joined_to_the_first_word_keeps_that_word():
    # A byte-level BPE trained on such dialogues joins the header's trailing space to the next
    # word (" Sure" is one token, starting in the header): that token is the assistant's first word.
    dialogue = "User: hello there\nAssistant: Sure thing!\nUser: how are you\nAssistant: I am fine.\n"
    tok = train_bpe([dialogue] * 20, 300)
    tok.chat_template = SPACED
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "Sure thing!"},
                {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "I am fine."}]
    ids, mask = encode_conversation(tok, messages)
    tokens = tok.convert_ids_to_tokens(ids)
    assert "ĠSure" in tokens and "ĠI" in tokens  # the space is joined (else this test checks nothing)
    assert tok.decode(ids) == dialogue
    # by hand: each assistant turn's content and newline, each led by the header's space that its
    # first token carries; nothing of "User: ..." or of the "Assistant:" word
    assert tok.decode([i for i, k in zip(ids, mask) if k]) == " Sure thing!\n I am fine.\n"
    assert tok.decode([i for i, k in zip(ids, mask) if not k]) == "User: hello there\nAssistant:User: how are you\nAssistant:"
