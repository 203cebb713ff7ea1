"""Evaluation with the tools users already use: our models as an lm-evaluation-harness model.

Lives here: `harness` (the lm-eval model registered as `parscale`, and `parscale lm-eval`).

May import: `model` (and lm-eval, transformers, torch inside `harness`). Nothing imports this
part but the CLI; importing the package itself imports neither lm-eval nor torch.
"""
