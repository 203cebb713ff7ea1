"""Data: from text files to token arrays and batches.

Lives here: `corpus` (which files, which documents, the train/validation split), `tokenizer`
(train or load a tokenizer), `prepare` (DataConfig; tokenize once and cache the token
arrays) and `batches` (deterministic batches, held-out loss).

May import: numpy, torch, tokenizers/datasets and `parscale.errors`/`parscale.atomic`. Never
the model wrapper, training, the law, the cost model or the demo.
"""
