"""The training loop, top to bottom: setup, then one update per step, eval, checkpoint.

    cfg = TrainConfig(out="runs/tiny-p2", preset="tiny", P=2, steps=300)
    train(cfg)                 # or train(cfg, resume=True) to continue from the last checkpoint

Every update `step` (0-based) reads the global batch `batch_at(step)` and the rate
`lr_at(step)`, both pure functions of the step: with the model, optimizer and RNG state
restored from a checkpoint, a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from parscale.data.prepare import batch_at, check_data, check_seq_len, evaluate_loss, masked_labels, prepare_data
from parscale.data.store import default_cache_dir
from parscale.atomic import atomic_write_json
from parscale.errors import UserError
from parscale.interrupt import STOP_NOTICE, Interrupted, deferred_stop
from parscale.progress import progress
from parscale.model.diagnostics import capture_stream_states, cross_correlation, pairwise_cosine, stream_diagnostics
from parscale.train import checkpoint as ckpt_io
from parscale.train import convert, data_order, distributed, speed, throughput
from parscale.train.config import TrainConfig, dump_yaml
from parscale.train.lock import run_lock
from parscale.train.logs import MetricsLog, plot_losses
from parscale.train.presets import build_hf_config, load_config_json, preset_dict
from parscale.train.schedule import lr_at

log = logging.getLogger(__name__)
INIT_FILE = "init.json"  # the digest of a from-scratch run's initial backbone


# Fault injection for the resume and interrupt tests: signal this process in the middle of
# the given update (after its backward pass, before the optimizer step). "5" sends SIGKILL;
# "5:INT", "5:TERM" or "5:INT,INT" send those signals one after the other.
KILL_STEP_ENV = "PARSCALE_KILL_DURING_STEP"


class NonFiniteLoss(UserError):
    """The loss or gradient became NaN/inf: the run stops before applying that update."""


def train(cfg: TrainConfig, resume: bool = False, stop_notice: str = STOP_NOTICE) -> Path:
    """Run (or continue) the training run `cfg` describes; returns the final model's directory.

    `stop_notice`: the line printed on the first Ctrl-C ("" for none: a caller such as the demo
    that runs several trainers prints its own)."""
    env = distributed.init_distributed(cfg.device)
    fresh = env.is_main and not cfg.run_dir.exists()
    try:
        with run_lock(cfg.run_dir, enabled=env.is_main):  # one trainer per run directory
            return _run(cfg, env, resume, stop_notice)
    except BaseException:
        if fresh and not (cfg.run_dir / "config.yaml").exists():  # failed before it began: leave nothing behind
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
        raise
    finally:
        distributed.shutdown(env)


def _run(cfg: TrainConfig, env: distributed.DistEnv, resume: bool, stop_notice: str) -> Path:
    run_dir = cfg.run_dir
    _check_batch_split(cfg, env)
    distributed.main_first(lambda: _prepare_run_dir(cfg, resume), env)
    _seed_everything(cfg.seed)
    data = _load_data(cfg, env)
    ckpt = ckpt_io.newest_intact_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        log.warning("%s has no complete checkpoint yet (the run stopped before its first one); "
                    "starting again from step 0", run_dir)
    if ckpt is not None and ckpt_io.checkpoint_step(ckpt) > cfg.steps:
        raise UserError(f"the run's last checkpoint {ckpt.name} is at step {ckpt_io.checkpoint_step(ckpt)}, past "
                        f"--steps {cfg.steps}, so it holds a model trained further than asked; resume with "
                        f"--steps {ckpt_io.checkpoint_step(ckpt)} or more (its final/ model is the one of that step)")
    asked = cfg  # config.yaml keeps the options as given; each checkpoint records the resolved start
    cfg = dataclasses.replace(cfg, order_start=data_order.start_row(cfg, data, ckpt))
    kept = _name_for_previous_final(cfg, ckpt) if resume else None
    model, base_val = _setup_model(cfg, data, ckpt, env)
    check_seq_len(cfg.seq_len, model.config)
    check_data(data, cfg.seq_len, cfg.batch_size // cfg.grad_accum)
    if env.is_main:  # every check passed: this file now marks the directory as a run
        dump_yaml(asked, run_dir / "config.yaml")
    model.to(env.device)
    if cfg.grad_checkpoint:
        speed.checkpoint_activations(model)
    wrapped = distributed.wrap_model(model, env, cfg.fsdp)
    if cfg.compile:  # the plain `model` stays for evaluation and saving
        wrapped = speed.compiled(wrapped)
    optimizer = speed.adamw(convert.param_groups(model, cfg.weight_decay, cfg.stream_lr_mult), lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2))
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=env.is_main)
    start = 0
    if ckpt is not None:
        optim_state, trainer = ckpt_io.load_checkpoint_state(ckpt)
        distributed.load_optimizer_state(model, optimizer, optim_state)
        speed.match_device(optimizer)  # the saved run may have used another device's AdamW
        start = int(trainer["step"])
        log.info("resuming from %s (step %d)", ckpt.name, start)
    if env.is_main:  # drop what a killed run logged past its checkpoint (all of it without one)
        metrics.truncate_after(start if ckpt is not None else -1)
    if start == 0 and cfg.init_from:
        _log_step0(cfg, model, data, env, metrics, base_val)
    _loop(cfg, env, model, wrapped, optimizer, data, metrics, start, stop_notice)
    return _save_final(cfg, env, model, optimizer, data, kept)


# ---------------------------------------------------------------- setup
def _check_batch_split(cfg: TrainConfig, env: distributed.DistEnv) -> None:
    per_update = cfg.grad_accum * env.world_size
    if cfg.batch_size % per_update:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by --grad-accum x processes "
                        f"= {cfg.grad_accum} x {env.world_size}; use a multiple of {per_update}")


def _prepare_run_dir(cfg: TrainConfig, resume: bool) -> None:
    run_dir = cfg.run_dir
    if not resume and (run_dir / "config.yaml").exists():
        if ckpt_io.list_checkpoints(run_dir) or any(r.get("step", 0) > 0 for r in
                                                     MetricsLog(run_dir / "metrics.jsonl").read()):
            raise UserError(f"{str(run_dir)!r} already holds a run; continue it with --resume {run_dir}, "
                            "or choose another --out")
        log.info("%s holds a run that stopped before its first update; starting it again", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_io.clean_temp(run_dir)


def _name_for_previous_final(cfg: TrainConfig, ckpt: Path | None) -> str | None:
    """`final-step<S>` when a resumed run goes past the step S its `final/` was written at (an
    extended run), else None. That model is kept, not overwritten: other runs (`--init-from`) and
    stream adapters were trained on it, and an adapter's backbone check would then fail."""
    final = cfg.run_dir / "final"
    start = ckpt_io.checkpoint_step(ckpt) if ckpt is not None else 0
    if not final.is_dir() or start >= cfg.steps:
        return None
    step = data_order.recorded_step(final, cfg)
    name = ckpt_io.name_for_kept_final(cfg.run_dir, step)
    log.info("%s finished at step %s; extending it to step %d (config.yaml now says so). Its final/ model "
             "stays, as %s/, when the new one is written", cfg.run_dir, "?" if step is None else step,
             cfg.steps, name)
    return name


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_data(cfg: TrainConfig, env: distributed.DistEnv):
    """Rank 0 builds (or reuses) the cache first; the others then read it. The default cache is
    shared by all runs, so a post-training run never tokenizes its corpus again."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    data = distributed.main_first(lambda: prepare_data(cfg.data, cache_dir=cache), env)
    return data if data is not None else prepare_data(cfg.data, cache_dir=cache)


def _hf_config(cfg: TrainConfig, vocab_size: int):
    fields = preset_dict(cfg.preset) if cfg.preset else load_config_json(cfg.model_config)
    return build_hf_config(fields, vocab_size=vocab_size)


def _setup_model(cfg: TrainConfig, data, ckpt: Path | None, env: distributed.DistEnv):
    """(model, P=1 held-out loss or None): built, converted, or loaded from a checkpoint."""
    base_val = None
    if ckpt is not None:
        model = convert.load_trained(ckpt / "model")
        _check_resumed_model(cfg, model, data.vocab_size)
        if cfg.prefix_mlp_hidden:
            convert.restore_prefix_encoder(model, ckpt, cfg.prefix_mlp_hidden)
    elif cfg.init_from:
        base = convert.load_base_model(cfg.init_from)
        if base.config.vocab_size < data.vocab_size:
            raise UserError(f"the tokenizer has {data.vocab_size} tokens but the model in "
                            f"--init-from has only {base.config.vocab_size} embeddings")
        base_val = _evaluate(cfg, base.to(env.device), data, env)
        model = convert.wrap_streams(base, cfg.P, cfg.prefix_tokens, cfg.attn_smooth, cfg.seed,
                                     **_prefix_options(cfg))
    else:
        model = convert.model_from_scratch(_hf_config(cfg, data.vocab_size), cfg.P, cfg.prefix_tokens,
                                           cfg.attn_smooth, cfg.seed, cfg.prefix_at_p1, **_prefix_options(cfg))
        if env.is_main:  # which runs started from the same backbone (compared by the demo)
            atomic_write_json(cfg.run_dir / INIT_FILE, {"backbone_sha256": convert.backbone_digest(model)})
    convert.set_train_mode(model, cfg.train)
    if env.is_main:
        report = convert.trainable_report(model)
        if cfg.train == "streams":
            print(report, flush=True)  # the PEFT-style report, on stdout as PEFT prints it
        else:
            log.info("%s", report)
    return model, base_val


def _prefix_options(cfg: TrainConfig) -> dict:
    """How the prefixes are initialised and parameterised, and the stream adapters (see `ParScaleConfig`)."""
    return {"prefix_init_std": cfg.prefix_init_std, "prefix_mlp_hidden": cfg.prefix_mlp_hidden,
            "stream_lora_rank": cfg.stream_lora_rank, "stream_lora_alpha": cfg.stream_lora_alpha}


def _check_resumed_model(cfg: TrainConfig, model, vocab_size: int) -> None:
    """A checkpoint must hold the model the run config describes (P and architecture)."""
    if convert.n_streams(model) != cfg.P:
        raise UserError(f"the checkpoint holds a P={convert.n_streams(model)} model but the run config "
                        f"says P={cfg.P}; resume with the run's own config.yaml")
    if cfg.init_from:
        return
    want = _hf_config(cfg, vocab_size).to_dict()
    have = model.config.to_dict()
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    diff = [k for k in keys if k in want and want.get(k) != have.get(k)]
    if diff:
        raise UserError(f"the checkpoint's model differs from the run config in {diff}; "
                        "resume with the run's own config.yaml, or start a new run with another --out")


# ---------------------------------------------------------------- one update, eval
def _bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")


def _autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on GPU (or when asked for); plain float32 otherwise."""
    if not _bf16(cfg, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _evaluate(cfg: TrainConfig, model, data, env: distributed.DistEnv) -> float:
    """Held-out loss in training's micro-batches, each rank on its share of the tokens."""
    micro = cfg.batch_size // (cfg.grad_accum * env.world_size)  # the rows of one training forward
    with _autocast(cfg, env.device):
        return evaluate_loss(model, data.val, seq_len=cfg.seq_len, batch_size=micro, max_tokens=cfg.eval_tokens,
                             device=env.device, reduce=lambda v: distributed.sum_over_ranks(v, env),
                             rank=env.rank, world_size=env.world_size, mask=data.val_mask)


def _batch(cfg: TrainConfig, env, data, index: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of micro-batch `index` of the data order: this rank's `rows` of it, the
    labels -100 where the data's loss mask is 0 (chat data: everything but the assistant's tokens)."""
    where = dict(step=index, batch_size=rows, seq_len=cfg.seq_len, seed=cfg.seed, rank=env.rank,
                 world_size=env.world_size, first_row=cfg.order_start)
    x = batch_at(data.train, **where)
    mask = batch_at(data.train_mask, **where) if data.train_mask is not None else None
    return x.to(env.device), masked_labels(x, mask).to(env.device)


def _stream_diagnostics(cfg: TrainConfig, model, data, env: distributed.DistEnv) -> dict[str, float]:
    """Stream cosine, top weight and weight entropy on the first held-out sequences (P > 1 only;
    every rank runs the same rows, so a sharded model's collectives line up)."""
    if cfg.P < 2:
        return {}
    rows = max(1, min(cfg.batch_size // cfg.grad_accum, len(data.val) // cfg.seq_len))
    x = torch.as_tensor(np.asarray(data.val[: rows * cfg.seq_len], dtype=np.int64)).view(rows, cfg.seq_len)  # b s
    with _autocast(cfg, env.device):
        return stream_diagnostics(model, x.to(env.device)) or {}


def model_of(wrapped):
    """The model inside a DDP wrapper and/or `torch.compile` (FSDP2 shards the model in place,
    so it is the model itself)."""
    wrapped = getattr(wrapped, "_orig_mod", wrapped)
    return getattr(wrapped, "module", wrapped)


def penalised_loss(wrapped, model, x: torch.Tensor, coef: float, labels: torch.Tensor | None = None, *,
                   decorrelation: float = 0.0, **loss_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(language-model loss, the loss to minimise): the second adds `coef` x the mean over token
    positions and stream pairs of max(cosine, 0) of the streams' final hidden states, pushing the
    streams towards orthogonal, not antiparallel, and `decorrelation` x their mean squared
    cross-correlation (`diagnostics.cross_correlation`, after ND-LoRA's Barlow Twins term)
    (both 0: the same loss).
    `labels` default to the inputs (the model shifts them); `loss_kwargs` go to the loss."""
    with capture_stream_states(model, enabled=coef > 0 or decorrelation > 0) as seen:
        loss = wrapped(input_ids=x, labels=x if labels is None else labels, **loss_kwargs).loss
    if not seen:
        return loss, loss
    n_streams, total = model.parscale_config.n_streams, loss
    if coef > 0:
        total = total + coef * pairwise_cosine(seen[0], n_streams, positive=True)
    if decorrelation > 0:
        total = total + decorrelation * cross_correlation(seen[0], n_streams)
    return loss, total


def scored_tokens(labels: list[torch.Tensor], env: distributed.DistEnv) -> torch.Tensor:
    """The tokens the loss scores in an update, summed over micro-batches and ranks (at least 1).

    Each micro-batch's loss is its NLL sum over this count, so every scored token weighs the
    same in the update, whichever micro-batch and rank hold it (chat data scores a different
    number of tokens in each): the update is sum NLL / sum tokens for any number of processes
    and any accumulation, as transformers' Trainer computes it (`num_items_in_batch`). A 0-d
    tensor, so a compiled model sees one input rather than a new constant at every step."""
    count = sum((y[:, 1:] != -100).sum() for y in labels)  # the model shifts the labels
    return distributed.sum_tensor_over_ranks(count, env).clamp_min(1)


def _update(cfg: TrainConfig, env, wrapped, optimizer, data, step: int) -> tuple[float, float, float]:
    """One optimizer update (with accumulation); returns (global train loss, grad norm, lr)."""
    lr = lr_at(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
               schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # stream parameters may have their own multiple
    micro = cfg.batch_size // cfg.grad_accum
    batches = [_batch(cfg, env, data, step * cfg.grad_accum + m, micro) for m in range(cfg.grad_accum)]
    n_targets = scored_tokens([labels for _, labels in batches], env)
    loss_sum = 0.0
    for m, (x, labels) in enumerate(batches):
        last = m == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
        with sync, _autocast(cfg, env.device):
            loss, total = penalised_loss(wrapped, model_of(wrapped), x, cfg.stream_similarity_penalty,
                                         labels=labels, decorrelation=cfg.stream_decorrelation,
                                         num_items_in_batch=n_targets, use_cache=False)
            # The language-model part is this micro-batch's share of the global mean; DDP and
            # FSDP average the ranks' gradients, so it is scaled by the number of ranks to
            # make their sum. The penalties are averaged over the micro-batches (and the ranks).
            lm = loss * env.world_size if env.distributed else loss
            (lm + (total - loss) / cfg.grad_accum).backward()
        loss_sum += loss.item()
    train_loss = distributed.sum_over_ranks([loss_sum], env)[0]  # the global mean: shares add up
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not (math.isfinite(train_loss) and math.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        what = "loss" if not math.isfinite(train_loss) else "gradient norm"
        value = train_loss if what == "loss" else norm
        last_ckpt = ckpt_io.latest_checkpoint(cfg.run_dir)
        keep = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise NonFiniteLoss(f"the training {what} became {value} at step {step + 1}; the run stopped "
                            f"without applying that update and {keep}. Lower --lr (now {cfg.lr}) or "
                            "--grad-clip, or lengthen --warmup-steps, and start again")
    at_step, _, names = os.environ.get(KILL_STEP_ENV, "").partition(":")
    if at_step == str(step + 1):
        log.warning("%s: signalling the process mid-step (test fault injection)", KILL_STEP_ENV)
        for name in (names or "KILL").split(","):
            os.kill(os.getpid(), getattr(signal, "SIG" + name))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return train_loss, norm, lr


def _log_step0(cfg, model, data, env, metrics: MetricsLog, base_val) -> None:
    """Two-stage runs: the converted model's losses before any update."""
    with torch.no_grad(), _autocast(cfg, env.device):
        x, labels = _batch(cfg, env, data, 0, cfg.batch_size // cfg.grad_accum)
        loss = model(input_ids=x, labels=labels, num_items_in_batch=scored_tokens([labels], env), use_cache=False).loss
        train_loss = distributed.sum_over_ranks([float(loss)], env)[0]  # the mean over every rank's tokens
    val = _evaluate(cfg, model, data, env)
    record = {"step": 0, "tokens": 0, "train_loss": train_loss, "lr": 0.0, "tokens_per_s": 0.0,
              "val_loss": val, "base_val_loss": base_val}
    if base_val:
        record["val_loss_change"] = val / base_val - 1.0
        log.info("held-out loss: P=1 model %.4f, converted P=%d model %.4f (%+.2f%%) before training",
                 base_val, cfg.P, val, 100 * record["val_loss_change"])
    metrics.write(record)


# ---------------------------------------------------------------- the loop
def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _resume_hint(cfg: TrainConfig) -> str:
    return f"continue with: parscale train --resume {cfg.run_dir}"


def _loop(cfg: TrainConfig, env, model, wrapped, optimizer, data, metrics: MetricsLog, start: int,
          stop_notice: str = STOP_NOTICE) -> None:
    tokens_per_step = cfg.batch_size * cfg.seq_len
    speedometer = throughput.Speedometer(model, env.device, cfg.seq_len, tokens_per_update=tokens_per_step,
                                         world_size=env.world_size, peak_flops=throughput.peak_flops(
                                             env.device, _bf16(cfg, env.device), cfg.peak_tflops))
    # a bar on a terminal, a line every 30 s in a log; messages (a checkpoint saved) go above the bar
    bar = progress(total=cfg.steps, initial=start, unit="step", desc=cfg.run_dir.name, disable=not env.is_main)
    model.train()
    # Ctrl-C / SIGTERM: finish the update (and its evaluation), keep a checkpoint, then stop.
    at_once = lambda: f"stopped at once; the last checkpoint is kept, {_resume_hint(cfg)}"  # noqa: E731
    with bar, deferred_stop(at_once, stop_notice) as stop:  # the bar closes on errors too (a NaN stop)
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            with speed.compile_errors(cfg.compile):
                train_loss, norm, lr = _update(cfg, env, wrapped, optimizer, data, step)
            done = step + 1
            speed_record = speedometer.record(t0)
            tok_s = speed_record["tokens_per_s"]
            record = {"step": done, "tokens": done * tokens_per_step, "train_loss": train_loss, "lr": lr,
                      "grad_norm": norm, **speed_record}
            if _due(done, cfg.eval_every, cfg.steps):
                record["val_loss"] = _evaluate(cfg, model, data, env)
                record.update(_stream_diagnostics(cfg, model, data, env))
                model.train()
            metrics.write(record)
            if "val_loss" in record and env.is_main:
                plot_losses(metrics.read(), cfg.run_dir / "loss.png", title=_title(cfg))
            saved = _due(done, cfg.save_every, cfg.steps)
            if saved:
                _save(cfg, env, model, optimizer, done)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}",
                            **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
            bar.update(1)
            if done < cfg.steps and distributed.mean_over_ranks(float(bool(stop)), env) > 0:  # all ranks stop together
                if not saved:
                    _save(cfg, env, model, optimizer, done)
                raise Interrupted(stop.signum or signal.SIGINT, f"stopped at step {done}; {_resume_hint(cfg)}")


def _title(cfg: TrainConfig) -> str:
    source = cfg.preset or Path(cfg.model_config or cfg.init_from).name
    return f"{source}, P={cfg.P}, train={cfg.train}"


def _savable(cfg: TrainConfig, env, model):
    """The model to write: itself, or under FSDP an unsharded copy (gathering is a collective)."""
    if not (cfg.fsdp and env.distributed):
        return model
    state = distributed.full_model_state(model)
    return convert.unsharded_replica(model, state) if env.is_main else None


def _save(cfg: TrainConfig, env, model, optimizer, step: int) -> None:
    """Gather (collectives under FSDP), then rank 0 writes the checkpoint atomically."""
    to_write = _savable(cfg, env, model)
    optim_state = distributed.full_optimizer_state(model, optimizer)
    if env.is_main:
        trainer = {"tokens": step * cfg.batch_size * cfg.seq_len, "P": cfg.P,
                   "world_size": env.world_size, "order_start": cfg.order_start}
        path = ckpt_io.save_checkpoint(cfg.run_dir, step, to_write, optim_state, trainer, cfg.keep_last)
        log.info("saved %s", path.name)
    distributed.barrier(env)


def _save_final(cfg: TrainConfig, env, model, optimizer, data, kept: str | None = None) -> Path:
    """`RUN_DIR/final/`: the model (safetensors) with its tokenizer, replaced atomically; an
    extended run first renames the previous one (and its streams) to `kept`."""
    final = cfg.run_dir / "final"
    if not (cfg.run_dir / ckpt_io.ckpt_name(cfg.steps)).is_dir():
        _save(cfg, env, model, optimizer, cfg.steps)  # e.g. a resumed run that had already ended
    to_write = _savable(cfg, env, model)
    if env.is_main and kept and final.is_dir():
        ckpt_io.keep_final(cfg.run_dir, kept)
        log.info("kept the previous final model as %s (load it, and stream adapters trained on it, from there)",
                 cfg.run_dir / kept)
    if env.is_main:
        def write_final(tmp: Path) -> None:
            to_write.save_pretrained(tmp)
            data.tokenizer.save_pretrained(tmp)
            data_order.write_record(tmp, cfg, data)  # where a run started from this model goes on

        ckpt_io.replace_dir(final, write_final)
        if cfg.train == "streams":  # the frozen backbone is the --init-from model's: save the streams alone too
            ckpt_io.replace_dir(cfg.run_dir / "final-streams",
                                lambda d: to_write.save_streams(d, base_model_name_or_path=cfg.init_from))
        records = MetricsLog(cfg.run_dir / "metrics.jsonl").read()
        if records:
            plot_losses(records, cfg.run_dir / "loss.png", title=_title(cfg))
        if cfg.train == "streams":
            log.info("final model: %s; its streams alone (an adapter for the --init-from backbone): %s",
                     final, cfg.run_dir / "final-streams")
        else:
            log.info("final model: %s", final)
    distributed.barrier(env)
    return final

