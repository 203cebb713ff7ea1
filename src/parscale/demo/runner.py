"""Train the study's runs, two at a time with one thread each when the machine has two cores.

The tiny models' matrices are too small for a second thread to pay (and on a shared machine
extra threads slow a run down), so the cores are better spent on two runs at once. Each run
is an ordinary trainer run in its own process (`spawn`: no state shared with the parent);
a run starts when the run it converts has finished, longest first among the ready ones.
Data are tokenized by the parent before the runs that read them start, so no two processes
build the same cache. The workers draw no progress bars (two would draw over each other on one
terminal): each run logs a line, with its name, at its first update, every 30 s and at its end.

Ctrl-C: the workers sit in their own process group, so a terminal's Ctrl-C reaches only the
parent. It prints one notice, forwards one stop to every running run (each finishes its
update, keeps a checkpoint and returns), starts nothing new, and then stops with exit 130;
rerunning the command resumes. A second Ctrl-C is forwarded too, and everything stops at once.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from parscale import progress
from parscale.errors import UserError
from parscale.interrupt import Interrupted, deferred_stop, recorded_stop

log = logging.getLogger(__name__)
# Relative cost of one update, by P and model, for ordering the queue (longest first).
_COST = {1: 1.0, 2: 1.8, 4: 3.2}
STOP_NOTICE = ("stopping: every running run finishes its current step and keeps a checkpoint, then the demo "
               "stops (rerun the same command to resume); press Ctrl-C again to stop at once")


# ---------------------------------------------------------------- one run (in a worker)
def _comparable(fields: dict[str, Any]) -> dict[str, Any]:
    """A run config without the paths that only say where OUT is."""
    # order_start is resolved by the trainer from the source run's record (None in the demo's config).
    fields = {k: v for k, v in fields.items() if k not in ("out", "init_from", "cache_dir", "order_start")}
    data = dict(fields.get("data") or {})
    data.pop("tokenizer", None)  # stage 2 reads the stage-1 model's tokenizer, inside OUT
    fields["data"] = data
    return fields


def fill_missing(have: Any, defaults: Any) -> Any:
    """`have` with the keys it lacks (at any depth) taken from `defaults`: a config recorded
    before an option existed had that option at its default."""
    if not (isinstance(have, dict) and isinstance(defaults, dict)):
        return have
    return {**defaults, **{k: fill_missing(v, defaults.get(k)) for k, v in have.items()}}


def run_state(tc) -> str:
    """What OUT holds of a run: "new" (nothing yet), "finished" or "interrupted" (a checkpoint to
    resume from); a run recorded there with other options is refused with a `UserError`."""
    saved = tc.run_dir / "config.yaml"
    if not saved.is_file():
        return "new"
    have = _comparable(yaml.safe_load(saved.read_text()) or {})
    want = _comparable(yaml.safe_load(yaml.safe_dump(tc.to_dict())))
    # A key one side lacks counts as its default: an option added later is no change.
    defaults = {f.name: f.default for f in dataclasses.fields(tc) if f.default is not dataclasses.MISSING}
    defaults = _comparable({**defaults, "data": type(tc.data)().to_dict()})
    have, want = fill_missing(have, defaults), fill_missing(want, defaults)
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
        raise UserError(f"{tc.run_dir} was trained with other options ({', '.join(diff)}); "
                        "delete that run directory or choose another --out")
    return "finished" if (tc.run_dir / "final" / "config.json").is_file() else "interrupted"


def ensure_run(tc, stop_notice: str = STOP_NOTICE) -> tuple[Path, str]:
    """Train a run, resume it, or reuse it if finished: (final model dir, what was done).

    `stop_notice` is what the trainer prints on a first Ctrl-C ("" in a worker: the parent speaks)."""
    from parscale.train.loop import train

    state = run_state(tc)
    if state == "new":
        return train(tc, stop_notice=stop_notice), "trained"
    if state == "finished":
        return tc.run_dir / "final", "reused"
    log.info("resuming the interrupted run %s", tc.run_dir)
    return train(tc, resume=True, stop_notice=stop_notice), "resumed"


def _init_worker() -> None:
    import torch

    os.setpgrp()  # out of the terminal's process group: a Ctrl-C reaches the parent, which forwards it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # idle between runs: a forwarded stop has nothing to stop
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # Two bars from two processes would draw over each other: each run logs a line every 30 s instead.
    progress.use_lines()
    logging.getLogger(progress.__name__).setLevel(logging.INFO)


def _job(tc, stop_notice: str = STOP_NOTICE) -> dict[str, Any]:
    """One run: {final, action, wall_seconds}, action "interrupted" (with the signal) if stopped."""
    start = time.perf_counter()
    try:
        final, action = ensure_run(tc, stop_notice)
    except Interrupted as err:  # returned, not raised: the parent decides what the demo does next
        return _stopped(tc, err.signum, start)
    return {"final": str(final), "action": action, "wall_seconds": time.perf_counter() - start}


def _stopped(tc, signum: int, start: float) -> dict[str, Any]:
    """The result of a run a stop reached. A stop that lands after the trainer wrote the final
    model (between its last update and the worker's return) does not undo the run: it counts as
    finished, so the demo neither calls it stopped nor lists it among the runs to resume."""
    wall = time.perf_counter() - start
    if run_state(tc) == "finished":
        return {"final": str(tc.run_dir / "final"), "action": "trained", "wall_seconds": wall}
    return {"final": None, "action": "interrupted", "signum": int(signum), "wall_seconds": wall}


def _worker_job(tc) -> dict[str, Any]:
    """`_job` in a worker process, where the parent's forwarded SIGINT is the stop request.

    Outside the trainer's loop the stop is only recorded: raised at an arbitrary point, a
    KeyboardInterrupt can land in a garbage-collector callback, where Python prints it and drops
    it, and the run then trains to its end. The loop takes the recorded stop and ends the run
    after its first update, with a checkpoint; a run that has passed its loop finishes."""
    start = time.perf_counter()
    with recorded_stop():
        try:
            return _job(tc, stop_notice="")
        except KeyboardInterrupt:  # not from a signal (`_job` takes every `Interrupted`, a second stop
            # inside the loop included): a bare one raised by other code still ends the run as stopped
            return _stopped(tc, signal.SIGINT, start)


def _bench(steps: int) -> float:
    """`steps` training updates of the tiny model on random tokens: a fixed job to time."""
    import torch

    from parscale.train.convert import model_from_scratch
    from parscale.train.presets import build_hf_config, preset_dict

    model = model_from_scratch(build_hf_config(preset_dict("tiny"), vocab_size=2048), 1, 48, 0.01, 0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 2048, (8, 128), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - start


# ---------------------------------------------------------------- the pool
class Pool:
    """`workers` processes (or this process when 1), one torch thread each."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = None
        if workers > 1:
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                            initializer=_init_worker)

    def submit_run(self, tc) -> Future:
        """A run: in a worker (silent on Ctrl-C, the parent speaks), or here with the demo's notice."""
        return self.submit(_worker_job, tc) if self.pool is not None else self.submit(_job, tc, STOP_NOTICE)

    def signal_workers(self, signum: int) -> None:
        """Send `signum` to every worker process (those between runs ignore it)."""
        if self.pool is None:
            return
        # concurrent.futures has no public list of its worker processes; `_processes` maps pid -> Process.
        for pid in list(getattr(self.pool, "_processes", None) or {}):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # it has just exited
                pass

    def submit(self, fn, *args) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(err)
        return fut

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parallel_check(pool: Pool, steps: int) -> dict[str, Any]:
    """Two identical jobs one after the other, then two at once, in the same warm workers."""
    if pool.workers < 2:
        return {"workers": 1, "steps": steps}
    for f in [pool.submit(_bench, 1) for _ in range(pool.workers)]:  # warm every worker: imports, allocations
        f.result()
    start = time.perf_counter()
    for _ in range(2):
        pool.submit(_bench, steps).result()
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    for f in [pool.submit(_bench, steps) for _ in range(2)]:
        f.result()
    parallel = time.perf_counter() - start
    return {"workers": pool.workers, "steps": steps, "sequential_s": sequential, "parallel_s": parallel,
            "speedup": sequential / parallel}


def _cost(cfg, spec) -> float:
    steps = (cfg.post_steps if spec.source else cfg.steps) * spec.steps_factor
    width = {"tiny-wide": 1.3, "tiny-xs": 0.35, "tiny-s": 0.6, "tiny-l": 2.2}.get(spec.preset, 1.0)
    return steps * _COST.get(spec.P, spec.P) * width * (0.8 if spec.train == "streams" else 1.0)


def train_all(cfg, specs, pool: Pool, prepare) -> dict[str, dict[str, Any]]:
    """Run every spec once its source is done; `prepare(tc)` tokenizes a run's data first. A run
    that finished in an earlier demo is reused here, without a worker, and said to be.

    Returns {name: {final, action, wall_seconds}} in the order the runs finished. On Ctrl-C (or
    SIGTERM) the running runs stop after their update with a checkpoint and `Interrupted` is raised."""
    from parscale.demo.plan import train_config

    configs = {s.name: train_config(cfg, s) for s in specs}
    sources = {s.source for s in specs}
    pending = sorted(specs, key=lambda s: (s.name not in sources, -_cost(cfg, s)))  # sources first
    done: dict[str, dict[str, Any]] = {}
    running: dict[Future, str] = {}
    prepared: set[str] = set()
    stopped: list[int] = []  # the signal of each run that stopped early

    def at_once() -> str:  # the second Ctrl-C: the runs get their second stop too
        pool.signal_workers(signal.SIGINT)
        return "stopped at once"

    forwarded = False
    with deferred_stop(at_once, STOP_NOTICE) as stop:
        while (pending and not stop and not stopped) or running:
            if stop and not forwarded:
                pool.signal_workers(signal.SIGINT)  # each running run finishes its update and keeps a checkpoint
                forwarded = True
            ready = [s for s in pending if s.source is None or s.source in done]
            while ready and len(running) < pool.workers and not stop and not stopped:
                spec = ready.pop(0)
                pending.remove(spec)
                tc = configs[spec.name]
                state = run_state(tc)
                if state == "finished":  # nothing to run, so no worker and no data: said as a reuse, not a start
                    done[spec.name] = {"final": str(tc.run_dir / "final"), "action": "reused", "wall_seconds": 0.0}
                    print(f"[demo] reuse {spec.name}: {spec.label} (finished earlier; {len(done)}/{len(specs)})",
                          flush=True)
                    continue
                key = str(tc.data.to_dict())
                if key not in prepared:  # in the parent, once per tokenizer: no two workers build one cache
                    prepare(tc)
                    prepared.add(key)
                verb = "resume" if state == "interrupted" else "start"
                print(f"[demo] {verb} {spec.name}: {spec.label} ({tc.steps} steps)", flush=True)
                running[pool.submit_run(tc)] = spec.name
            finished, _ = wait(list(running), timeout=0.1, return_when=FIRST_COMPLETED)  # and forward a stop soon
            for fut in finished:
                name = running.pop(fut)
                result = fut.result()
                if result["action"] == "interrupted":
                    stopped.append(result["signum"])
                    print(f"[demo] stopped {name}; its last checkpoint is kept", flush=True)
                    continue
                done[name] = {k: result[k] for k in ("final", "action", "wall_seconds")}
                print(f"[demo] {result['action']} {name} in {result['wall_seconds']:.0f} s "
                      f"({len(done)}/{len(specs)})", flush=True)
    if stop or stopped:
        raise Interrupted(stop.signum or stopped[0], f"stopped with {len(done)} of {len(specs)} runs finished")
    return done
