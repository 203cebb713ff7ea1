"""Counts in messages agree with their noun: "1 new token", "1 document", "1 shard"."""
from __future__ import annotations

import logging

from _chartok import char_tokenizer

from parscale.cli.data import format_summary
from parscale.cli.main import main
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale


def test_generate_counts_new_tokens_in_the_right_number(tmp_path, tiny_factory, caplog, capsys):
    to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3), seed=0).save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")  # no EOS: generation never stops early
    for n, words in ((1, "1 new token"), (2, "2 new tokens")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="parscale"):
            assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "ab", "--max-new-tokens", str(n)]) == 0
        said = [r.getMessage() for r in caplog.records if "new token" in r.getMessage()]
        assert said == [f"P=2 streams, {words}"]


def test_prepare_summary_counts_in_the_right_number():
    result = {"seconds": 1.0, "tokens_per_s": 5.0, "skipped": [],
              "splits": {"train": {"docs": 2, "tokens": 4, "shards": 2}, "val": {"docs": 1, "tokens": 1, "shards": 1}}}
    lines = format_summary("out", result).splitlines()
    assert lines[1].split() == ["train", "2", "documents", "4", "tokens", "2", "shards"]
    assert lines[2].split() == ["val", "1", "document", "1", "token", "1", "shard"]
