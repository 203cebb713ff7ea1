"""Where parscale keeps caches between runs (measured hardware profiles, tokenized data)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$XDG_CACHE_HOME/parscale/...`, else `~/.cache/parscale/...`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "parscale", *parts)
