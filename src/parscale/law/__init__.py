"""The parallel scaling law L(N, P) = E + (A / (N (k ln P + 1)))^alpha: fit, data, plot.

Lives here: `fitting` (the fit, predictions, bootstrap intervals), `points` (the paper's runs and
user CSV/JSON files) and `plot` (the fitted law as a PNG; matplotlib imported on use).

Stands alone: numpy and scipy only, never torch, so `parscale fit` starts fast.
"""
