"""Stream adapters: several stream sets on one backbone, saved the way PEFT saves adapters.

The paper trains stream parameters on a frozen backbone, so one deployed backbone can carry
P = 2, 4 and 8 stream sets and switch between them per request. A stream set is the prefixes
of every attention layer plus the aggregation head (none for the one-prefix control at P = 1)
and, where the set has them, the per-stream adapters of the attention projections
(`stream_lora`); nothing of the backbone. On disk it is PEFT's layout:
`adapter_model.safetensors` (the released key names, e.g. `model.layers.0.self_attn.prefix_k`)
and `adapter_config.json` (the ParScale config, the base model's path and a fingerprint of the
backbone).

Switching installs the chosen set's parameters on the attention modules and the decoder (the
same tensor objects, no copy of anything) and re-selects the attention function; the backbone
is never touched. Inactive sets live in a plain dict on the model, outside the module tree, so
`state_dict`, `save_pretrained` and optimizers see only the active set.

The fingerprint holds every backbone tensor's shape and a checksum of its values rounded to
bfloat16, so the same backbone loaded in float32 or bfloat16 matches, and a mismatch can be
reported tensor by tensor; and the fields of the backbone's config that change what it
computes (`rope_parameters`, `rms_norm_eps`, `sliding_window`, ...: every field but the names,
versions, dtypes, output switches, special token ids, initialisation and generation settings),
so the same weights under another config are refused too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig

from parscale.atomic import atomic_write, atomic_write_json
from parscale.errors import UserError
from parscale.model import introspect, kernels, prefix_attention, stream_lora
from parscale.model.aggregation import AggregationHead
from parscale.model.config import ParScaleConfig
from parscale.model.format import read_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_TYPE = "PARSCALE_STREAMS"
STREAM_MARKERS = ("prefix_k", "prefix_v", "aggregate_layer.", "prefix_encoder.", stream_lora.MARKER)
FORMAT_VERSION = 1
# Config fields that do not change what the backbone computes from its weights: names and
# versions, the dtype (the checksums compare bfloat16 values), what a forward returns, labels,
# special token ids (tokenisation and generation), initialisation. Generation settings and
# private fields (`_...`) are left out too, and so are our own `parscale_*` fields.
NOT_COMPUTATION = frozenset({
    "name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "auto_map",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params",
    "tokenizer_class", "prefix", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "initializer_range", "chunk_size_feed_forward",
})

logger = logging.getLogger(__name__)


def is_stream_key(key: str) -> bool:
    """A state-dict key of a stream parameter (prefix, aggregation, stream adapter), not of the backbone."""
    return any(marker in key for marker in STREAM_MARKERS)


@dataclass
class StreamSet:
    """One set of stream parameters: a prefix pair per attention layer, the aggregation head
    (none for the P = 1 control with one prefix, `prefix_at_p1`) and the stream adapters
    (none unless `config.stream_lora_rank`)."""

    config: ParScaleConfig
    prefixes: list[tuple[nn.Parameter, nn.Parameter]]  # per attention module, in layer order
    head: AggregationHead | None
    loras: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list)  # (A, B) per projection

    def tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The set's tensors under the model's own key names (the released ones)."""
        names = _attention_names(model)
        out = {}
        for name, (k, v) in zip(names, self.prefixes):
            out[f"{name}.prefix_k"], out[f"{name}.prefix_v"] = k, v
        decoder = _decoder_name(model)
        for key, tensor in (self.head.state_dict() if self.head is not None else {}).items():
            out[f"{decoder}aggregate_layer.{key}"] = tensor
        if self.loras:
            where = {id(attention): name for name, attention in zip(names, introspect.attention_modules(model))}
            for (attention, proj), (lora_a, lora_b) in zip(stream_lora.projections(model), self.loras):
                prefix = f"{where[id(attention)]}.{proj}"
                out[f"{prefix}.{stream_lora.A_NAME}"], out[f"{prefix}.{stream_lora.B_NAME}"] = lora_a, lora_b
        return out

    def nbytes(self) -> int:
        params = [p for pair in self.prefixes + self.loras for p in pair]
        params += list(self.head.parameters() if self.head else [])
        return sum(p.numel() * p.element_size() for p in params)


# ----- where the parameters live in the model ------------------------------------------------
def _attention_names(model: nn.Module) -> list[str]:
    where = {id(module): name for name, module in model.named_modules()}
    return [where[id(module)] for module in introspect.attention_modules(model)]


def _decoder_name(model: nn.Module) -> str:
    decoder = model.get_decoder()
    name = next(n for n, m in model.named_modules() if m is decoder)
    return f"{name}." if name else ""


def capture(model: nn.Module) -> StreamSet | None:
    """The stream set installed in `model` now (the very tensors, not copies); None for the
    plain backbone."""
    config = model.parscale_config
    if not config.has_prefixes:
        return None
    prefixes = [(a.prefix_k, a.prefix_v) for a in introspect.attention_modules(model)]
    loras = stream_lora.installed(model) if config.stream_lora_rank else []
    return StreamSet(config, prefixes, model.get_decoder().aggregate_layer if config.n_streams > 1 else None, loras)


def empty_set(model: nn.Module, config: ParScaleConfig) -> StreamSet:
    """A zero-filled set shaped for `model`'s backbone (on its device, in its dtype)."""
    if not config.has_prefixes:
        raise UserError(f"a stream set needs P >= 2 (or the one-prefix control, prefix_at_p1), got {config.to_dict()}")
    ref = model.get_output_embeddings().weight
    n_kv, head_dim = introspect.kv_geometry(model.config)
    shape = (config.n_streams, n_kv, config.n_prefix_tokens, head_dim)  # P kv T d
    prefixes = [(nn.Parameter(torch.zeros(shape, dtype=ref.dtype, device=ref.device)),
                 nn.Parameter(torch.zeros(shape, dtype=ref.dtype, device=ref.device)))
                for _ in introspect.attention_modules(model)]
    head = AggregationHead(model.config.hidden_size, config.n_streams, config.attn_smooth, device=ref.device,
                           dtype=ref.dtype) if config.n_streams > 1 else None
    rank = config.stream_lora_rank
    loras = stream_lora.empty_adapters(model, config.n_streams, rank) if rank else []
    return StreamSet(config, prefixes, head, loras)


def install(model: nn.Module, stream_set: StreamSet | None, plain_attention: str) -> None:
    """Make `stream_set` the model's streams (None: the plain backbone); moves no backbone weight.

    What the previous set added is removed first (prefixes, aggregation head, stream adapters),
    so the plain backbone has the base model's modules, parameters and state-dict keys, nothing more."""
    attentions = introspect.attention_modules(model)
    decoder = model.get_decoder()
    if model.parscale_config.stream_lora_rank:
        stream_lora.install(model, [], 0.0)
    for attention in attentions:
        for name in ("prefix_k", "prefix_v"):
            if hasattr(attention, name):
                delattr(attention, name)
    if hasattr(decoder, "aggregate_layer"):
        del decoder.aggregate_layer
    if stream_set is None:
        model.parscale_config = ParScaleConfig(n_streams=1)
        decoder.set_attn_implementation(prefix_attention.register_plain(plain_attention))
        return
    ref = model.get_output_embeddings().weight
    for attention, (k, v) in zip(attentions, stream_set.prefixes):
        for param in (k, v):
            if param.device != ref.device or param.dtype != ref.dtype:
                param.data = param.data.to(device=ref.device, dtype=ref.dtype)
        attention.prefix_k, attention.prefix_v = k, v
    for param in (p for pair in stream_set.loras for p in pair):
        if param.device != ref.device or param.dtype != ref.dtype:
            param.data = param.data.to(device=ref.device, dtype=ref.dtype)
    if stream_set.loras:
        stream_lora.install(model, stream_set.loras, stream_set.config.stream_lora_scale)
    model.parscale_config = stream_set.config
    decoder.set_attn_implementation(prefix_attention.register_attention(plain_attention))
    if stream_set.head is None:  # the one-prefix control: no aggregation
        return
    decoder.aggregate_layer = stream_set.head.to(device=ref.device, dtype=ref.dtype)
    # the same matmul route as the rest of the model (the decode kernel, see `kernels`), so a
    # switched-in set computes exactly what a model built with it does
    kernels.enable(decoder.aggregate_layer, getattr(model.get_output_embeddings(), "use_kernel", False))


# ----- the backbone's fingerprint ------------------------------------------------------------
def backbone_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every backbone tensor of the state dict; the stream parameters and a tied lm_head left out."""
    state = model.state_dict()
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return {k: v for k, v in state.items()
            if not is_stream_key(k) and not (k.endswith("lm_head.weight") and head is embed)}


def _checksum(tensor: torch.Tensor) -> str:
    values = tensor.detach().to("cpu", torch.bfloat16).contiguous().reshape(-1)
    return hashlib.blake2b(values.view(torch.uint8).numpy().tobytes(), digest_size=8).hexdigest()


def computation_config(config) -> dict[str, Any]:
    """The fields of a transformers config that change what the backbone computes, flattened
    (`rope_parameters.rope_theta`) and as JSON stores them (lists, string keys)."""
    skip = NOT_COMPUTATION | set(GenerationConfig().to_dict())

    def flat(prefix: str, value: Any) -> dict[str, Any]:
        if isinstance(value, dict) and value:
            return {k: v for key, item in value.items() for k, v in flat(f"{prefix}.{key}", item).items()}
        return {prefix: value}

    data = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
    out = {}
    for key, value in data.items():
        if key not in skip and not key.startswith(("_", "parscale_")):
            out.update(flat(key, value))
    return dict(sorted(out.items()))


def backbone_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Shapes and bfloat16 checksums of every backbone tensor, one checksum of them all, and the
    config fields that change the computation."""
    tensors = {name: {"shape": list(t.shape), "checksum": _checksum(t)}
               for name, t in sorted(backbone_tensors(model).items())}
    whole = hashlib.blake2b(json.dumps(tensors, sort_keys=True).encode(), digest_size=16).hexdigest()
    return {"model_type": getattr(model.config, "model_type", None), "checksum": whole,
            "checksum_dtype": "bfloat16", "tensors": tensors, "config": computation_config(model.config)}


def _config_problems(expected: dict[str, Any], found: dict[str, Any], what: str) -> list[str]:
    """The config fields whose values differ. A field one side lacks (another transformers
    version) and a fingerprint written before configs were recorded are logged, not refused."""
    if "config" not in expected:
        logger.warning("%s records no backbone config (written by an older version): only the weights are "
                       "checked; save it again to record the config", what)
        return []
    want, have = expected["config"], found.get("config", {})
    one_side = sorted(set(want) ^ set(have))
    if one_side:
        logger.warning("%s: config field(s) %s are recorded on one side only and not compared", what, _some(one_side))
    return [f"config field {k} is {have[k]!r} in the model, {want[k]!r} in the adapter's backbone"
            for k in sorted(set(want) & set(have)) if want[k] != have[k]]


def compare_fingerprints(expected: dict[str, Any], found: dict[str, Any], what: str) -> None:
    """Raise a ValueError naming what differs between two backbones (config fields, names,
    shapes, values)."""
    problems = _config_problems(expected, found, what)
    if expected.get("checksum") == found.get("checksum") and not problems:
        return
    want, have = expected.get("tensors", {}), found.get("tensors", {})
    for keys, text in ((sorted(set(want) - set(have)), "missing from the model"),
                       (sorted(set(have) - set(want)), "in the model but not in the adapter's backbone")):
        if keys:
            problems.append(f"{len(keys)} tensor(s) {text} ({_some(keys)})")
    common = sorted(set(want) & set(have))
    problems += [f"{k} has shape {have[k]['shape']}, the adapter's backbone {want[k]['shape']}"
                 for k in common if want[k]["shape"] != have[k]["shape"]][:3]
    changed = [k for k in common if want[k]["shape"] == have[k]["shape"] and want[k]["checksum"] != have[k]["checksum"]]
    if changed:
        problems.append(f"{len(changed)} of {len(common)} tensors hold other values ({_some(changed)})")
    raise UserError(f"{what} was trained on another backbone: {'; '.join(problems)}; "
                    "load it on the model it was trained on")


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# ----- files ---------------------------------------------------------------------------------
def save_set(model: nn.Module, stream_set: StreamSet, directory: str | os.PathLike, base_path: str | None) -> None:
    """Write adapter_model.safetensors and adapter_config.json (each atomically, config last)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: t.detach().contiguous().cpu() for k, t in stream_set.tensors(model).items()}
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    config = {"peft_type": ADAPTER_TYPE, "task_type": "CAUSAL_LM", "format_version": FORMAT_VERSION,
              "base_model_name_or_path": base_path, "parscale": stream_set.config.to_dict(),
              "dtype": str(model.get_output_embeddings().weight.dtype).removeprefix("torch."),
              "backbone": backbone_fingerprint(model)}
    atomic_write_json(directory / ADAPTER_CONFIG, config, sort_keys=True)


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{directory} has no {ADAPTER_CONFIG}; give a directory written by save_streams "
                        "or `parscale streams extract`")
    config = read_json(path)
    if not isinstance(config, dict) or config.get("peft_type") != ADAPTER_TYPE:
        raise UserError(f"{path} is not a ParScale stream adapter (peft_type is not {ADAPTER_TYPE!r})")
    return config


def load_set(model: nn.Module, directory: str | os.PathLike) -> StreamSet:
    """Read an adapter, check it against `model`'s backbone, and return it as a new stream set."""
    config = read_adapter_config(directory)
    base = config.get("base_model_name_or_path")
    what = f"the adapter in {directory}" + (f" (base model: {base})" if base else "")
    compare_fingerprints(config.get("backbone", {}), backbone_fingerprint(model), what)
    weights_path = Path(directory) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise UserError(f"{directory} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    stream_set = empty_set(model, ParScaleConfig.from_dict(config.get("parscale", {})))
    expected = stream_set.tensors(model)
    found = load_file(str(weights_path))
    problems = [f"missing {k}" for k in sorted(set(expected) - set(found))]
    problems += [f"unexpected {k}" for k in sorted(set(found) - set(expected))]
    problems += [f"{k}: shape {list(found[k].shape)}, expected {list(expected[k].shape)}"
                 for k in sorted(set(found) & set(expected)) if found[k].shape != expected[k].shape]
    if problems:
        raise UserError(f"{weights_path} does not match its adapter_config.json: {'; '.join(problems[:6])}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(found[key])
    return stream_set
