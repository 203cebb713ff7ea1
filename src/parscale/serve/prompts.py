"""The rules of serving a ParScale checkpoint in vLLM, as plain functions (no vLLM import).

vLLM's paged cache holds keys and values of tokens only, so the T stream prefixes of every
attention layer enter it as T *prefix slots*: placeholder tokens prepended to every prompt
whose keys and values the model overwrites with the prefixes (see `parscale.serve.model`).
The slots cost T positions of the context, and with prefix caching their cache blocks are
computed once and shared by every request. These functions say which checkpoints can be
served that way, how many slots a model takes, and how a prompt is extended and checked;
the CLI checks a directory with them before starting an engine.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parscale.errors import UserError
from parscale.model.format import CONFIG_MAP, RELEASED_ARCHITECTURE, RELEASED_MODEL_TYPE, STREAM_LORA_MAP

SERVABLE_MODEL_TYPES = (RELEASED_MODEL_TYPE, "qwen2")
SLOT_TOKEN_ID = 0  # any id works: the slots' keys and values are overwritten in every layer
# Qwen2 features the plugin's attention does not carry over from vLLM's Qwen2 model.
_UNSUPPORTED = {"use_sliding_window": "sliding-window attention", "qk_norm": "query/key normalisation"}


def n_streams(config: Any) -> int:
    """P of a config object or config.json dict (1 when the checkpoint has no parscale_n)."""
    return int(_get(config, CONFIG_MAP["n_streams"], 1) or 1)


def n_prefix_slots(config: Any) -> int:
    """T, the prefix slots each prompt takes: the prefix length for P > 1, none at P = 1."""
    return int(_get(config, CONFIG_MAP["n_prefix_tokens"], 48)) if n_streams(config) > 1 else 0


def _get(config: Any, name: str, default: Any) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def check_servable(config: Any) -> None:
    """Raise a `UserError` unless vLLM can serve this checkpoint through the plugin."""
    model_type = _get(config, "model_type", None)
    if model_type not in SERVABLE_MODEL_TYPES:
        raise UserError(
            f"this ParScale checkpoint has a {model_type!r} backbone; the vLLM plugin serves Qwen2 backbones "
            f"(model_type {RELEASED_MODEL_TYPE!r}) only; serve it with `parscale generate` or convert a Qwen2 model"
        )
    for field, feature in _UNSUPPORTED.items():
        if _get(config, field, False):
            raise UserError(f"the checkpoint uses {feature} ({field}=true), which the vLLM plugin does not support")
    if _get(config, STREAM_LORA_MAP["stream_lora_rank"], 0):
        raise UserError("the checkpoint has per-stream adapters on its attention projections "
                        f"({STREAM_LORA_MAP['stream_lora_rank']}), which the vLLM plugin does not apply; "
                        "serve it with `parscale generate`")
    heads, hidden = _get(config, "num_attention_heads", 0), _get(config, "hidden_size", 0)
    head_dim = _get(config, "head_dim", None)
    if head_dim is not None and heads and head_dim * heads != hidden:
        raise UserError(
            f"head_dim={head_dim} differs from hidden_size/num_attention_heads={hidden}/{heads}; "
            "vLLM's Qwen2 layers derive head_dim from hidden_size"
        )


def read_config(directory: str | Path) -> dict[str, Any]:
    """config.json of a model directory, checked to be servable; a clear error otherwise."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UserError(f"{directory} has no config.json; pass a directory written by save_pretrained")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from err
    check_servable(config)
    architectures = config.get("architectures") or [RELEASED_ARCHITECTURE]
    if config.get("model_type") == RELEASED_MODEL_TYPE and architectures != [RELEASED_ARCHITECTURE]:
        raise UserError(f"{path} lists architectures {architectures}; a qwen2_parscale checkpoint has "
                        f"[{RELEASED_ARCHITECTURE!r}]")
    return config


def extend_prompt(token_ids: list[int], n_slots: int, max_model_len: int) -> list[int]:
    """`[slot]*T + token_ids`, after checking that the prompt fits the usable context.

    The usable context is `max_model_len - T`, and at least one position must stay free for
    the first generated token.
    """
    if not token_ids:
        raise UserError("the prompt is empty; give at least one token")
    usable = max_model_len - n_slots
    if len(token_ids) >= usable:
        raise UserError(
            f"the prompt has {len(token_ids)} tokens, but this ParScale model's usable context is {usable} tokens "
            f"(max_model_len {max_model_len} minus {n_slots} prefix slots) including at least one generated token; "
            "shorten the prompt or raise --max-model-len"
        )
    return [SLOT_TOKEN_ID] * n_slots + list(token_ids)
