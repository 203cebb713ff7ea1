"""The model: P streams over any transformers decoder-only causal LM.

Lives here: `config` (ParScaleConfig), `wrapper` (ParScaleForCausalLM, to_parscale), `streams`
(the per-stream prefixes), `stream_lora` (per-stream LoRA on the attention projections),
`prefix_attention` (the attention and mask functions registered with
transformers), `decoding` (compiled decoding's generate keywords), `aggregation` (the dynamic weighted sum),
`introspect` (all knowledge of backbone architectures), `format` (the released
`qwen2_parscale` checkpoint files), `kernels` (the few-row CPU matmul for decoding, built
from `csrc/` at first use), `kv_cache` (the CPU cache layer that appends in place), `adapters` (stream sets saved and switched on one backbone),
`options` (the keywords `from_pretrained` takes) and `auto` (the Auto-class registration).

May import: torch, transformers, safetensors and `parscale.errors`/`parscale.atomic`. Never
training, data, the law, the cost model or the demo. `format` never imports `wrapper`, and
nothing here imports `autoload` (it imports `auto` and `wrapper` to register them).
"""
from __future__ import annotations

import importlib
from typing import Any

# Lazy, so that `parscale.model.config` (no torch) can be imported without the wrapper.
_LAZY = {"ParScaleConfig": "parscale.model.config", "ParScaleForCausalLM": "parscale.model.wrapper",
         "to_parscale": "parscale.model.wrapper"}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'parscale.model' has no attribute {name!r}")
