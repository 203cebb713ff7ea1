"""One spelling of the KV cache for every transformers version we support.

transformers 5.x renamed the cache argument of `forward` and the cache field of its outputs
from `past_key_values` to `cache`; the old name still works for a while but prints a
`FutureWarning` on every call. Our forward passes and decoding loops ask here which name the
installed version uses. The answer comes from the signature and the output fields themselves
(feature detection, not a version number), so both ends of the allowed range run silently.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

OLD_NAME, NEW_NAME = "past_key_values", "cache"
# The field of the output classes: `cache` on newer versions, `past_key_values` before.
OUTPUT_FIELD = NEW_NAME if NEW_NAME in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else OLD_NAME


# A plain dict, not `functools.lru_cache`: `torch.compile` traces through the lookup silently.
_ARGUMENT: dict[type, str] = {}


def cache_argument(module: Any) -> str:
    """The keyword `module.forward` takes its cache by: "cache" or "past_key_values"."""
    kind = type(module)
    if kind not in _ARGUMENT:
        params = inspect.signature(kind.forward).parameters  # follows functools.wraps of the deprecation decorator
        _ARGUMENT[kind] = NEW_NAME if NEW_NAME in params else OLD_NAME
    return _ARGUMENT[kind]


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for `module(..., **cache_kwargs(module, cache))`."""
    return {cache_argument(module): cache}


def output_cache(outputs: Any) -> Any:
    """The cache a forward pass returned, read by the installed version's field name."""
    return getattr(outputs, OUTPUT_FIELD, None)
