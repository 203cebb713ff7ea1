"""What the demo reads off each finished run: losses, time, parameters, FLOPs, decode latency,
how different the streams are, and which runs share a backbone.

Every number comes from the run's own files (metrics.jsonl, init.json, final/) or from the
shared library routines (`parscale.cost.flops`, `parscale.cost.measure`): nothing is
re-derived here.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from parscale.errors import UserError


def metrics(tc) -> dict[str, Any]:
    """Losses and training time of one finished run, from its own metrics.jsonl."""
    from parscale.train.logs import read_metrics

    records = read_metrics(tc.run_dir / "metrics.jsonl")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    final = [v for s, v in val if s == tc.steps]
    if not final:
        raise UserError(f"{tc.run_dir}/metrics.jsonl has no evaluation at its last step {tc.steps}; "
                        "delete that run directory and run the demo again")
    tokens_per_step = tc.batch_size * tc.seq_len
    seconds = sum(tokens_per_step / r["tokens_per_s"] for r in records if r["step"] > 0 and r.get("tokens_per_s"))
    step0 = next((r for r in records if r["step"] == 0), None)
    return {"val_loss": final[-1], "val_curve": val, "steps": tc.steps, "tokens": tc.steps * tokens_per_step,
            "train_seconds": seconds, "step0_val_loss": step0["val_loss"] if step0 else None}


def init_digest(tc) -> str | None:
    """The sha256 of a from-scratch run's initial backbone, as its trainer recorded it."""
    from parscale.train.loop import INIT_FILE

    path = tc.run_dir / INIT_FILE
    return json.loads(path.read_text())["backbone_sha256"] if path.is_file() else None


def load(final: Path, dtype=None):
    from parscale.model.wrapper import ParScaleForCausalLM

    return ParScaleForCausalLM.from_pretrained(final, dtype=dtype).eval()


def params(model) -> dict[str, int]:
    """Non-embedding parameters (the law's N, streams included) and the stream parameters."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    embedding = emb.numel() + (0 if head is emb else head.numel())
    return {"params": total, "non_embedding_params": total - embedding,
            "stream_params": sum(p.numel() for _, p in model.stream_parameters())}


def train_flops(model, tc) -> float:
    from parscale.cost.flops import training_flops
    from parscale.cost.roofline import ModelShape

    pcfg = model.parscale_config
    return training_flops(ModelShape.from_hf_config(model.config), n_streams=pcfg.n_streams,
                          tokens=tc.steps * tc.batch_size * tc.seq_len, seq_len=tc.seq_len,
                          prefix_tokens=pcfg.n_prefix_tokens if pcfg.has_prefixes else 0,
                          frozen_backbone=tc.train == "streams")


def decode_ms(final: Path, decode_tokens: int) -> dict[str, float]:
    """Batch-1 decode ms/token in float32 and bfloat16 through the shared measurement routine
    (the fastest step of `decode_tokens`: other processes can only add time)."""
    import torch

    from parscale.cost.measure import MeasureConfig, decode_step_times

    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = load(final, dtype)
        c = model.config
        mcfg = MeasureConfig(hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_hidden_layers,
                             heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, vocab=c.vocab_size,
                             input_length=32, output_length=max(2, decode_tokens))
        steps = decode_step_times(model, mcfg, batch=1)
        out[name] = 1e3 * min(steps)
        out[name + "_median"] = 1e3 * statistics.median(steps)
    return out


def stream_diagnostics(model, tokens, seq_len: int = 128, rows: int = 8) -> dict[str, float] | None:
    """How different the streams are on held-out text (`parscale.model.diagnostics`): the mean
    pairwise cosine of their final hidden states, the aggregation's mean top weight and its mean
    entropy relative to log P. None at P = 1 (one stream: nothing to compare)."""
    import torch

    from parscale.model.diagnostics import stream_diagnostics as measure_streams

    rows = max(1, min(rows, len(tokens) // seq_len))
    x = torch.as_tensor(tokens[:rows * seq_len].astype("int64")).view(rows, seq_len)  # b s
    return measure_streams(model, x)


def backbone_identical(final: Path, source: Path) -> dict[str, Any]:
    """Compare the non-stream tensors of two saved models bit for bit."""
    import torch

    def backbone(path: Path) -> dict[str, torch.Tensor]:
        model = load(path)
        stream = {n for n, _ in model.stream_parameters()}
        return {k: v for k, v in model.state_dict().items() if k not in stream}

    ref, other = backbone(source), backbone(final)
    diffs = [float((other[k] - ref[k]).abs().max()) for k in ref if k in other]
    identical = set(other) == set(ref) and all(torch.equal(other[k], ref[k]) for k in ref)
    return {"identical": identical, "tensors": len(ref), "max_abs_diff": max(diffs) if diffs else float("nan")}
