"""Building the model of a run: from scratch, or two-stage by converting a trained P=1 model.

Conversion initialisation (measured in the project's mini-study and re-checked by
tests/test_convert.py): every stream gets its own key/value prefix drawn from N(0, 0.02)
with a seeded generator, and the aggregation head's last layer starts at zero, so the
streams are first averaged with uniform weights. The shared backbone and lm_head are the
trained ones, so the converted model starts within about 1% of the P=1 model's held-out
loss (the 48 extra attention slots absorb a little attention), and because the prefix draws
differ per stream, the streams' hidden states differ and so do their gradients: the
symmetry that would keep identical streams identical forever is broken from step 0.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from parscale.errors import UserError

log = logging.getLogger(__name__)


def _parscale_api():
    """`(ParScaleConfig, ParScaleForCausalLM, to_parscale)`, or None before the model exists."""
    try:
        from parscale.model.config import ParScaleConfig
        from parscale.model.wrapper import ParScaleForCausalLM, to_parscale
    except ImportError:
        return None
    return ParScaleConfig, ParScaleForCausalLM, to_parscale


def wrap_streams(base: torch.nn.Module, P: int, prefix_tokens: int, attn_smooth: float, seed: int,
                 prefix_at_p1: bool = False, **prefix_options):
    """Wrap a transformers causal LM with P streams (P=1: the exact base model, unless `prefix_at_p1`).

    `prefix_options`: `prefix_init_std`, `prefix_mlp_hidden`, `stream_lora_rank`, `stream_lora_alpha`
    (see `ParScaleConfig`)."""
    api = _parscale_api()
    if api is None:
        if P != 1 or prefix_at_p1:
            raise UserError("this installation has no parscale.model.wrapper, so only plain P=1 can be trained")
        return base
    ParScaleConfig, _, to_parscale = api
    cfg = ParScaleConfig(n_streams=P, n_prefix_tokens=prefix_tokens, attn_smooth=attn_smooth,
                         prefix_at_p1=prefix_at_p1, **prefix_options)
    return to_parscale(base, cfg, seed=seed)


def model_from_scratch(hf_config, P: int, prefix_tokens: int, attn_smooth: float, seed: int,
                       prefix_at_p1: bool = False, **prefix_options):
    """A freshly initialised model; the backbone init depends only on `seed` (the stream
    parameters come from their own generator), so runs of one seed share their backbone."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return wrap_streams(base, P, prefix_tokens, attn_smooth, seed, prefix_at_p1, **prefix_options)


PREFIX_ENCODER_FILE = "prefix_encoder.safetensors"  # beside a checkpoint's model/, read only to resume


def save_prefix_encoder(model: torch.nn.Module, directory: Path) -> None:
    """A checkpoint's copy of the prefix MLP: `model/` holds only the prefixes it produced, and a
    resumed run must go on training the MLP itself to repeat an uninterrupted run."""
    from safetensors.torch import save_file

    encoder = getattr(model, "prefix_encoder", None)
    if encoder is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()},
                  str(Path(directory) / PREFIX_ENCODER_FILE))


def restore_prefix_encoder(model: torch.nn.Module, checkpoint: Path, hidden: int) -> None:
    """Put the checkpoint's prefix MLP back on a model loaded from its plain `model/`."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / PREFIX_ENCODER_FILE
    if not path.is_file():
        raise UserError(f"{checkpoint} has no {PREFIX_ENCODER_FILE}, so the run's prefix MLP "
                        "(--prefix-mlp-hidden) cannot be resumed; start the run again in a new --out")
    model.attach_prefix_encoder(hidden)
    model.prefix_encoder.load_state_dict(load_file(str(path)), strict=True)


def backbone_digest(model: torch.nn.Module) -> str:
    """sha256 over the backbone's tensors (names and bytes, stream parameters excluded): equal
    digests mean bit-identical backbones, whatever streams are wrapped around them."""
    import hashlib

    stream = {name for name, _ in getattr(model, "stream_parameters", lambda: iter(()))()}
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in stream or name == "lm_head.weight" and _tied(model):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tied(model: torch.nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is emb.weight


def load_base_model(init_dir: str | Path) -> torch.nn.Module:
    """A trained P=1 model from a local directory: ours or any transformers causal LM.

    Only local files are read (no hub access) and never remote code."""
    from transformers import AutoModelForCausalLM

    init_dir = Path(init_dir)
    if not (init_dir / "config.json").is_file():
        raise UserError(f"--init-from {str(init_dir)!r} is not a model directory (no config.json); "
                        "give a directory written by save_pretrained, e.g. RUN_DIR/final")
    api = _parscale_api()
    if api is not None and _is_parscale_dir(init_dir):
        model = api[1].from_pretrained(init_dir)
        P = model.parscale_config.n_streams
        if P != 1:
            raise UserError(f"--init-from {str(init_dir)!r} already has P={P} streams; two-stage "
                            "training converts a P=1 model (use --resume to continue that run)")
        return _unwrap_p1(model)
    try:
        return AutoModelForCausalLM.from_pretrained(init_dir, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a causal LM from --init-from {str(init_dir)!r}: {err}") from err


def _is_parscale_dir(path: Path) -> bool:
    import json

    if (path / "parscale_config.json").is_file():
        return True
    fields = json.loads((path / "config.json").read_text())
    return "parscale" in json.dumps(fields.get("architectures") or []).lower() or "parscale" in fields


def _unwrap_p1(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model equal to a P=1 ParScale model (the same weights, by name)."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise UserError(f"cannot read the P=1 model as a plain {type(plain).__name__}: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}")
    return plain


def load_trained(model_dir: str | Path) -> torch.nn.Module:
    """A model saved by a run (checkpoint or final), with its streams."""
    from transformers import AutoModelForCausalLM

    api = _parscale_api()
    if api is not None:
        return api[1].from_pretrained(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)


def unsharded_replica(model: torch.nn.Module, full_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU copy of a (sharded) model, built from its config and given `full_state`,
    so that `save_pretrained` sees ordinary tensors (FSDP's DTensors cannot be written)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    pcfg = getattr(model, "parscale_config", None)
    replica = base if pcfg is None else wrap_streams(base, pcfg.n_streams, pcfg.n_prefix_tokens,
                                                     pcfg.attn_smooth, seed=0, prefix_at_p1=pcfg.prefix_at_p1,
                                                     prefix_mlp_hidden=pcfg.prefix_mlp_hidden,
                                                     stream_lora_rank=pcfg.stream_lora_rank,
                                                     stream_lora_alpha=pcfg.stream_lora_alpha)
    replica.load_state_dict(full_state, strict=True)
    return replica


def n_streams(model: torch.nn.Module) -> int:
    cfg = getattr(model, "parscale_config", None)
    return 1 if cfg is None else cfg.n_streams


def set_train_mode(model: torch.nn.Module, mode: str) -> None:
    """`full`: every weight learns. `streams`: only the stream parameters (prefixes, aggregation,
    stream adapters) learn."""
    if mode == "streams":
        if not hasattr(model, "freeze_backbone"):
            raise UserError("--train streams needs a ParScale model (P > 1)")
        model.freeze_backbone()
    else:
        for p in model.parameters():
            p.requires_grad_(True)


def trainable_report(model: torch.nn.Module) -> str:
    """PEFT's one-line report: trainable params, all params, trainable %."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100.0 * trainable / max(1, total):.4f}")


def param_groups(model: torch.nn.Module, weight_decay: float, stream_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups: decay on >=2-D weights; never on prefixes, norms, biases or frozen weights.

    With `stream_lr_mult` != 1 the stream parameters (prefixes or their encoder, aggregation)
    get groups of their own whose `lr_scale` the loop multiplies into every step's rate; at 1
    the layout stays the two groups that earlier runs' optimizer states hold."""
    from parscale.model.adapters import is_stream_key

    groups = {(stream, decays): [] for stream in (False, True) for decays in (True, False)}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        stream = stream_lr_mult != 1.0 and is_stream_key(name)
        groups[stream, not (p.ndim < 2 or "prefix" in name)].append(p)
    out = [{"params": groups[False, True], "weight_decay": weight_decay, "lr_scale": 1.0},
           {"params": groups[False, False], "weight_decay": 0.0, "lr_scale": 1.0}]
    if stream_lr_mult != 1.0:
        out += [{"params": groups[True, True], "weight_decay": weight_decay, "lr_scale": stream_lr_mult},
                {"params": groups[True, False], "weight_decay": 0.0, "lr_scale": stream_lr_mult}]
    return out
