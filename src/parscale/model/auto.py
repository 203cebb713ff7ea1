"""`qwen2_parscale` in transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(DIR)` works.

The released checkpoints say `model_type: qwen2_parscale`, which transformers does not know;
the authors' answer is remote code. We register our own classes instead: `AutoConfig` maps the
model type to `Qwen2ParScaleConfig` (Qwen2's config plus the three `parscale_*` fields), and
`AutoModelForCausalLM` maps that config to `Qwen2ParScaleForCausalLM` (our wrapper under the
released architecture name), so pipelines, lm-eval and TRL load these directories without
`trust_remote_code`. `import parscale` arranges the registration (see `autoload`, which
imports this module and the wrapper; this module imports neither, so the folder reads
top-down: autoload -> wrapper -> auto).
"""
from __future__ import annotations

import logging

from huggingface_hub.dataclasses import strict

# Full module paths, not `from transformers import ...`: this module may be imported while
# transformers' Auto modules are still being imported (see `autoload`), and the lazy top-level
# names would re-enter them.
from transformers.models.auto.configuration_auto import AutoConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

RELEASED_MODEL_TYPE = "qwen2_parscale"  # as in `format` (not imported here, for the same reason)

logger = logging.getLogger(__name__)


@strict
class Qwen2ParScaleConfig(Qwen2Config):
    """Qwen2's config plus the released `parscale_*` fields (P, prefix length, smoothing)."""

    model_type = RELEASED_MODEL_TYPE

    parscale_n: int = 1
    parscale_n_tokens: int = 48
    parscale_attn_smooth: float = 0.01


def register_config() -> None:
    """AutoConfig: `qwen2_parscale` -> Qwen2ParScaleConfig (idempotent)."""
    AutoConfig.register(RELEASED_MODEL_TYPE, Qwen2ParScaleConfig, exist_ok=True)


def register_model(model_class: type) -> None:
    """AutoModelForCausalLM: Qwen2ParScaleConfig -> `model_class`, the wrapper's
    Qwen2ParScaleForCausalLM (idempotent); registers the config too."""
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    register_config()
    AutoModelForCausalLM.register(Qwen2ParScaleConfig, model_class, exist_ok=True)
