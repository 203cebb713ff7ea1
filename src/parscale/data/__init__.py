"""Data: from text files to token arrays and batches.

Lives here: `corpus` (which files, which documents, the train/validation split), `tokenizer`
(train or load a tokenizer), `sources` (documents as a resumable stream), `shards` (the
prepared directory and its memory-mapped view), `pipeline` (stream to worker processes to
shards), `store` (the cache of prepared directories), `prepare` (DataConfig; the token
arrays of a config) and `batches` (deterministic batches, held-out loss).

May import: numpy, torch, tokenizers/datasets and the shared helpers (`errors`, `atomic`, `progress`). Never
the model wrapper, training, the law, the cost model or the demo.
"""
