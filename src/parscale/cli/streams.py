"""`parscale streams`: stream adapters (the streams of a model, without its backbone).

    parscale streams extract --model runs/p4/final --out adapters/p4
    parscale streams extract --model ParScale-1.8B-P4 --out p4-adapter --base Qwen2.5-1.8B

`extract` cuts the prefixes and the aggregation head out of a full checkpoint (ours or a
released `qwen2_parscale` one) into `adapter_model.safetensors` + `adapter_config.json`, which
`model.load_streams(DIR)` loads onto any model with the same backbone. With `--base`, the
checkpoint's backbone is first checked against the given model (shapes and values).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from parscale.cli.options import Parser
from parscale.errors import UserError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="parscale streams", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ex = sub.add_parser("extract", help="write the streams of a full checkpoint as an adapter")
    ex.add_argument("--model", required=True, help="a full model directory with P > 1 streams")
    ex.add_argument("--out", required=True, help="the adapter directory to write")
    ex.add_argument("--base", help="a backbone directory the streams must fit (checked before writing; "
                                   "recorded as the adapter's base model)")
    return p


def _load(directory: str, **kwargs):
    from parscale.model.wrapper import ParScaleForCausalLM

    return ParScaleForCausalLM.from_pretrained(directory, **kwargs)


def check_paths(model_dir: str, out: str, base_dir: str | None = None) -> None:
    """Every check that needs no model, before one loads: what --model and --base are, where --out goes."""
    from parscale.atomic import check_writable
    from parscale.cli.model_dir import ADAPTER_CONFIG, check_model_dir

    check_model_dir(model_dir, "--model", adapter_fix="it is already an adapter (streams without a backbone); "
                                                      "give --model the full model the streams came from")
    if base_dir is not None:
        check_model_dir(base_dir, "--base")
    check_writable(out, "--out", folder=True)
    target = Path(out)
    if target.is_dir() and not (target / ADAPTER_CONFIG).is_file() and any(target.iterdir()):
        raise UserError(f"--out {out!r} already holds other files (it is not an adapter); give a new or empty "
                        "directory")


def extract(model_dir: str, out: str, base_dir: str | None = None) -> Path:
    """Write the streams of `model_dir` to `out`; with `base_dir`, refuse if its backbone differs."""
    from parscale.model import adapters

    check_paths(model_dir, out, base_dir)
    model = _load(model_dir)
    if model.parscale_config.n_streams == 1:
        raise UserError(f"--model {model_dir!r} has P = 1: it has no streams to extract")
    if base_dir is not None:
        import torch

        base = _load(base_dir, dtype=torch.bfloat16)  # the fingerprint compares bfloat16 values
        adapters.compare_fingerprints(adapters.backbone_fingerprint(model), adapters.backbone_fingerprint(base),
                                      f"the streams of {model_dir}")
        del base
    model.save_streams(out, base_model_name_or_path=base_dir or model_dir)
    cfg = model.parscale_config
    log.info("wrote %s: P=%d, %d prefix tokens, %s", out, cfg.n_streams, cfg.n_prefix_tokens,
             f"checked against {base_dir}" if base_dir else "backbone not checked (no --base)")
    return Path(out)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "extract":
        extract(args.model, args.out, args.base)
    return 0
