"""`ParScaleConfig`: the three numbers that turn a causal LM into a ParScale model.

Kept separate from the backbone's transformers config on purpose: the backbone config
describes the shared weights, this one describes the streams wrapped around them, and
it round-trips through JSON on its own (adapters and training runs store it alone).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from parscale.errors import UserError, reject_unknown_fields
from parscale.atomic import atomic_write_json


def _check_int(name: str, value: Any, minimum: int, fix: str) -> None:
    # bool is an int subclass in Python; `n_streams=True` is a mistake, not P = 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__}); {fix}")
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}; {fix}")


@dataclass(frozen=True)
class ParScaleConfig:
    """The parallel-scaling hyper-parameters.

    Args:
        n_streams: P, the number of parallel input streams (1 = the plain model).
        n_prefix_tokens: learnable key/value prefix slots per stream and attention layer.
        attn_smooth: eps in `w*(1-eps) + eps/P`, which keeps every stream's aggregation
            weight at least eps/P so that no stream stops receiving gradient.
        prefix_at_p1: P = 1 with one learnable prefix and no aggregation. Not a released
            layout: it is the control that separates what a prefix (an attention sink) gains
            from what several streams gain. False keeps P = 1 the plain model.
        prefix_init_std: the standard deviation of the prefixes' N(0, std) initialisation. An
            initialisation setting only: checkpoints do not record it (they hold the prefixes).
        prefix_mlp_hidden: 0 learns the prefixes directly. N > 0 reparameterises them, as
            P-tuning v2 and PEFT's `prefix_projection` do: a learnable embedding per stream and
            prefix slot, through `Linear(H, N) -> tanh -> Linear(N, layers*2*kv*head_dim)`,
            produces every layer's K/V prefixes. A training-time choice: `save_pretrained`
            writes the prefixes it produces, so the saved model is a plain ParScale model.
        stream_lora_rank: 0 adds nothing. R > 0 gives every stream its own rank-R LoRA on each
            attention projection (q, k, v, o), ND-LoRA's stream-specific adapters (see
            `stream_lora`); B starts at zero, so a new model computes what it would without them.
            Stream parameters: trained with the streams, saved with them.
        stream_lora_alpha: the adapters' update is scaled by alpha / rank; None: alpha = rank
            (scale 1).

    >>> ParScaleConfig(n_streams=4).n_prefix_tokens
    48
    """

    n_streams: int
    n_prefix_tokens: int = 48
    attn_smooth: float = 0.01
    prefix_at_p1: bool = False
    prefix_init_std: float = 0.02
    prefix_mlp_hidden: int = 0
    stream_lora_rank: int = 0
    stream_lora_alpha: float | None = None

    def __post_init__(self) -> None:
        _check_int("n_streams", self.n_streams, 1, "use n_streams=1 for the plain model or e.g. 2, 4, 8")
        _check_int("n_prefix_tokens", self.n_prefix_tokens, 1, "the released models use 48")
        eps = self.attn_smooth
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise UserError(f"attn_smooth must be a number in [0, 1), got {eps!r}; the default is 0.01")
        if not 0.0 <= float(eps) < 1.0:
            raise UserError(
                f"attn_smooth must be in [0, 1), got {eps}; 0 disables smoothing, "
                "the default is 0.01 and the released models use 0.1"
            )
        object.__setattr__(self, "attn_smooth", float(eps))
        if not isinstance(self.prefix_at_p1, bool):
            raise UserError(f"prefix_at_p1 must be true or false, got {self.prefix_at_p1!r}")
        if self.prefix_at_p1 and self.n_streams != 1:
            raise UserError(f"prefix_at_p1 is for n_streams=1 (every stream of P={self.n_streams} already "
                            "has its prefix); drop prefix_at_p1")
        std = self.prefix_init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0.0 < float(std) < float("inf"):
            raise UserError(f"prefix_init_std must be a positive number, got {std!r}; the default is 0.02 "
                            "(zero would make every stream identical, and identical streams never diverge)")
        object.__setattr__(self, "prefix_init_std", float(std))
        _check_int("prefix_mlp_hidden", self.prefix_mlp_hidden, 0, "0 learns the prefixes directly, e.g. 64 "
                   "produces them with a small MLP")
        if self.prefix_mlp_hidden and not self.has_prefixes:
            raise UserError("prefix_mlp_hidden produces prefixes, and a plain P = 1 model has none; "
                            "use n_streams >= 2 or prefix_at_p1=True, or drop prefix_mlp_hidden")
        self._check_stream_lora()

    def _check_stream_lora(self) -> None:
        _check_int("stream_lora_rank", self.stream_lora_rank, 0, "0 adds no adapters, e.g. 8 or 16 gives each "
                   "stream its own LoRA of that rank")
        if self.stream_lora_rank and not self.has_prefixes:
            raise UserError("stream_lora_rank gives each stream its own adapter, and a plain P = 1 model has no "
                            "streams; use n_streams >= 2 (or prefix_at_p1=True), or drop stream_lora_rank")
        alpha = self.stream_lora_alpha
        if alpha is None:
            return
        if not self.stream_lora_rank:
            raise UserError("stream_lora_alpha scales the stream adapters; set stream_lora_rank too, or drop it")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < float("inf"):
            raise UserError(f"stream_lora_alpha must be a positive number, got {alpha!r}; the default (None) is "
                            "the rank, a scale of 1")
        object.__setattr__(self, "stream_lora_alpha", float(alpha))

    @property
    def has_prefixes(self) -> bool:
        """Whether attention prepends learnable prefixes (every P > 1, and the P = 1 control)."""
        return self.n_streams > 1 or self.prefix_at_p1

    @property
    def stream_lora_scale(self) -> float:
        """alpha / rank, what the stream adapters' update is multiplied by (1 by default)."""
        if not self.stream_lora_rank:
            return 0.0
        alpha = self.stream_lora_alpha if self.stream_lora_alpha is not None else self.stream_lora_rank
        return alpha / self.stream_lora_rank

    def to_dict(self) -> dict[str, Any]:
        """The fields; the optional ones only when they differ from their defaults, so files
        written without them keep their old layout."""
        data = asdict(self)
        for name, default in (("prefix_at_p1", False), ("prefix_init_std", 0.02), ("prefix_mlp_hidden", 0),
                              ("stream_lora_rank", 0), ("stream_lora_alpha", None)):
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ParScaleConfig":
        reject_unknown_fields(cls, data, "ParScaleConfig field(s)")
        return cls(**data)

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write atomically, so a crash never leaves a half-written config behind."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ParScaleConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err}); rewrite it with ParScaleConfig.to_json_file") from err
        if not isinstance(data, dict):
            raise UserError(f"{path} must hold a JSON object with n_streams, n_prefix_tokens, attn_smooth")
        return cls.from_dict(data)
