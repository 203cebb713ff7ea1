"""`TrainConfig`: every hyperparameter of a run in one validated dataclass.

The resolved config is written as `RUN_DIR/config.yaml` and is the single source of the run:
`--resume` reads it back, so a resumed run cannot silently change its model or data.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from parscale.errors import UserError, reject_unknown_fields
from parscale.train.schedule import SCHEDULES

TRAIN_MODES = ("full", "streams")
DTYPES = ("auto", "float32", "bfloat16")
# Options a resumed run may change; anything else would make it a different run.
RESUMABLE_OVERRIDES = ("steps", "eval_every", "save_every", "keep_last", "device", "eval_tokens",
                       "lr", "grad_clip", "grad_checkpoint", "compile", "peak_tflops")


def _data_config_cls():
    from parscale.data.config import DataConfig

    return DataConfig


def _default_data():
    return _data_config_cls()()


@dataclass
class TrainConfig:
    """One training run. Defaults are the mini-study's settings that trained well on CPU."""

    out: str = ""                       # run directory (checkpoints, metrics, final model)
    # --- model: exactly one of preset / model_config / init_from (preset 'tiny' if none)
    preset: str | None = None           # a name from parscale.train.presets.PRESETS
    model_config: str | None = None     # a transformers config.json (file or directory)
    init_from: str | None = None        # a trained causal-LM directory to convert (two-stage)
    P: int = 1                          # number of parallel streams
    prefix_tokens: int = 48             # learnable key/value prefix length per stream and layer
    attn_smooth: float = 0.01           # aggregation smoothing (the paper's epsilon)
    prefix_at_p1: bool = False          # P=1 with one learnable prefix: the control for the streams
    prefix_init_std: float = 0.02       # std of the prefixes' N(0, std) initialisation
    prefix_mlp_hidden: int = 0          # >0: an MLP of this width produces the prefixes (saved as plain prefixes)
    train: str = "full"                 # full: all weights learn | streams: backbone frozen
    # --- data
    data: Any = field(default_factory=_default_data)   # a parscale.data.prepare.DataConfig
    cache_dir: str | None = None        # where tokenized data is cached (None: ~/.cache/parscale/data)
    seq_len: int = 128
    batch_size: int = 8                 # global sequences per update (over ranks and accumulation)
    grad_accum: int = 1                 # micro-batches per update
    order_start: int | None = None      # sequences of the data order to skip (None: where --init-from stopped, else 0)
    # --- optimisation
    steps: int = 640
    lr: float = 3e-3
    warmup_steps: int | None = None     # None: 5% of steps
    schedule: str = "cosine"            # cosine | wsd
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1           # on >=2-D weights only (never prefixes, norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0              # 0 disables clipping
    stream_lr_mult: float = 1.0         # x the learning rate for the stream parameters (prefixes, aggregation, stream adapters)
    stream_similarity_penalty: float = 0.0  # + this x the streams' mean pairwise max(cos, 0) of hidden states in the loss
    stream_decorrelation: float = 0.0   # adds this x how correlated the streams' final hidden states are (their mean squared cross-correlation, ND-LoRA's Barlow Twins term with target 0) to the loss, to make the streams differ (0: off)
    stream_lora_rank: int = 0           # >0: every stream gets its own LoRA of this rank on each attention projection (q, k, v, o), trained and saved with the streams (ND-LoRA; 0: none)
    stream_lora_alpha: float | None = None  # the stream LoRA's update is scaled by alpha/rank (default: the rank, a scale of 1)
    # --- evaluation and checkpoints
    eval_every: int = 100               # 0: only at the end
    eval_tokens: int | None = None      # held-out tokens per evaluation (None: all kept by data)
    save_every: int = 100               # 0: only at the end
    keep_last: int = 2
    # --- execution
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"                 # auto: bf16 autocast on GPU, float32 on CPU
    fsdp: bool = False                  # shard the model with FSDP under torchrun
    grad_checkpoint: bool = False       # recompute each decoder layer's activations in the backward (less memory, ~1/3 more compute)
    compile: bool = False               # torch.compile the model for the training forward and backward
    peak_tflops: float | None = None    # the device's peak TFLOP/s for the mfu in metrics.jsonl (None: known GPUs under bf16)

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.data, dict):
            self.data = _data_config_cls().from_dict(self.data)
        for name in ("model_config", "init_from", "cache_dir"):  # the run means the same from any cwd
            if getattr(self, name):
                setattr(self, name, os.path.abspath(os.path.expanduser(getattr(self, name))))
        sources = [n for n in ("preset", "model_config", "init_from") if getattr(self, n)]
        if len(sources) > 1:
            raise UserError(f"give only one of --preset, --model-config, --init-from (got {sources})")
        if not sources:
            self.preset = "tiny"
        if self.preset is not None:
            from parscale.train.presets import PRESETS

            if self.preset not in PRESETS:
                raise UserError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        if not self.out:
            raise UserError("no run directory: give --out RUN_DIR")
        self._check_choices()
        self._check_ranges()
        if self.init_from and self.data.tokenizer is None:
            # Two-stage training keeps the trained model's vocabulary: its tokenizer.
            self.data = dataclasses.replace(self.data, tokenizer=self.init_from)
        self.data.check_chat_tokenizer_given()
        if self.warmup_steps is None:
            self.warmup_steps = max(1, round(0.05 * self.steps))

    def _check_types(self) -> None:
        """A YAML typo (`P: two`) gets a message naming the option, not a TypeError later."""
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), str(f.type)
            if value is None and "None" in hint:
                continue
            want = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}.get(hint.split(" ")[0])
            if want is None:
                continue
            if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
                raise UserError(f"option {f.name} must be {hint.split(' ')[0]}, got {value!r}")

    def _check_choices(self) -> None:
        if self.train not in TRAIN_MODES:
            raise UserError(f"--train must be one of {TRAIN_MODES}, got {self.train!r}")
        if self.train == "streams" and not self.init_from:
            raise UserError("--train streams freezes the backbone, so it needs a trained one: "
                            "add --init-from DIR (or use --train full)")
        if self.prefix_at_p1 and self.P != 1:
            raise UserError(f"--prefix-at-p1 gives a P=1 model one prefix; it cannot be combined with --P {self.P}")
        if self.prefix_mlp_hidden and self.P == 1 and not self.prefix_at_p1:
            raise UserError("--prefix-mlp-hidden produces prefixes, which a plain P=1 model has none of; "
                            "add --P 2 (or more) or --prefix-at-p1")
        if self.stream_similarity_penalty and self.P < 2:
            raise UserError("--stream-similarity-penalty compares streams, so it needs --P 2 or more")
        if self.stream_decorrelation > 0 and self.P < 2:
            raise UserError("--stream-decorrelation compares streams, so it needs --P 2 or more")
        if self.stream_lora_rank > 0 and self.P == 1 and not self.prefix_at_p1:
            raise UserError("--stream-lora-rank gives each stream its own adapter, and a plain P=1 model has no "
                            "streams; add --P 2 (or more) or --prefix-at-p1")
        if self.stream_lora_alpha is not None and not self.stream_lora_rank:
            raise UserError("--stream-lora-alpha scales the stream adapters; add --stream-lora-rank R, or drop it")
        if self.train == "streams" and self.P < 2:
            raise UserError("--train streams trains only the stream parameters, which exist for P >= 2; "
                            "add --P 2 (or more), or use --train full")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UserError(f"--device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")

    def _check_ranges(self) -> None:
        checks = [
            (self.P >= 1, "--P must be at least 1"),
            (self.prefix_tokens >= 1 or self.P == 1, "--prefix-tokens must be at least 1 when P > 1"),
            (0.0 <= self.attn_smooth < 1.0, "--attn-smooth must be in [0, 1)"),
            (self.prefix_init_std > 0, "--prefix-init-std must be positive (zero prefixes keep the streams identical)"),
            (self.prefix_mlp_hidden >= 0, "--prefix-mlp-hidden must be >= 0 (0: learn the prefixes directly)"),
            (self.stream_lr_mult > 0, "--stream-lr-mult must be positive (1: the same rate as the backbone)"),
            (self.stream_similarity_penalty >= 0, "--stream-similarity-penalty must be >= 0 (0: off)"),
            (self.stream_decorrelation >= 0, "--stream-decorrelation must be >= 0 (0: off)"),
            (self.stream_lora_rank >= 0, "--stream-lora-rank must be >= 0 (0: no stream adapters)"),
            (self.stream_lora_alpha is None or self.stream_lora_alpha > 0,
             "--stream-lora-alpha must be positive (default: the rank, a scale of 1)"),
            (self.seq_len >= 2, "--seq-len must be at least 2 (one input and one target token)"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
            (self.batch_size % self.grad_accum == 0,
             f"--batch-size {self.batch_size} must be divisible by --grad-accum {self.grad_accum}"),
            (self.steps >= 1, "--steps must be at least 1"),
            (self.order_start is None or self.order_start >= 0, "--order-start must be >= 0"),
            (self.lr > 0, "--lr must be positive"),
            (self.warmup_steps is None or 0 <= self.warmup_steps <= self.steps,
             "--warmup-steps must be between 0 and --steps"),
            (0.0 <= self.min_lr_ratio <= 1.0, "--min-lr-ratio must be in [0, 1]"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "--beta1/--beta2 must be in [0, 1)"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0 (0 disables clipping)"),
            (self.eval_every >= 0 and self.save_every >= 0, "--eval-every/--save-every must be >= 0"),
            (self.eval_tokens is None or self.eval_tokens >= self.seq_len,
             "--eval-tokens must be at least --seq-len"),
            (self.keep_last >= 1, "--keep-last must be at least 1"),
            (self.peak_tflops is None or self.peak_tflops > 0, "--peak-tflops must be positive (the device's peak)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["data"] = self.data.to_dict()
        return out

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "TrainConfig":
        reject_unknown_fields(cls, fields, "config option(s)")
        return cls(**fields)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A run config file as a dict (validated later, together with the flags)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        fields = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(fields, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of option: value")
    return fields


def dump_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config atomically (temp file in the same folder, then replace)."""
    from parscale.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def merge_for_resume(saved: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The saved run config with the few options a resumed run may change.

    Any other option that differs is refused, naming it: a resumed run with another P,
    model or data is a different run, and must start in a new directory."""
    merged = dict(saved)
    for key, value in overrides.items():
        if key in ("out",):
            continue
        if key == "data":
            if value != saved.get("data"):
                raise UserError("cannot resume with different data options; drop the --data-* "
                                "flags or start a new run with another --out")
            continue
        if key in ("model_config", "init_from", "cache_dir") and value:
            value = os.path.abspath(os.path.expanduser(value))  # saved configs hold absolute paths
        if key in RESUMABLE_OVERRIDES:
            merged[key] = value
        elif saved.get(key) != value:
            raise UserError(f"cannot resume with a different {key}: the run has {key}="
                            f"{saved.get(key)!r} and you gave {value!r}; drop that flag, or "
                            "start a new run with another --out")
    return merged
