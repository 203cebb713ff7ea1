"""ParScaleConfig: validation messages and the JSON round trip."""
from __future__ import annotations

import dataclasses
import json

import pytest

from parscale.model.config import ParScaleConfig
from parscale.errors import UserError


def test_defaults_match_the_paper_and_release():
    cfg = ParScaleConfig(n_streams=4)
    assert (cfg.n_streams, cfg.n_prefix_tokens, cfg.attn_smooth) == (4, 48, 0.01)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(n_streams=0), r"n_streams must be >= 1, got 0"),
        (dict(n_streams=-2), r"n_streams must be >= 1, got -2"),
        (dict(n_streams=2.0), r"n_streams must be an integer >= 1, got 2\.0 \(float\)"),
        (dict(n_streams=True), r"n_streams must be an integer >= 1, got True \(bool\)"),
        (dict(n_streams="4"), r"n_streams must be an integer"),
        (dict(n_streams=2, n_prefix_tokens=0), r"n_prefix_tokens must be >= 1, got 0"),
        (dict(n_streams=2, n_prefix_tokens=1.5), r"n_prefix_tokens must be an integer"),
        (dict(n_streams=2, attn_smooth=1.0), r"attn_smooth must be in \[0, 1\), got 1\.0"),
        (dict(n_streams=2, attn_smooth=-0.1), r"attn_smooth must be in \[0, 1\), got -0\.1"),
        (dict(n_streams=2, attn_smooth="0.1"), r"attn_smooth must be a number"),
    ],
)
def test_bad_values_raise_user_errors_naming_field_and_value(kwargs, pattern):
    with pytest.raises(UserError, match=pattern):
        ParScaleConfig(**kwargs)


def test_user_error_is_a_value_error():
    with pytest.raises(ValueError):
        ParScaleConfig(n_streams=0)


def test_edge_values_are_accepted():
    assert ParScaleConfig(1, 1, 0.0).attn_smooth == 0.0
    assert isinstance(ParScaleConfig(2, attn_smooth=0).attn_smooth, float)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ParScaleConfig(2).n_streams = 3


def test_json_round_trip(tmp_path):
    cfg = ParScaleConfig(n_streams=8, n_prefix_tokens=16, attn_smooth=0.1)
    path = tmp_path / "parscale.json"
    cfg.to_json_file(path)
    assert json.loads(path.read_text()) == {"n_streams": 8, "n_prefix_tokens": 16, "attn_smooth": 0.1}
    assert ParScaleConfig.from_json_file(path) == cfg
    assert ParScaleConfig.from_dict(cfg.to_dict()) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["parscale.json"]  # no temp file left behind


def test_bad_json_is_a_user_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"n_streams": 2, "streams": 4}')
    with pytest.raises(UserError, match=r"unknown ParScaleConfig field\(s\) streams; known: attn_smooth, n_prefix_tokens, n_streams"):
        ParScaleConfig.from_json_file(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        ParScaleConfig.from_json_file(path)
    path.write_text('{"n_streams": 0}')
    with pytest.raises(UserError, match="n_streams must be >= 1"):
        ParScaleConfig.from_json_file(path)
