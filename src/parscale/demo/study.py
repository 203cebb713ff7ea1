"""The end-to-end mini-study behind `parscale demo`: a thin orchestration of the library.

    cfg = DemoConfig.preset("runs/demo")        # or preset(out, quick=True), preset(out, scale=2)
    summary = run_demo(cfg)                     # trains (or reuses) every run, then writes the report

Stage 1 pretrains the `tiny` preset at P = 1. Stage 2 post-trains that model four ways for the
same number of steps (the same tokens): a P = 1 control that simply keeps training, P = 2 and
P = 4 with the backbone frozen (one backbone, two stream sets: dynamic P), and P = 2 with every
weight learning. Then each final model completes a Python prompt, the parallel scaling law is
fitted to the paper's runs, and the inference cost of streams is set against parameter scaling.
Training, fitting and cost formulas all live in their own modules; nothing is re-derived here.

Every run lives in `OUT/runs/NAME/`. A run whose `final/` exists is reused, an interrupted one
resumes from its last checkpoint, and a demo config that differs from the one recorded in
`OUT/demo.json` is refused rather than mixed in.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from parscale.data.prepare import DataConfig
from parscale.errors import UserError

log = logging.getLogger(__name__)

PRETRAIN = "p1-pretrain"
DEMO_FILE = "demo.json"
# Config fields that hold paths inside OUT: they follow OUT when it is moved, so they are
# not part of a run's identity.
_PATH_FIELDS = ("out", "init_from", "cache_dir")
_REPORT_ONLY = ("out", "prompt", "new_tokens", "measure_cost")


@dataclass(frozen=True)
class RunSpec:
    """One stage-2 run: P streams, trained `full` or `streams` (frozen backbone)."""

    name: str
    P: int
    train: str
    label: str


STAGE2 = (
    RunSpec("p1-control", 1, "full", "P=1 control (keeps training, same tokens)"),
    RunSpec("p2-streams", 2, "streams", "P=2, frozen backbone"),
    RunSpec("p4-streams", 4, "streams", "P=4, frozen backbone"),
    RunSpec("p2-full", 2, "full", "P=2, all weights learn"),
)
STREAM_RUNS = tuple(s.name for s in STAGE2 if s.train == "streams")


def _default_data() -> DataConfig:
    return DataConfig()


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the demo's numbers (recorded in `OUT/demo.json`).

    The defaults take about 10 minutes on two CPU cores: see docs/demo.md for the timing
    that chose them. Evaluation uses the first `eval_tokens` held-out tokens in every run,
    so all losses in the report are on the same text.
    """

    out: str
    seed: int = 0
    pretrain_steps: int = 600
    post_steps: int = 200
    pretrain_evals: int = 6          # evaluations over stage 1 (plus the last step)
    post_evals: int = 4              # evaluations over each stage-2 run (plus step 0)
    eval_tokens: int = 32768
    prompt: str = "def fibonacci(n):"
    new_tokens: int = 40
    measure_cost: bool = True        # time the tiny model on this CPU (a few seconds)
    data: Any = field(default_factory=_default_data)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", DataConfig.from_dict(self.data))
        if not self.out:
            raise UserError("no output directory: give --out DIR")
        if self.pretrain_steps < 1 or self.post_steps < 1:
            raise UserError("the demo needs at least 1 step per run; raise --scale")
        if self.pretrain_evals < 1 or self.post_evals < 1:
            raise UserError("the demo needs at least one evaluation per run")
        if self.eval_tokens < 128:
            raise UserError(f"eval_tokens must be at least one sequence (128 tokens), got {self.eval_tokens}")
        if self.new_tokens < 1 or not self.prompt:
            raise UserError("the generation needs a non-empty prompt and at least 1 new token")

    @classmethod
    def preset(cls, out: str, quick: bool = False, scale: float = 1.0, seed: int = 0, **fields: Any) -> "DemoConfig":
        """The default study, or `quick` (a smoke version of about 1.5 minutes), every step count x `scale`."""
        if not (math.isfinite(scale) and scale > 0):
            raise UserError(f"--scale must be a positive number, got {scale}")
        base = dict(pretrain_steps=60, post_steps=20, eval_tokens=8192, new_tokens=24) if quick else {}
        base.update(fields)
        steps = {k: base.get(k, getattr(cls, k)) for k in ("pretrain_steps", "post_steps")}
        base.update({k: max(1, round(v * scale)) for k, v in steps.items()})
        return cls(out=str(out), seed=seed, **base)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["data"] = self.data.to_dict()
        return fields

    def identity(self) -> dict[str, Any]:
        """What must match for an existing OUT to be reused: what decides the training runs.

        OUT itself and the report-only options (prompt, new tokens, cost measurement) may
        change: the report is rewritten on every call anyway."""
        return {k: v for k, v in self.to_dict().items() if k not in _REPORT_ONLY}


def eval_every(steps: int, evals: int) -> int:
    return max(1, steps // evals)


def run_dir(cfg: DemoConfig, name: str) -> Path:
    return cfg.out_dir / "runs" / name


def train_configs(cfg: DemoConfig) -> dict[str, Any]:
    """The TrainConfig of every run, by name: stage 1 first, then the stage-2 runs."""
    from parscale.train.config import TrainConfig

    common = dict(seed=cfg.seed, eval_tokens=cfg.eval_tokens, keep_last=1, data=cfg.data,
                  cache_dir=str(cfg.out_dir / "data"))
    every = eval_every(cfg.pretrain_steps, cfg.pretrain_evals)
    # The paper's two-stage recipe: stage 1 holds its learning rate after warmup (the stable
    # phase of WSD) and stage 2 anneals it. A stage 1 already decayed to 10% would make every
    # full-training stage-2 run climb back to the peak rate, and spike, before improving.
    configs = {PRETRAIN: TrainConfig(out=str(run_dir(cfg, PRETRAIN)), preset="tiny", P=1, steps=cfg.pretrain_steps,
                                     eval_every=every, save_every=every, min_lr_ratio=1.0, **common)}
    every = eval_every(cfg.post_steps, cfg.post_evals)
    init = str(run_dir(cfg, PRETRAIN) / "final")
    for spec in STAGE2:
        configs[spec.name] = TrainConfig(out=str(run_dir(cfg, spec.name)), init_from=init, P=spec.P,
                                         train=spec.train, steps=cfg.post_steps, eval_every=every,
                                         save_every=every, **common)
    return configs


# ---------------------------------------------------------------- idempotence
def _comparable(fields: dict[str, Any]) -> dict[str, Any]:
    """A run config without the paths that only say where OUT is."""
    fields = {k: v for k, v in fields.items() if k not in _PATH_FIELDS}
    data = dict(fields.get("data") or {})
    data.pop("tokenizer", None)  # stage 2 reads the stage-1 model's tokenizer, inside OUT
    fields["data"] = data
    return fields


def check_demo_dir(cfg: DemoConfig) -> None:
    """Record the demo config in OUT, or refuse an OUT that holds a demo with other settings."""
    from parscale.demo.report import write_text

    path = cfg.out_dir / DEMO_FILE
    want = json.loads(json.dumps(cfg.identity()))
    if path.is_file():
        have = json.loads(path.read_text())
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            detail = ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff)
            raise UserError(f"{cfg.out} already holds a demo with other settings ({detail}); "
                            f"rerun with the same flags, choose another --out, or delete {cfg.out} to start over")
        return
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(want, indent=1, sort_keys=True) + "\n")


def ensure_run(tc) -> tuple[Path, str]:
    """Train a run, resume it, or reuse it if finished: (final model dir, what was done)."""
    from parscale.train.loop import train

    saved = tc.run_dir / "config.yaml"
    if not saved.is_file():
        return train(tc), "trained"
    have = _comparable(yaml.safe_load(saved.read_text()) or {})
    want = _comparable(yaml.safe_load(yaml.safe_dump(tc.to_dict())))
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise UserError(f"{tc.run_dir} was trained with other options ({', '.join(diff)}); "
                        "delete that run directory or choose another --out")
    final = tc.run_dir / "final"
    if (final / "config.json").is_file():
        log.info("reusing the finished run %s", tc.run_dir)
        return final, "reused"
    log.info("resuming the interrupted run %s", tc.run_dir)
    return train(tc, resume=True), "resumed"


# ---------------------------------------------------------------- reading the runs
def run_summary(tc, action: str) -> dict[str, Any]:
    """Losses and timing of one finished run, read from its own metrics.jsonl."""
    from parscale.train.logs import read_metrics

    records = read_metrics(tc.run_dir / "metrics.jsonl")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    train_curve = [(r["step"], r["train_loss"]) for r in records if r["step"] > 0]
    step0 = next((r for r in records if r["step"] == 0), None)
    final = [v for s, v in val if s == tc.steps]
    if not final:
        raise UserError(f"{tc.run_dir}/metrics.jsonl has no evaluation at its last step {tc.steps}; "
                        "delete that run directory and run the demo again")
    tokens_per_step = tc.batch_size * tc.seq_len
    seconds = sum(tokens_per_step / r["tokens_per_s"] for r in records if r["step"] > 0 and r.get("tokens_per_s"))
    return {
        "P": tc.P, "train": tc.train, "steps": tc.steps, "tokens": tc.steps * tokens_per_step, "action": action,
        "val_curve": val, "train_curve": train_curve, "final_val_loss": final[-1],
        "step0_val_loss": step0["val_loss"] if step0 else None,
        "base_val_loss": step0.get("base_val_loss") if step0 else None,
        "step0_change": step0.get("val_loss_change") if step0 else None,
        "train_seconds": seconds,
    }


def backbone_check(finals: dict[str, Path]) -> dict[str, Any]:
    """Compare the non-stream tensors of the saved models bit for bit.

    The frozen-backbone runs must hold exactly the stage-1 backbone (so one backbone serves
    any of their stream sets: dynamic P); the full-training run is the contrast that moved.
    """
    import torch

    from parscale.model.wrapper import ParScaleForCausalLM

    def backbone(name: str) -> dict[str, torch.Tensor]:
        model = ParScaleForCausalLM.from_pretrained(finals[name])
        stream = {n for n, _ in model.stream_parameters()}
        return {k: v for k, v in model.state_dict().items() if k not in stream}

    ref = backbone(PRETRAIN)
    out: dict[str, Any] = {"tensors": len(ref), "runs": {}}
    for name in (*STREAM_RUNS, "p2-full"):
        other = backbone(name)
        same_keys = set(other) == set(ref)
        diffs = [float((other[k] - ref[k]).abs().max()) for k in ref if k in other]
        identical = same_keys and all(torch.equal(other[k], ref[k]) for k in ref)
        out["runs"][name] = {"identical": identical, "max_abs_diff": max(diffs) if diffs else float("nan")}
    out["streams_share_backbone"] = all(out["runs"][n]["identical"] for n in STREAM_RUNS)
    return out


def generate(final: Path, prompt: str, new_tokens: int) -> dict[str, Any]:
    """Greedy completion of `prompt` by a saved model (its own tokenizer), and its parameter counts."""
    import torch

    from parscale.model.wrapper import ParScaleForCausalLM
    from parscale.data.tokenizer import load_tokenizer

    model = ParScaleForCausalLM.from_pretrained(final).eval()
    tok = load_tokenizer(final, require_eos=False)  # the class it was saved with: the training tokenisation
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    stream = sum(p.numel() for _, p in model.stream_parameters())
    return {"completion": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
            "params": sum(p.numel() for p in model.parameters()), "stream_params": stream}


# ---------------------------------------------------------------- law and cost
def law_study(out: Path) -> dict[str, Any]:
    """The parallel scaling law fitted to the paper's Stack-V2-Python runs, with its plot."""
    from parscale.law.fitting import fit, multiplier
    from parscale.law.points import load_points
    from parscale.law.plot import plot_fit

    pts = load_points("paper-stack")
    res = fit(pts.params, pts.streams, pts.loss)
    plot_fit(res, out / "law_fit.png", title=f"parallel scaling law, {pts.source}")
    return {"data": pts.source, "points": int(len(pts.loss)), "E": res.E, "A": res.A, "alpha": res.alpha,
            "k": res.k, "r2": res.r2, "converged": bool(res.converged),
            "max_abs_error": float(abs(res.errors).max()),
            "multipliers": {str(p): float(multiplier(res.k, p)) for p in (1, 2, 4, 8)}}


def cost_study(out: Path, measure: bool) -> dict[str, Any]:
    """Streams against parameter scaling for the paper's 1.6B on an A100; the tiny model on this CPU."""
    from parscale.cost.roofline import PRESETS, Workload
    from parscale.cost.compare import Comparator, compare, parse_reference
    from parscale.cost.plot import plot_compare
    from parscale.cost.hardware import resolve

    base, ref = PRESETS["1.6B"], parse_reference("observed:paper-stack")
    lengths = [64, 128, 256, 512]  # averaged, input = output, as in the paper's Figure 4
    cmp = Comparator(resolve("a100-80gb"), lengths, Workload())
    rows = compare(base, ref, [2, 4, 8], [1, 2, 4, 8], cmp)
    plot_compare(base, ref, rows, cmp, out / "cost_compare.png")
    result: dict[str, Any] = {"model": "1.6B", "hardware": "a100-80gb", "reference": ref.name,
                              "lengths": lengths, "rows": rows, "measured": None}
    if measure:
        result["measured"] = measure_tiny()
    return result


def measure_tiny() -> dict[str, Any]:
    """The tiny preset's decode step and memory at P = 1, 2, 4 on this CPU, beside the prediction."""
    from parscale.cost.measure import MeasureConfig, run_measurements
    from parscale.cost.hardware import cpu_local

    hw = cpu_local()
    mcfg = MeasureConfig(hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, vocab=2048,
                         input_length=32, output_length=16)
    rows = run_measurements(mcfg, [1, 2, 4], [1], hw)
    return {"shape": dataclasses.asdict(mcfg), "rows": rows,
            "cpu": {"peak_flops": hw.peak_flops, "bandwidth": hw.bandwidth}}


# ---------------------------------------------------------------- the whole study
def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train or reuse every run, then gather the summary and write the report into OUT."""
    from parscale.demo.report import print_tables, write_report

    check_demo_dir(cfg)
    configs = train_configs(cfg)
    runs, finals = {}, {}
    for i, (name, tc) in enumerate(configs.items(), 1):
        print(f"[demo] run {i}/{len(configs)}: {name} (P={tc.P}, train={tc.train}, {tc.steps} steps)", flush=True)
        finals[name], action = ensure_run(tc)
        runs[name] = run_summary(tc, action)
        runs[name]["label"] = next((s.label for s in STAGE2 if s.name == name), "P=1 pretraining from scratch")
    print("[demo] generating, comparing backbones, fitting the law, costing", flush=True)
    for name, final in finals.items():
        runs[name].update(generate(final, cfg.prompt, cfg.new_tokens))
    summary = {"config": cfg.to_dict(), "runs": runs, "backbone": backbone_check(finals),
               "law": law_study(cfg.out_dir), "cost": cost_study(cfg.out_dir, cfg.measure_cost)}
    write_report(summary, cfg.out_dir)
    print_tables(summary)
    return summary
