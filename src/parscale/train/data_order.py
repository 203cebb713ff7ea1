"""Where a run starts in the data order, and the record that lets the next stage go on from there.

The batch of step s is a pure function of (s, seed) (`parscale.data.batches.batch_at`), so a
run started with `--init-from` at step 0 would train on exactly the batches its source
trained on first. Instead, every final model directory records how far into the order its
run got (`data_order.json`), and a run started from it skips that many sequences: stage 2
sees the tokens that come next, as if stage 1 had gone on. This holds when both runs
read the same training tokens in the same order (same training array, `--seq-len` and
`--seed`); otherwise the order cannot be continued, and the new run starts at the beginning
of its own order with a warning that says why. `--order-start N` sets the start by hand.
Every checkpoint records the start it used (`trainer.json`), so `--resume` keeps it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from parscale.atomic import atomic_write_json
from parscale.data.batches import order_fingerprint

log = logging.getLogger(__name__)

RECORD = "data_order.json"
_FORMAT = 1


def _identity(cfg, data) -> dict[str, Any]:
    """What must match for one run's order to continue another's."""
    return {"train_tokens": int(len(data.train)), "train_fingerprint": order_fingerprint(data.train),
            "seq_len": cfg.seq_len, "seed": cfg.seed}


def start_row(cfg, data, ckpt: Path | None = None) -> int:
    """The sequences of the order to skip: `cfg.order_start`, else the start a resumed run's
    checkpoint recorded, else where `--init-from` stopped, else 0."""
    if cfg.order_start is not None:
        return cfg.order_start
    if ckpt is not None:
        recorded = json.loads((Path(ckpt) / "trainer.json").read_text()).get("order_start")
        if recorded is not None:
            return int(recorded)
    if not cfg.init_from:
        return 0
    if getattr(cfg.data, "format", "text") == "chat":  # instruction tuning: a new data set, from its start
        return 0
    path = Path(cfg.init_from) / RECORD
    if not path.is_file():
        log.info("--init-from has no %s (it was not trained by parscale): the data order starts at its "
                 "beginning", RECORD)
        return 0
    record = json.loads(path.read_text())
    here = _identity(cfg, data)
    differ = [key for key, value in here.items() if record.get(key) != value]
    if differ:
        log.warning("the --init-from run read another data order (its %s differ from this run's), so this "
                    "run cannot continue it and starts at the beginning of its own order, which may repeat "
                    "sequences that run trained on; use the same data, --seq-len and --seed to continue it",
                    ", ".join(differ))
        return 0
    rows = int(record["rows"])
    log.info("continuing the data order of --init-from: skipping the %d sequences it trained on", rows)
    return rows


def recorded_step(directory: Path, cfg) -> int | None:
    """The update at which the run `cfg` wrote `directory` (its final model), read back from the
    record's rows (`order_start + steps x batch_size`); None without a record that fits `cfg`."""
    path = Path(directory) / RECORD
    if not path.is_file():
        return None
    try:
        rows = int(json.loads(path.read_text())["rows"])
    except (ValueError, KeyError, TypeError):
        return None
    steps, rest = divmod(rows - (cfg.order_start or 0), cfg.batch_size)
    return steps if steps > 0 and rest == 0 else None


def write_record(directory: Path, cfg, data) -> None:
    """`directory/data_order.json`: how far this run got, for a run started from `directory`."""
    rows = (cfg.order_start or 0) + cfg.steps * cfg.batch_size
    atomic_write_json(Path(directory) / RECORD, {**_identity(cfg, data), "rows": rows, "format": _FORMAT},
                      sort_keys=True)
