"""Finding the parts of an arbitrary transformers causal LM, and refusing what we cannot wrap.

All architecture knowledge the wrapper needs lives here, read through public attributes
(`get_decoder()`, `get_input_embeddings()`, `get_output_embeddings()`, config fields), so
that no `model_type` branch is spread through the code.
"""
from __future__ import annotations

from torch import nn

from parscale.errors import UserError
from parscale.model.prefix_attention import IMPLEMENTATIONS, plain_kind

# Config fields whose features the prefix-attention route cannot honour (value must be unset).
_UNSUPPORTED_CONFIG_FIELDS = {
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
}
# Config fields that rescale the logits inside the model's own causal-LM head.
_LOGIT_SCALES = ("logit_scale", "logits_scaling")
_ATTENTION_NAMES = ("self_attn", "attention", "attn")
# The separate query, key, value and output projections of Llama/Qwen2/Mistral-style attention.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} (model_type={getattr(config, 'model_type', '?')!r})"


def check_supported(model: nn.Module) -> None:
    """Raise a `UserError` naming the architecture if ParScale cannot wrap `model` faithfully."""
    name = _name(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_decoder") or model.get_output_embeddings() is None:
        raise UserError(f"{name} is not a transformers causal LM with an lm_head; load it with AutoModelForCausalLM")
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{name} is an encoder-decoder model; ParScale wraps decoder-only causal LMs")
    for field, feature in _UNSUPPORTED_CONFIG_FIELDS.items():
        if getattr(config, field, None) is not None:
            raise UserError(f"{name} uses {feature} ({field}={getattr(config, field)}), which ParScale cannot honour")
    requested = str(getattr(config, "_attn_implementation", "") or "")
    # ours (a config copied from a ParScale model) stand for the stock kinds they wrap
    if requested and plain_kind(requested) not in IMPLEMENTATIONS:
        raise UserError(
            f"{name} was loaded with attn_implementation={requested!r}, which cannot carry the stream prefixes; "
            "reload it with attn_implementation='sdpa' (or 'eager', or 'flash_attention_2')"
        )
    if not (getattr(model, "_supports_sdpa", False) and model._can_set_attn_implementation()):
        raise UserError(
            f"{name} does not route its attention through transformers' AttentionInterface with sdpa support, "
            "so the stream prefixes cannot be inserted; use a Llama/Qwen2/Mistral-style architecture"
        )
    for field in _LOGIT_SCALES:
        if getattr(config, field, None) not in (None, 1, 1.0):
            raise UserError(f"{name} rescales its logits ({field}={getattr(config, field)}), which ParScale does not replicate")
    attentions = attention_modules(model)
    if any(hasattr(module, "sinks") for module in attentions):
        raise UserError(f"{name} uses attention sinks, which ParScale cannot honour")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{_name(model)} has no `layers` list on its decoder; this architecture is not supported")
    return layers


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder layer, in order."""
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        module = next((getattr(layer, n) for n in _ATTENTION_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
        if module is None:
            raise UserError(f"{_name(model)}: decoder layer {index} has no attention module named one of {_ATTENTION_NAMES}")
        found.append(module)
    return found


def attention_projections(model: nn.Module) -> list[tuple[str, ...]]:
    """The names of every attention module's q, k, v and o projections, in layer order; a
    `UserError` naming the architecture if one is missing (e.g. a fused qkv projection)."""
    found = []
    for index, module in enumerate(attention_modules(model)):
        missing = [n for n in ATTENTION_PROJECTIONS if not hasattr(getattr(module, n, None), "in_features")]
        if missing:
            raise UserError(f"{_name(model)}: attention layer {index} has no separate {', '.join(missing)} "
                            f"projection(s), which per-stream adapters need ({', '.join(ATTENTION_PROJECTIONS)}, "
                            "as in Llama/Qwen2/Mistral); use stream_lora_rank=0")
        found.append(ATTENTION_PROJECTIONS)
    return found


def kv_geometry(config) -> tuple[int, int]:
    """`(n_kv_heads, head_dim)` of the attention keys, from the backbone config."""
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_kv_heads, head_dim
