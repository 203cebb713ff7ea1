"""parscale: parallel scaling (ParScale, arXiv 2505.10475) for transformers causal LMs.

The public names are imported lazily, so `parscale fit` and `parscale cost` start without
paying for importing torch and transformers. Importing the package registers the released
`qwen2_parscale` model type with transformers' AutoConfig and AutoModelForCausalLM (no
`trust_remote_code`), as soon as transformers' Auto classes are imported (`model.autoload`).
"""
from __future__ import annotations

import importlib
from typing import Any

from parscale.errors import UserError
from parscale.model import autoload as _autoload

__version__ = "0.1.0"

_LAZY = {
    "ParScaleConfig": "parscale.model.config",
    "ParScaleForCausalLM": "parscale.model.wrapper",
    "to_parscale": "parscale.model.wrapper",
}

__all__ = ["UserError", "__version__", *_LAZY]


_autoload.install()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'parscale' has no attribute {name!r}")
