"""The inference-cost model: parameter counts, memory terms and a roofline latency.

Pure functions of a `ModelShape`, a `Workload` and a `Hardware` profile. Every formula
carries a one-line derivation. The decomposition follows llm-analysis (the library the
paper's own script drives) so that the numbers line up with the paper's, with its two
known ParScale mistakes fixed: the aggregation head is charged at every decode step,
and the prefix slots are attended to but never projected (docs/cost.md lists every
place where this model differs and why).

Notation: L layers, h hidden, I intermediate, nh heads, kvh key/value heads,
d = h/nh the head dim, kv = kvh*d, V vocab, P streams, B batch, R = P*B stream rows,
t new tokens of a forward pass, c the tokens it attends to, b bytes per element.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from parscale.errors import UserError
from parscale.cost.hardware import Hardware

GIB = 2**30
PREFIX_STORAGE = ("per-row", "shared")
KV_TRAFFIC = ("exact", "llm-analysis")


def _positive_int(name: str, value: Any, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}; {fix}")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that decide its cost.

    >>> PRESETS["1.6B"].hidden
    1536
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    gated_mlp: bool = True
    tied_embeddings: bool = True
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type in ("int", int):
                _positive_int(f.name, getattr(self, f.name), "sizes count layers, units or tokens")
        if self.hidden % self.heads:
            raise UserError(
                f"heads ({self.heads}) must divide hidden ({self.hidden}); "
                f"pick e.g. heads={_divisor_near(self.hidden, self.heads)}"
            )
        if self.heads % self.kv_heads:
            raise UserError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads}) (grouped-query attention)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelShape":
        """Read a transformers config (Qwen2/Llama-style field names)."""
        bias = getattr(config, "attention_bias", None)
        if bias is None:  # Qwen2 always has q/k/v biases and has no flag for it.
            bias = getattr(config, "model_type", "") == "qwen2"
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            vocab=config.vocab_size,
            gated_mlp=True,  # Qwen2/Llama MLPs are gate/up/down (SwiGLU)
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=bool(bias),
        )


def _divisor_near(n: int, k: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - k))


def _paper(hidden: int, intermediate: int) -> ModelShape:
    return ModelShape(layers=36, hidden=hidden, intermediate=intermediate, heads=16, kv_heads=2, vocab=151936)


# The paper's six sizes (Qwen-2.5-style, 36 layers); named by non-embedding params at P = 1.
PRESETS: dict[str, ModelShape] = {
    "0.5B": _paper(896, 4864),
    "0.7B": _paper(1024, 5504),
    "1.1B": _paper(1280, 6912),
    "1.6B": _paper(1536, 8320),
    "2.8B": _paper(2048, 11008),
    "4.4B": _paper(2560, 13824),
}


@dataclass(frozen=True)
class Workload:
    """What is run: P streams with their prefixes, a batch, the lengths and the dtype."""

    n_streams: int = 1
    prefix_tokens: int = 48
    batch_size: int = 1
    input_length: int = 64
    output_length: int = 64
    dtype_bytes: int = 2
    prefix_storage: str = "shared"
    kv_traffic: str = "llm-analysis"

    def __post_init__(self) -> None:
        if isinstance(self.n_streams, bool) or not isinstance(self.n_streams, int) or self.n_streams < 1:
            raise UserError(f"P must be an integer >= 1, got {self.n_streams!r}; P = 1 is the plain model")
        if isinstance(self.prefix_tokens, bool) or not isinstance(self.prefix_tokens, int) or self.prefix_tokens < 0:
            raise UserError(f"prefix tokens must be an integer >= 0, got {self.prefix_tokens!r}; the paper uses 48")
        _positive_int("batch size", self.batch_size, "use 1 for a single request")
        _positive_int("input length", self.input_length, "lengths are token counts > 0")
        _positive_int("output length", self.output_length, "lengths are token counts > 0")
        _positive_int("dtype bytes", self.dtype_bytes, "2 for bf16/fp16, 4 for fp32")
        if self.prefix_storage not in PREFIX_STORAGE:
            raise UserError(f"prefix storage must be one of {PREFIX_STORAGE}, got {self.prefix_storage!r}")
        if self.kv_traffic not in KV_TRAFFIC:
            raise UserError(f"kv traffic must be one of {KV_TRAFFIC}, got {self.kv_traffic!r}")

    @property
    def prefix(self) -> int:
        """Prefix slots actually used: P = 1 is the plain model, without prefixes."""
        return self.prefix_tokens if self.n_streams > 1 else 0


# ---------------------------------------------------------------- parameter counts
def attention_params(s: ModelShape) -> int:
    """q and o are h x h, k and v are h x kv; Qwen2 adds biases on q, k, v."""
    return 2 * s.hidden**2 + 2 * s.hidden * s.kv_dim + (s.hidden + 2 * s.kv_dim if s.qkv_bias else 0)


def mlp_params(s: ModelShape) -> int:
    """gate, up (h x I) and down (I x h) when gated; up and down otherwise."""
    return (3 if s.gated_mlp else 2) * s.hidden * s.intermediate


def backbone_params(s: ModelShape) -> int:
    """L blocks of attention + MLP + two RMSNorm vectors, and the final norm.

    For the paper's shapes (nh = 16, kvh = 2): 81h^2 + 108hI + 118h.
    """
    return s.layers * (attention_params(s) + mlp_params(s) + 2 * s.hidden) + s.hidden


def prefix_params(s: ModelShape, n_streams: int, prefix_tokens: int = 48) -> int:
    """A key and a value per stream, layer, KV head and prefix slot: 2*P*L*kvh*T*d."""
    if n_streams <= 1:
        return 0
    return 2 * n_streams * s.layers * s.kv_heads * prefix_tokens * s.head_dim


def aggregation_params(s: ModelShape, n_streams: int) -> int:
    """Linear(P*h, h) and Linear(h, P), both with bias: P*h^2 + h + h*P + P."""
    if n_streams <= 1:
        return 0
    return n_streams * s.hidden**2 + s.hidden + s.hidden * n_streams + n_streams


def stream_params(s: ModelShape, n_streams: int, prefix_tokens: int = 48) -> int:
    """What P streams add to the backbone: prefixes + aggregation head."""
    return prefix_params(s, n_streams, prefix_tokens) + aggregation_params(s, n_streams)


def non_embedding_params(s: ModelShape, n_streams: int = 1, prefix_tokens: int = 48) -> int:
    """N of the scaling law: everything but the token embedding and the lm_head."""
    return backbone_params(s) + stream_params(s, n_streams, prefix_tokens)


def embedding_params(s: ModelShape) -> int:
    """The V x h table, counted twice when the lm_head is not tied to it."""
    return s.vocab * s.hidden * (1 if s.tied_embeddings else 2)


def total_params(s: ModelShape, n_streams: int = 1, prefix_tokens: int = 48) -> int:
    return non_embedding_params(s, n_streams, prefix_tokens) + embedding_params(s)


# ---------------------------------------------------------------- memory terms (bytes)
def weight_bytes(s: ModelShape, w: Workload) -> int:
    """Every parameter once, prefixes and aggregation head included."""
    return total_params(s, w.n_streams, w.prefix_tokens) * w.dtype_bytes


def kv_cache_bytes(s: ModelShape, w: Workload) -> int:
    """P*B*(in+out)*L*2*kv*b for the tokens. Shared prefixes are the prefix parameters
    themselves (already in the weights); per-row storage adds P*B*T copied slots."""
    rows = w.n_streams * w.batch_size
    slots = w.prefix * rows if w.prefix_storage == "per-row" else 0
    tokens = rows * (w.input_length + w.output_length) + slots
    return s.layers * 2 * s.kv_dim * w.dtype_bytes * tokens


def activation_bytes(s: ModelShape, w: Workload) -> int:
    """Peak transient buffer of the prefill (the largest single tensor, buffers reused).

    Per layer on R rows of t prompt tokens: attention max(3*R*t*h, 2*R*t*h + 4*nh*R*t)
    (q/k/v, or flash-attention in/out + softmax stats), MLP R*t*I, norm R*t*h; then the
    logits B*t*V, which are computed after aggregation and so on B rows only.
    """
    rows, t = w.n_streams * w.batch_size, w.input_length
    attn = max(3 * rows * t * s.hidden, 2 * rows * t * s.hidden + 4 * s.heads * rows * t)
    per_layer = max(attn, rows * t * s.intermediate, rows * t * s.hidden)
    return max(per_layer, w.batch_size * t * s.vocab) * w.dtype_bytes


# ---------------------------------------------------------------- latency (seconds)
def op_time(flops: Any, nbytes: Any, hw: Hardware) -> Any:
    """Roofline: an operation takes as long as the slower of its compute and its traffic."""
    return np.maximum(flops / (hw.peak_flops * hw.flops_efficiency), nbytes / (hw.bandwidth * hw.memory_efficiency))


def attention_core_flops(s: ModelShape, rows: int, t: int, past: Any) -> Any:
    """QK^T and AV cost 2*h each per (query, key) pair; query i of t sees past + i keys
    (causal), so the pairs are t*past + t*(t+1)/2."""
    return 4 * s.hidden * rows * (t * past + t * (t + 1) / 2)


def layer_time(s: ModelShape, w: Workload, rows: int, t: int, past: Any, hw: Hardware) -> Any:
    """One transformer block on `rows` rows of `t` new tokens, `past` tokens cached.

    Projections run on the new tokens only (prefix slots are never projected); the
    attention core reads the whole cache, prefix included.
    """
    b = w.dtype_bytes
    proj = 2 * rows * t * (2 * s.hidden**2 + 2 * s.hidden * s.kv_dim)  # 2 flops per MAC
    kv_read = rows * past * 2 * s.kv_dim * b  # K and V of every cached token
    kv_write = rows * t * 2 * s.kv_dim * b
    attn_bytes = attention_params(s) * b + 3 * rows * t * s.hidden * b
    if w.kv_traffic == "exact":
        attn_bytes = attn_bytes + kv_read + kv_write
    gemm = hw.gemm_factor(rows * t)  # measured matmul efficiency at this many rows (CPU); else 1
    attn = op_time(proj + attention_core_flops(s, rows, t, past), attn_bytes, hw) / gemm
    mlp_flops = (6 if s.gated_mlp else 4) * rows * t * s.hidden * s.intermediate
    mlp = op_time(mlp_flops, mlp_params(s) * b + rows * t * s.intermediate * b, hw) / gemm
    norms = 2 * op_time(0, 2 * rows * t * s.hidden * b, hw)  # read + write, memory bound
    return attn + mlp + norms + hw.layer_overhead_s  # fixed eager cost (0 for GPU profiles)


def head_time(s: ModelShape, w: Workload, t: int, hw: Hardware) -> float:
    """Embedding lookup, final norm, aggregation head and lm_head for one forward pass.

    The embedding and the lm_head run on B rows; the aggregation (P > 1) mixes the P
    stream states of each of the B rows before the lm_head.
    """
    b, h, p, rows = w.dtype_bytes, s.hidden, w.n_streams, w.n_streams * w.batch_size
    bt = w.batch_size * t
    lookup = op_time(0, (bt + rows * t) * h * b, hw)  # gather B*t rows, copy to P streams
    final_norm = op_time(0, 2 * rows * t * h * b, hw)
    aggregate = 0.0
    if p > 1:  # MLP on the P*h interleaved states, softmax over P, weighted sum
        agg_flops = 2 * bt * (p * h * h + h * p) + 2 * bt * p * h
        agg_bytes = aggregation_params(s, p) * b + (2 * p * h + h) * bt * b
        aggregate = op_time(agg_flops, agg_bytes, hw) / hw.gemm_factor(bt)
    lm_head = op_time(2 * bt * s.vocab * h, s.vocab * h * b + bt * s.vocab * b, hw) / hw.gemm_factor(bt)
    return float(lookup + final_norm + aggregate + lm_head)


def llm_analysis_kv_time(s: ModelShape, w: Workload, hw: Hardware) -> float:
    """llm-analysis charges every decode step a load and a store of the whole final cache.

    The prefix slots count once per row whatever the storage: every row's attention reads
    them (and parscale.model.wrapper materialises them per row, layer and step).
    """
    per_row = kv_cache_bytes(s, replace(w, prefix_storage="per-row"))
    return 2 * per_row / (hw.bandwidth * hw.memory_efficiency)


def prefill_time(s: ModelShape, w: Workload, hw: Hardware) -> float:
    """The prompt on P*B rows, attending to the prefix slots."""
    rows = w.n_streams * w.batch_size
    layers = s.layers * layer_time(s, w, rows, w.input_length, w.prefix, hw)
    return float(layers + head_time(s, w, w.input_length, hw))


def decode_times(s: ModelShape, w: Workload, hw: Hardware) -> np.ndarray:
    """Each of the output tokens: one new token per row; step i sees prefix + in + i cached.

    Vectorised over the steps so that long outputs cost one numpy call, not a loop.
    """
    rows = w.n_streams * w.batch_size
    past = w.prefix + w.input_length + np.arange(w.output_length, dtype=np.float64)
    steps = s.layers * layer_time(s, w, rows, 1, past, hw) + head_time(s, w, 1, hw)
    if w.kv_traffic == "llm-analysis":
        steps = steps + llm_analysis_kv_time(s, w, hw)
    return np.asarray(steps)


@dataclass(frozen=True)
class CostResult:
    """Memory (bytes) by term and latency (seconds) of one configuration."""

    weights: int
    kv_cache: int
    activation: int
    prefill_s: float
    decode_s: float
    fits: bool
    terms: dict[str, int] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int:
        return self.weights + self.kv_cache + self.activation

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    @property
    def latency_s(self) -> float:
        return self.prefill_s + self.decode_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "memory_gib": self.memory_gib,
            "latency_s": self.latency_s,
            "memory_bytes": self.memory_bytes,
            "weights_bytes": self.weights,
            "kv_cache_bytes": self.kv_cache,
            "activation_bytes": self.activation,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "fits": self.fits,
            **self.terms,
        }


def estimate(s: ModelShape, w: Workload, hw: Hardware) -> CostResult:
    """Memory and latency of prefill + every decode step for one configuration."""
    weights, kv, act = weight_bytes(s, w), kv_cache_bytes(s, w), activation_bytes(s, w)
    decode = decode_times(s, w, hw)
    terms = {
        "non_embedding_params": non_embedding_params(s, w.n_streams, w.prefix_tokens),
        "total_params": total_params(s, w.n_streams, w.prefix_tokens),
        "stream_params": stream_params(s, w.n_streams, w.prefix_tokens),
    }
    return CostResult(
        weights=weights,
        kv_cache=kv,
        activation=act,
        prefill_s=prefill_time(s, w, hw),
        decode_s=float(decode.sum()),
        fits=weights + kv + act <= hw.memory_bytes,
        terms=terms,
    )
