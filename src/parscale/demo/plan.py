"""Which runs the demo trains, by budget: the design of the study in one place.

From scratch, on identical data, token budget and backbone initialisation (one seed ⇒ one
backbone, because the stream parameters draw from their own generator):
- `p1` the baseline, `p2` and `p4` the streams;
- `p1-prefix`: P = 1 with one learnable 48-token prefix. At this scale a single prefix (an
  attention sink) captured most of what two streams gained in earlier measurements, so
  without this control the streams would be credited with the prefix's gain;
- `p1-wide`: a wider P = 1 model with about (k·ln 2 + 1) ≈ 1.27x the baseline's non-embedding
  parameters, what the paper's law says two streams are worth (parameter scaling).
Two-stage (the paper's post-training): `p1` converted to P = 2 and P = 4 with its backbone
frozen (`post-p2-streams`, `post-p4-streams`), against `post-p1-control`, which keeps
training every weight of `p1` on the same number of tokens.

The `full` budget repeats this for four seeds, adds P = 1, 2, 4 at two more sizes (for a law
fitted to our own runs) and the attempts to make the streams earn their keep; it takes hours.

The `law` budget is another design (`_law_runs`): three small sizes trained on 20 to 80 tokens
per non-embedding parameter, where more parameters help, so that whether streams act like more
parameters can be asked at all. At every size P = 1, 2, 4 and two prefix controls at P = 1 (48
tokens, and 96: the prefix parameters of P = 2), at the middle size a 1.27x wider P = 1 model,
over three paired seeds; the report checks that premise before it compares anything. The
`law-gpu` budget is the same design on one GPU, at about 10x the parameters and the tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parscale.data.prepare import DataConfig
from parscale.errors import UserError

BUDGETS = ("smoke", "quick", "default", "full", "law", "law-gpu")
BASE_LR = 3e-3           # the trainer's default, measured to train `tiny` well
MIN_LR_RATIO = 0.1       # cosine decay to 10%: where stage 1 ends
# The smoke budget's corpus: a handful of standard-library modules, so it runs in seconds.
SMOKE_TRAIN = ("textwrap.py", "heapq.py", "bisect.py", "string.py", "shlex.py", "fnmatch.py", "glob.py")
SMOKE_VAL = ("calendar.py", "quopri.py")


@dataclass(frozen=True)
class LawDesign:
    """The sizes of a law budget: smallest first, and the middle size with its 1.27x wider P = 1 model."""

    sizes: tuple[str, ...]
    widened: str
    wide: str


# The `law` budget (sizes and steps measured in docs/mini-study.md), and `law-gpu`, the same
# design at about 10x the non-embedding parameters (and tokens) for one GPU.
LAW_DESIGNS = {"law": LawDesign(("law-xs", "law-s", "law-m"), "law-s", "law-s-wide"),
               "law-gpu": LawDesign(("law-gpu-xs", "law-gpu-s", "law-gpu-m"), "law-gpu-s", "law-gpu-s-wide")}
LAW_P = (1, 2, 4)
LAW_PREFIXES = (48, 96)   # the one-prefix controls at P = 1: P = 2's prefix length, and its parameter count
LAW_VOCAB = 512           # a small BPE, so the embedding and the head do not dominate these small models


def law_design(budget: str) -> LawDesign:
    """The sizes of a law budget (`law` for any other name: the tests' synthetic summaries)."""
    return LAW_DESIGNS.get(budget, LAW_DESIGNS["law"])


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    name: str
    label: str
    P: int = 1
    preset: str = "tiny"
    prefix_at_p1: bool = False
    prefix_tokens: int = 48           # prefix length per stream (the controls' one prefix at P = 1)
    source: str | None = None         # the run whose final model this one converts (two-stage)
    train: str = "full"               # full | streams (frozen backbone)
    seed: int = 0
    steps_factor: int = 1             # x the budget's steps (the "more tokens" attempt)
    attn_smooth: float = 0.01
    lr: float | None = None           # None: BASE_LR scaled by 128 / hidden
    prefix_init_std: float = 0.02     # the attempts' options (see TrainConfig); defaults = the main runs
    stream_lr_mult: float = 1.0
    prefix_mlp_hidden: int = 0
    stream_penalty: float = 0.0
    stream_decorrelation: float = 0.0  # the law budget's attempts (ND-LoRA): see TrainConfig
    stream_lora_rank: int = 0
    group: str = "scratch"            # scratch | two-stage | size | attempt | law
    setting: str = ""                 # the name without its seed: what seeds are averaged over
    baseline: str = "p1"              # the setting of its P = 1 baseline (Δ vs P = 1 in the report)

    @property
    def kind(self) -> str:
        """What the run is, for plots: streams, prefix control, wide, or a plain P = 1."""
        if self.prefix_at_p1:
            return "prefix"
        if self.preset.endswith("-wide"):
            return "wide"
        return "streams" if self.P > 1 else "p1"


def _default_data() -> DataConfig:
    return DataConfig()


def smoke_data() -> DataConfig:
    from parscale.data.corpus import stdlib_root

    lib = stdlib_root()
    return DataConfig(source="files", files=tuple(str(lib / m) for m in SMOKE_TRAIN),
                      val_files=tuple(str(lib / m) for m in SMOKE_VAL), vocab_size=320, val_tokens=4096)


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the demo's numbers (recorded in `OUT/demo.json`)."""

    out: str
    budget: str = "default"
    seeds: tuple[int, ...] = (0,)
    steps: int = 320                  # from-scratch updates (batch_size x 128 tokens)
    batch_size: int = 8               # sequences of 128 tokens per update
    post_steps: int = 80              # stage-2 updates
    evals: int = 4                    # evaluations per run (plus the last step)
    eval_tokens: int = 32768          # every loss is on these same held-out tokens
    sizes: tuple[str, ...] = ()       # extra presets at P = 1, 2, 4 for our own law fit
    attempts: bool = False            # the full study's attempts to make streams earn their keep
    decode_tokens: int = 32           # decode steps timed per model and dtype
    workers: int = 2                  # runs at a time, one thread each
    measure: bool = True              # time decoding (float32 and bfloat16)
    only: tuple[str, ...] = ()        # run only these settings (and the runs they continue from)
    data: Any = field(default_factory=_default_data)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", DataConfig.from_dict(self.data))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        object.__setattr__(self, "only", tuple(self.only))
        if not self.out:
            raise UserError("no output directory: give --out DIR")
        if self.budget not in BUDGETS:
            raise UserError(f"--budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.steps < 1 or self.post_steps < 1 or self.evals < 1 or self.batch_size < 1:
            raise UserError("the demo needs at least 1 step and 1 evaluation per run; raise --scale")
        if self.eval_tokens < 128:
            raise UserError(f"eval_tokens must be at least one sequence (128 tokens), got {self.eval_tokens}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds must be distinct and at least one, got {self.seeds}")

    @classmethod
    def preset(cls, out: str, budget: str = "default", scale: float = 1.0, seed: int = 0,
               **fields: Any) -> "DemoConfig":
        """A budget's settings, every step count x `scale`; `seed` shifts every seed."""
        import math

        if budget not in BUDGETS:
            raise UserError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
        if not (math.isfinite(scale) and scale > 0):
            raise UserError(f"--scale must be a positive number, got {scale}")
        base: dict[str, Any] = {
            "smoke": dict(steps=4, post_steps=2, evals=1, eval_tokens=512, decode_tokens=4, data=smoke_data()),
            "quick": dict(steps=100, post_steps=30, evals=2, eval_tokens=8192, decode_tokens=16),
            "default": {},
            # The default's runs and step counts (so its four-seed numbers are part of the study),
            # two smaller sizes for the law fit and the attempts: about 2 h on two quiet cores.
            # The sizes go down, not up: at this token budget a wider model already trains worse
            # than `tiny` (p1-wide), and `tiny-l` at P = 4 alone would cost an hour over 4 seeds.
            "full": dict(seeds=(0, 1, 2, 3), sizes=("tiny-xs", "tiny-s"), attempts=True),
            # 1024 updates of 16 x 128 tokens: 2.1M tokens, 20 per parameter of law-m and 80 of
            # law-xs, 0.37 epochs of the corpus at this vocabulary; 87 min measured on two cores (docs/mini-study.md).
            "law": dict(seeds=(0, 1, 2), steps=1024, batch_size=16, evals=4, eval_tokens=65536,
                        data=DataConfig(vocab_size=LAW_VOCAB)),
            # The same design at 10x: 512 updates of 320 x 128 tokens, 21M tokens, 20 per parameter
            # of law-gpu-m and 80 of law-gpu-xs, 3.7 epochs of the corpus. Wider batches, fewer
            # updates: small models on a GPU are bound by kernel launches, not by arithmetic.
            "law-gpu": dict(seeds=(0, 1, 2), steps=512, batch_size=320, evals=4, eval_tokens=65536,
                            data=DataConfig(vocab_size=LAW_VOCAB)),
        }[budget]
        base.update(fields)
        for key in ("steps", "post_steps"):
            base[key] = max(1, round(base.get(key, getattr(cls, key)) * scale))
        base["seeds"] = tuple(s + seed for s in base.get("seeds", (0,)))
        return cls(out=str(out), budget=budget, **base)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["data"] = self.data.to_dict()
        return fields

    def identity(self) -> dict[str, Any]:
        """What must match for an existing OUT to be reused: what decides the training runs."""
        # `only` picks runs, it does not change them: a study can be run in pieces into one OUT.
        return {k: v for k, v in self.to_dict().items()
                if k not in ("out", "workers", "measure", "decode_tokens", "only")}


# ---------------------------------------------------------------- the runs
def _seed_runs(cfg: DemoConfig, seed: int) -> list[RunSpec]:
    sfx = f"-s{seed}" if len(cfg.seeds) > 1 else ""

    def run(setting: str, label: str, **kw: Any) -> RunSpec:
        if kw.get("source"):
            kw["source"] += sfx
        return RunSpec(name=setting + sfx, label=label, seed=seed, setting=setting, **kw)

    if cfg.budget in LAW_DESIGNS:
        return _law_runs(run, LAW_DESIGNS[cfg.budget])
    runs = [
        run("p1", "P=1 from scratch (the baseline)"),
        run("p2", "P=2 from scratch", P=2),
        run("p4", "P=4 from scratch", P=4),
        run("p1-prefix", "P=1 + one 48-token prefix (control)", prefix_at_p1=True),
        run("p1-wide", "P=1, wider (1.27x non-embedding params)", preset="tiny-wide"),
        run("post-p2-streams", "p1 -> P=2, frozen backbone", P=2, source="p1", train="streams", group="two-stage"),
        run("post-p4-streams", "p1 -> P=4, frozen backbone", P=4, source="p1", train="streams", group="two-stage"),
        run("post-p1-control", "p1 keeps training, same tokens (control)", source="p1",
            lr=BASE_LR * MIN_LR_RATIO, group="two-stage"),
    ]
    for size in cfg.sizes:
        runs += [run(f"{size}-p{p}", f"P={p} from scratch, {size}", P=p, preset=size, group="size",
                     baseline=f"{size}-p1") for p in (1, 2, 4)]
    if cfg.attempts:
        runs += [
            run("p2-smooth0.1", "P=2, smoothing 0.1 (the released models')", P=2, attn_smooth=0.1, group="attempt"),
            run("p4-smooth0.1", "P=4, smoothing 0.1", P=4, attn_smooth=0.1, group="attempt"),
            run("p1-2x", "P=1, 2x the tokens", steps_factor=2, group="attempt"),
            run("p1-prefix-2x", "P=1 + prefix, 2x the tokens", prefix_at_p1=True, steps_factor=2, group="attempt"),
            run("p2-2x", "P=2, 2x the tokens", P=2, steps_factor=2, group="attempt"),
        ]
        # Options that change the prefix change the control's prefix too, so each gets a paired control.
        for name, what, options in PREFIX_ATTEMPTS:
            runs += [run(f"p2-{name}", f"P=2, {what}", P=2, group="attempt", **options),
                     run(f"p1-prefix-{name}", f"P=1 + prefix, {what}", prefix_at_p1=True, group="attempt", **options)]
        runs += [run(f"p2-penalty{c:g}", f"P=2, stream-similarity penalty {c:g}", P=2, stream_penalty=c,
                     group="attempt") for c in PENALTIES]
    return runs


def _law_runs(run, design: LawDesign) -> list[RunSpec]:
    """One seed of a law budget: at every size P = 1, 2, 4 and the two prefix controls, and
    the wider model; every run from scratch on the same tokens (one seed: one data order, and
    one backbone per size)."""
    runs = []
    for size in design.sizes:
        base = f"{size}-p1"
        runs += [run(f"{size}-p{p}", f"P={p} from scratch, {size}", P=p, preset=size, group="law", baseline=base)
                 for p in LAW_P]
        runs += [run(f"{size}-prefix{t}", f"P=1 + one {t}-token prefix (control), {size}", preset=size,
                     prefix_at_p1=True, prefix_tokens=t, group="law", baseline=base) for t in LAW_PREFIXES]
    runs.append(run(design.wide, f"P=1, wider (1.27x the non-embedding params of {design.widened})",
                    preset=design.wide, group="law", baseline=f"{design.widened}-p1"))
    return runs + law_attempt_runs(run, design)


def law_attempt_runs(run, design: LawDesign) -> list[RunSpec]:
    """The `law` budget's stream-diversity attempts, at P = 2 at every size (ND-LoRA, arXiv
    2510.20690, reports collapsed streams on a frozen Qwen2.5-0.5B and a fix): the decorrelation
    loss on the streams' final hidden states (`--stream-decorrelation`), per-stream low-rank
    adapters on the attention projections (`--stream-lora-rank`), and both together, as ND-LoRA
    uses them. Each is compared with plain P = 2 and both prefix controls of its size
    (`stats.law_pairs`); about 11 min each over three seeds, two runs at a time."""
    runs = []
    for size in design.sizes:
        for name, what, options in LAW_ATTEMPTS:
            runs.append(run(f"{size}-p2-{name}", f"P=2, {what}, {size}", P=2, preset=size, group="attempt",
                            baseline=f"{size}-p1", **options))
    return runs


# The law budget's attempts: (name, label, RunSpec options). The decorrelation loss is the mean
# squared cross-correlation of two streams' standardised features, about 1/H for collapsed
# streams (H = 24-48 here), so its weight is large enough to move a loss of about 2.5 nats.
LAW_ATTEMPTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("decor", "decorrelation loss x 10", {"stream_decorrelation": 10.0}),
    ("lora4", "per-stream LoRA rank 4 on q, k, v, o", {"stream_lora_rank": 4}),
    ("lora4-decor", "per-stream LoRA rank 4 + decorrelation x 10", {"stream_lora_rank": 4, "stream_decorrelation": 10.0}),
)


# The full budget's attempts on the prefixes: (name, label, RunSpec options).
PREFIX_ATTEMPTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("init0.002", "prefix init std 0.002 (10x smaller)", {"prefix_init_std": 0.002}),
    ("init0.2", "prefix init std 0.2 (10x larger)", {"prefix_init_std": 0.2}),
    ("slr3", "3x learning rate on the stream parameters", {"stream_lr_mult": 3.0}),
    ("slr0.3", "0.3x learning rate on the stream parameters", {"stream_lr_mult": 0.3}),
    ("mlp", "prefixes produced by a 128-wide MLP", {"prefix_mlp_hidden": 128}),
)
PENALTIES = (0.1, 1.0)  # x the mean pairwise max(cos, 0) of the streams' final hidden states


def plan(cfg: DemoConfig) -> list[RunSpec]:
    """Every run of the study (or of `cfg.only`'s settings), sources before the runs converted from them."""
    specs = [spec for seed in cfg.seeds for spec in _seed_runs(cfg, seed)]
    if not cfg.only:
        return specs
    settings = list(dict.fromkeys(s.setting for s in specs))
    unknown = [o for o in cfg.only if o not in settings]
    if unknown:
        raise UserError(f"--only: the {cfg.budget} budget has no setting {', '.join(map(repr, unknown))}; "
                        f"its settings are {', '.join(settings)}")
    by = {s.name: s for s in specs}
    keep = {s.name for s in specs if s.setting in cfg.only}
    for name in list(keep):  # a two-stage run needs the run it continues from
        while by[name].source:
            name = by[name].source
            keep.add(name)
    return [s for s in specs if s.name in keep]


def run_dir(cfg: DemoConfig, name: str) -> Path:
    return cfg.out_dir / "runs" / name


def learning_rate(spec: RunSpec) -> float:
    """The spec's rate, else BASE_LR scaled by 128 / hidden (wider matrices take smaller steps:
    an earlier d = 192 run at 3e-3 trained worse than d = 128)."""
    from parscale.train.presets import preset_dict

    return spec.lr if spec.lr is not None else BASE_LR * 128 / preset_dict(spec.preset)["hidden_size"]


def train_config(cfg: DemoConfig, spec: RunSpec):
    """The TrainConfig of one run: an ordinary `parscale train` run in OUT/runs/NAME."""
    from parscale.train.config import TrainConfig

    steps = (cfg.post_steps if spec.source else cfg.steps) * spec.steps_factor
    every = max(1, steps // cfg.evals)
    common = dict(out=str(run_dir(cfg, spec.name)), P=spec.P, train=spec.train, steps=steps, seed=spec.seed,
                  batch_size=cfg.batch_size, prefix_tokens=spec.prefix_tokens,
                  lr=learning_rate(spec), min_lr_ratio=MIN_LR_RATIO, attn_smooth=spec.attn_smooth,
                  eval_every=every, save_every=every, eval_tokens=cfg.eval_tokens, keep_last=1,
                  prefix_init_std=spec.prefix_init_std, stream_lr_mult=spec.stream_lr_mult,
                  prefix_mlp_hidden=spec.prefix_mlp_hidden, stream_similarity_penalty=spec.stream_penalty,
                  stream_decorrelation=spec.stream_decorrelation, stream_lora_rank=spec.stream_lora_rank,
                  data=cfg.data, cache_dir=str(cfg.out_dir / "data"))
    if spec.source:
        return TrainConfig(init_from=str(run_dir(cfg, spec.source) / "final"), **common)
    return TrainConfig(preset=spec.preset, prefix_at_p1=spec.prefix_at_p1, **common)
