"""Shared pieces of the trainer tests: a small local corpus, a micro model config, the CLI.

The corpus is a fixed handful of the standard library's own modules (present wherever
Python is), given as local files, so tokenizing takes a second rather than the
embedded corpus's twenty; the model is a 2-layer, 32-wide Qwen2 given as a config JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from parscale.data.corpus import stdlib_root

TRAIN_MODULES = ["textwrap.py", "heapq.py", "bisect.py", "string.py", "shlex.py", "fnmatch.py",
                 "glob.py", "colorsys.py", "queue.py", "sched.py", "random.py", "gettext.py"]
VAL_MODULES = ["calendar.py", "quopri.py"]

MICRO = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": True, "vocab_size": 320}


def micro_setup(root: Path) -> dict:
    """Writes the micro model config; returns the options every test run shares."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "micro.json"
    cfg.write_text(json.dumps(MICRO))
    lib = stdlib_root()
    return {
        "model_config": str(cfg),
        "cache_dir": str(root / "data-cache"),
        "data": {"source": "files", "files": [str(lib / m) for m in TRAIN_MODULES],
                 "val_files": [str(lib / m) for m in VAL_MODULES], "vocab_size": 320, "val_tokens": 4096},
        "seq_len": 32, "batch_size": 4, "lr": 3e-3, "eval_every": 4, "save_every": 4,
    }


def cli_args(opts: dict) -> list[str]:
    """The same options as `parscale train` flags."""
    args: list[str] = []
    for key, value in opts.items():
        if key == "data":
            for dkey, dval in value.items():
                flag = "--data-" + dkey.replace("_", "-")
                args += [flag, *map(str, dval)] if isinstance(dval, list) else [flag, str(dval)]
        elif value is True:
            args.append("--" + key.replace("_", "-"))
        elif value is not None and value is not False:
            args += ["--" + key.replace("_", "-"), str(value)]
    return args


def subprocess_env(**extra: str) -> dict[str, str]:
    """One thread per process: the same arithmetic in every run, and fair to a 2-core machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARSCALE_KILL_")}  # faults only when asked
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", **extra})
    return env


def run_train(args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parscale", "train", *args], capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env(**env))


def torchrun(args: list[str], nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    """`parscale train ARGS` on `nproc` CPU processes under torchrun (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "parscale", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(**env))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_in_process(resume: bool = False, **fields):
    """`train(TrainConfig(**fields))` here, on one thread like the subprocess runs, so an
    in-process reference run does the same arithmetic as `run_train` (and saves a process start)."""
    import torch

    from parscale.train import TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(TrainConfig(**fields), resume=resume)
    finally:
        torch.set_num_threads(threads)
