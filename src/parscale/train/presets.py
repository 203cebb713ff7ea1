"""Qwen2-style architectures by name, so a run can say `--preset tiny` instead of a config file.

`tiny` is the architecture of the project's mini-study (d=128, 4 layers, 4 query / 2 KV heads,
FFN 352): its learning rate and budget are measured to train in a few minutes on two CPU
cores, which is what a first run and the tests need. `small` is the next step up (about 5.6M
non-embedding parameters). The `law-*` sizes are the `law` budget's small models, sized to train
on 20 or more tokens per parameter in that budget's time (`law-gpu-*`: `law-gpu`'s, 10x larger). The `paper-*` presets are the six sizes of the ParScale paper's
scaling-law runs (36 layers, 16 heads, 2 KV heads), named by their non-embedding parameter
count. The vocabulary of a model trained from scratch follows the tokenizer, so the
vocab size given here (the paper's 151936) is replaced by the run's tokenizer size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parscale.errors import UserError

_SMALL_MODELS = {
    # name: (hidden, intermediate, layers, heads, kv_heads, max_positions)
    "tiny": (128, 352, 4, 4, 2, 1024),
    # The demo's comparisons: `tiny-wide` has 1.27x tiny's non-embedding parameters, what the
    # paper's law (k = 0.39) says two streams are worth; `tiny-xs` and `tiny-s` (0.26x, 0.56x)
    # are the other two sizes of the longer study's own law fit, `tiny-l` (2.25x) one step up.
    "tiny-wide": (144, 400, 4, 4, 2, 1024),
    "tiny-xs": (64, 176, 4, 4, 2, 1024),
    "tiny-s": (96, 264, 4, 4, 2, 1024),
    "tiny-l": (192, 528, 4, 4, 2, 1024),
    # The `law` budget's sizes (docs/mini-study.md): 4 layers, FFN 2.75 d like `tiny`, but two
    # query heads and one KV head (head dim 12-24), which trained 1.5x faster per token than
    # four heads at these widths; 26k / 47k / 104k non-embedding parameters, and `law-s-wide`
    # 1.27x `law-s` (d and FFN widened as `tiny-wide` widens `tiny`).
    "law-xs": (24, 66, 4, 2, 1, 1024),
    "law-s": (32, 88, 4, 2, 1, 1024),
    "law-s-wide": (36, 100, 4, 2, 1, 1024),
    "law-m": (48, 132, 4, 2, 1, 1024),
    # The `law-gpu` budget's sizes: the same shapes at 10x the non-embedding parameters
    # (262k / 488k / 1.04M; `law-gpu-s-wide` 620k, 1.27x `law-gpu-s`).
    "law-gpu-xs": (76, 210, 4, 2, 1, 1024),
    "law-gpu-s": (104, 286, 4, 2, 1, 1024),
    "law-gpu-s-wide": (116, 328, 4, 2, 1, 1024),
    "law-gpu-m": (152, 418, 4, 2, 1, 1024),
    "small": (256, 704, 8, 8, 2, 2048),
}
_PAPER_SIZES = {
    "paper-0.5b": (896, 4864),
    "paper-0.7b": (1024, 5504),
    "paper-1.1b": (1280, 6912),
    "paper-1.6b": (1536, 8320),
    "paper-2.8b": (2048, 11008),
    "paper-4.4b": (2560, 13824),
}
PAPER_VOCAB = 151936
PRESETS = tuple(_SMALL_MODELS) + tuple(_PAPER_SIZES)


def preset_dict(name: str) -> dict[str, Any]:
    """The Qwen2 config fields of a preset (vocab_size is the paper's; callers override it)."""
    if name in _SMALL_MODELS:
        hidden, inter, layers, heads, kv, max_pos = _SMALL_MODELS[name]
        rope_theta = 10000.0
    elif name in _PAPER_SIZES:
        (hidden, inter), layers, heads, kv, max_pos = _PAPER_SIZES[name], 36, 16, 2, 4096
        rope_theta = 1000000.0
    else:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} "
                        "(or give a transformers config JSON with --model-config)")
    return {
        "model_type": "qwen2", "vocab_size": PAPER_VOCAB, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "max_position_embeddings": max_pos,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": True, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": False,
    }


def load_config_json(path: str | Path) -> dict[str, Any]:
    """A transformers config.json (a file, or a directory holding one) as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"model config {str(path)!r} does not exist; give a transformers "
                        "config.json file or a directory holding one")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"model config {str(path)!r} is not valid JSON: {err}") from err
    if "model_type" not in fields:
        raise UserError(f"model config {str(path)!r} has no 'model_type'; add e.g. "
                        '"model_type": "qwen2"')
    return fields


def build_hf_config(fields: dict[str, Any], vocab_size: int | None = None):
    """A transformers config from a dict of fields, with the vocabulary set to the tokenizer's."""
    from transformers import AutoConfig

    fields = dict(fields)
    model_type = fields.pop("model_type")
    for key in ("architectures", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    if vocab_size is not None:
        fields["vocab_size"] = int(vocab_size)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as err:
        raise UserError(f"cannot build a model config of type {model_type!r}: {err}") from err
