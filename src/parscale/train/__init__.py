"""Training: configs, presets, schedules, checkpoints, the loop, conversion, torchrun, and how
a step runs fast (`speed`) and how fast it ran (`throughput`: MFU, peak memory).

May import: the model, data, torch and the shared helpers (`errors`, `atomic`, `cache`,
`interrupt`, `progress`); never the law, the cost model, the demo or the CLI. The public names load
lazily, so reading a `TrainConfig` (`parscale train --help`) does not import torch.

>>> from parscale.train import TrainConfig, train      # doctest: +SKIP
>>> train(TrainConfig(out="runs/tiny-p2", preset="tiny", P=2, steps=300))  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"TrainConfig": "parscale.train.config", "train": "parscale.train.loop",
         "NonFiniteLoss": "parscale.train.loop"}

__all__ = ["TrainConfig", "train", "NonFiniteLoss"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'parscale.train' has no attribute {name!r}")
