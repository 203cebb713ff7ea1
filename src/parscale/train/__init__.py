"""Training: configs, presets, schedules, checkpoints, the loop, conversion, torchrun.

May import: the model, data, torch and the shared helpers (`errors`, `atomic`, `cache`);
never the law, the cost model, the demo or the CLI.

>>> from parscale.train import TrainConfig, train      # doctest: +SKIP
>>> train(TrainConfig(out="runs/tiny-p2", preset="tiny", P=2, steps=300))  # doctest: +SKIP
"""
from parscale.train.config import TrainConfig
from parscale.train.loop import NonFiniteLoss, train

__all__ = ["TrainConfig", "train", "NonFiniteLoss"]
