"""Files: the released `qwen2_parscale` checkpoint format, read and written without remote code.

Layout (what `save_pretrained` writes and `from_pretrained` reads):
- `config.json`: the backbone's transformers config plus `parscale_n`, `parscale_n_tokens`,
  `parscale_attn_smooth`; a Qwen2 backbone is written as `model_type: qwen2_parscale`
  (architectures `Qwen2ParScaleForCausalLM`, legacy `rope_theta`/`torch_dtype` included) so
  the authors' code loads it.
- `model.safetensors`, or shards listed by `model.safetensors.index.json`: the backbone's
  keys plus `model.layers.{i}.self_attn.prefix_k/prefix_v` `[P, n_kv, T, head_dim]` and
  `model.aggregate_layer.{0,2}.{weight,bias}`; no `lm_head.weight` when embeddings are tied.
A directory without `parscale_*` fields is a plain transformers model and loads as P = 1.
Beyond the release, and written only when set: `parscale_prefix_at_p1` (the one-prefix control)
and `parscale_stream_lora_rank`/`_alpha` with the adapters' keys
`model.layers.{i}.self_attn.{q,k,v,o}_proj.stream_lora_A` `[P, R, in]` and `.stream_lora_B`
`[P, out, R]` (see `stream_lora`), which only this package reads.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, Qwen2Config

from parscale.model.config import ParScaleConfig
from parscale.errors import UserError, describe_os_error
from parscale.atomic import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

RELEASED_MODEL_TYPE = "qwen2_parscale"
RELEASED_ARCHITECTURE = "Qwen2ParScaleForCausalLM"
# ParScaleConfig field <- config.json field
CONFIG_MAP = {"n_streams": "parscale_n", "n_prefix_tokens": "parscale_n_tokens", "attn_smooth": "parscale_attn_smooth"}
# Our one field beyond the release: the P = 1 control with one prefix (absent = false).
PREFIX_AT_P1 = "parscale_prefix_at_p1"
# And the per-stream adapters (absent = none): ParScaleConfig field <- config.json field.
STREAM_LORA_MAP = {"stream_lora_rank": "parscale_stream_lora_rank", "stream_lora_alpha": "parscale_stream_lora_alpha"}
# The released model types whose backbone is a stock transformers config class.
BACKBONE_OF_MODEL_TYPE = {RELEASED_MODEL_TYPE: Qwen2Config}
_DROP_ON_LOAD = ("model_type", "architectures", "auto_map", "transformers_version")
_IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some old files carry
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
SHARD_GLOB = "model-*-of-*.safetensors"  # the shard names transformers and huggingface_hub write


# ----- config ------------------------------------------------------------------------------
def split_config(raw: dict[str, Any]) -> tuple[PretrainedConfig, ParScaleConfig]:
    """config.json contents -> (backbone transformers config, ParScaleConfig; P = 1 if absent)."""
    raw = dict(raw)
    found = {ours: raw.pop(theirs) for ours, theirs in CONFIG_MAP.items() if theirs in raw}
    if raw.pop(PREFIX_AT_P1, False):
        found["prefix_at_p1"] = True
    lora = {ours: raw.pop(theirs, None) for ours, theirs in STREAM_LORA_MAP.items()}
    found.update({ours: value for ours, value in lora.items() if value is not None})
    model_type = raw.get("model_type")
    if model_type is None:
        raise UserError("config.json has no model_type; it is not a transformers model directory")
    fields = {k: v for k, v in raw.items() if k not in _DROP_ON_LOAD}
    if model_type in BACKBONE_OF_MODEL_TYPE:
        backbone = BACKBONE_OF_MODEL_TYPE[model_type](**fields)
    else:
        try:
            backbone = AutoConfig.for_model(model_type, **fields)
        except ValueError as err:
            raise UserError(f"config.json has model_type={model_type!r}, which transformers does not know") from err
    if found and "n_streams" not in found:
        names = {**CONFIG_MAP, **STREAM_LORA_MAP, "prefix_at_p1": PREFIX_AT_P1}
        raise UserError(f"config.json has {sorted(names[k] for k in found)} but no parscale_n; add parscale_n")
    parscale = ParScaleConfig(**found) if found else ParScaleConfig(n_streams=1)
    return backbone, parscale


def config_dict(model) -> dict[str, Any]:
    """The config.json contents for `model` (released layout for a Qwen2 backbone)."""
    data = model.config.to_dict()
    if data.get("model_type") == "qwen2":
        data["model_type"] = RELEASED_MODEL_TYPE
        data["architectures"] = [RELEASED_ARCHITECTURE]
        rope = data.get("rope_parameters") or {}
        if rope.get("rope_type", "default") == "default" and "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]  # what transformers 4.x code reads
    else:
        data["architectures"] = [type(model).__name__]
    dtype = model.lm_head.weight.dtype
    data["torch_dtype"] = data["dtype"] = str(dtype).removeprefix("torch.")
    for ours, theirs in CONFIG_MAP.items():
        data[theirs] = getattr(model.parscale_config, ours)
    if model.parscale_config.prefix_at_p1:  # written only when set: the released P = 1 files stay as they are
        data[PREFIX_AT_P1] = True
    for ours, theirs in STREAM_LORA_MAP.items():  # likewise: files without adapters keep the released layout
        if getattr(model.parscale_config, ours):
            data[theirs] = getattr(model.parscale_config, ours)
    return data


# ----- small file helpers ------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from err


# ----- weights -----------------------------------------------------------------------------
def _is_tied(model) -> bool:
    return model.lm_head.weight is model.get_input_embeddings().weight


def weights_to_save(model) -> dict[str, torch.Tensor]:
    """The state dict under the released key names; the tied lm_head is left out, and a prefix
    encoder's output is written as ordinary prefixes (the saved model is a plain ParScale model)."""
    state = model.state_dict()
    if getattr(model, "prefix_encoder", None) is not None:  # the prefixes it produces, not the MLP
        state = {k: v for k, v in state.items() if not k.startswith("prefix_encoder.")}
        state.update(model.materialised_prefixes())
    if _is_tied(model):
        state.pop("lm_head.weight", None)
    return {key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards of an index.

    A folder holding both an index and a single file whose keys overlap is refused: one of
    them is stale, and loading either would silently pick one set of weights.
    """
    if (directory / SAFE_INDEX).is_file():
        weight_map = read_json(directory / SAFE_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{directory / SAFE_INDEX} has no weight_map object")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"shard(s) listed in {SAFE_INDEX} are missing: {missing}")
        if (directory / SAFE_WEIGHTS).is_file() and directory / SAFE_WEIGHTS not in files:
            with safe_open(str(directory / SAFE_WEIGHTS), framework="pt") as handle:
                both = set(handle.keys()) & set(weight_map)
            if both:
                raise UserError(f"{directory} holds both {SAFE_INDEX} (with its shards) and {SAFE_WEIGHTS}, "
                                f"and both hold {len(both)} of the same tensors (e.g. {sorted(both)[0]}); one is "
                                "stale: delete the files of the older save")
        return files
    if (directory / SAFE_WEIGHTS).is_file():
        return [directory / SAFE_WEIGHTS]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise UserError(f"{directory} holds only pickled weights; convert them to safetensors first")
    raise UserError(f"{directory} has no {SAFE_WEIGHTS} or {SAFE_INDEX}")


def _old_weight_files(directory: Path) -> set[Path]:
    """Every weights file an earlier save may have left: the single file, the index, its shards."""
    found = {directory / SAFE_WEIGHTS, directory / SAFE_INDEX, *directory.glob(SHARD_GLOB)}
    if (directory / SAFE_INDEX).is_file():
        try:
            weight_map = json.loads((directory / SAFE_INDEX).read_text()).get("weight_map") or {}
            found |= {directory / name for name in set(weight_map.values()) if "/" not in name}
        except (json.JSONDecodeError, AttributeError):
            pass  # a damaged index: its shards still match SHARD_GLOB
    return {path for path in found if path.is_file()}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; a damaged file is a UserError that names it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as err:  # the header does not match the file: truncated or not safetensors
        raise UserError(f"{path} is truncated or not a safetensors file ({err}); "
                        "write it again (save_pretrained) or restore a complete copy") from err


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        state.update(read_safetensors(path))
    return state


def check_weights(model, found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every expected key present with its shape, nothing unexpected; returns what to load."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = _is_tied(model)
    found = {k: v for k, v in found.items() if not k.endswith(_IGNORED_KEY_SUFFIXES)}
    if tied:
        found.pop("lm_head.weight", None)  # some files store the tied copy too
        expected.pop("lm_head.weight", None)
    problems = []
    for key in sorted(set(found) - set(expected)):
        problems.append(f"unexpected key {key} with shape {list(found[key].shape)}")
    for key in sorted(set(expected) - set(found)):
        problems.append(f"missing key {key}: expected shape {list(expected[key])}")
    for key in sorted(set(expected) & set(found)):
        if tuple(found[key].shape) != expected[key]:
            problems.append(f"key {key}: expected shape {list(expected[key])}, found {list(found[key].shape)}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise UserError(f"checkpoint does not match its config.json: {shown}")
    return found


# ----- save / load -------------------------------------------------------------------------
def save_parscale(model, save_directory: str | os.PathLike, max_shard_size: int | str = "50GB", **kwargs) -> None:
    """Write config.json, generation_config.json and the weights (each file atomically).

    The weights go to one `model.safetensors`, or, above `max_shard_size` (transformers'
    default, 50GB), to shards listed by `model.safetensors.index.json`. Weight files of an
    earlier save into the same folder are removed, in an order that keeps the folder
    loadable as the old model or the new one, never as a mix: the old index goes first
    (without it, old shards are never read), the new index last (it makes new shards
    visible), and leftovers once the new weights are in place.
    """
    if not kwargs.pop("is_main_process", True):  # Trainer's multi-process saves: rank 0 writes
        return
    ignored = sorted(k for k, v in kwargs.items() if v is not None)  # Trainer passes state_dict=None
    if ignored:
        logger.warning("save_pretrained ignores %s", ignored)
    directory = Path(save_directory)
    try:
        _write_files(model, directory, max_shard_size)
    except OSError as err:  # each file is replaced atomically, so what was there before is intact
        raise UserError(f"cannot save the model to {str(directory)!r}: {describe_os_error(err)}") from err


def _write_files(model, directory: Path, max_shard_size: int | str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    weights = weights_to_save(model)
    # The shard plan is the library transformers uses for the same job (sizes, names, index).
    split = split_torch_state_dict_into_shards(weights, max_shard_size=max_shard_size)
    stale = _old_weight_files(directory)
    (directory / SAFE_INDEX).unlink(missing_ok=True)
    if split.is_sharded:
        (directory / SAFE_WEIGHTS).unlink(missing_ok=True)
    written = set()
    for name, keys in split.filename_to_tensors.items():
        part = {key: weights[key] for key in keys}
        atomic_write(directory / name, lambda tmp, part=part: save_file(part, tmp, metadata={"format": "pt"}))
        written.add(directory / name)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        atomic_write_json(directory / SAFE_INDEX, index, sort_keys=True)
        written.add(directory / SAFE_INDEX)
    for path in stale - written:
        path.unlink(missing_ok=True)
    if getattr(model, "generation_config", None) is not None:
        atomic_write_json(directory / "generation_config.json", model.generation_config.to_diff_dict(), sort_keys=True)
    atomic_write_json(directory / "config.json", config_dict(model), sort_keys=True)  # last: its presence marks a complete save


def resolve_dtype(torch_dtype, backbone: PretrainedConfig) -> torch.dtype:
    """The dtype asked for, else the one config.json records, else float32."""
    dtype = torch_dtype if torch_dtype is not None else getattr(backbone, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype is None:
        return torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"torch_dtype must be a floating torch dtype such as torch.float32, got {torch_dtype!r}")
    return dtype


def read_checkpoint(directory: Path) -> tuple[PretrainedConfig, ParScaleConfig, dict[str, torch.Tensor]]:
    """The backbone config, the ParScale config and the raw weights of a saved directory.

    The model module composes these into a model; this module never imports it, so the
    format stays a leaf that the wrapper depends on, not the other way round.
    """
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json; pass the directory written by save_pretrained")
    backbone, parscale = split_config(read_json(directory / "config.json"))
    return backbone, parscale, read_weights(directory)


def read_generation_config(directory: Path) -> GenerationConfig | None:
    path = directory / "generation_config.json"
    return GenerationConfig.from_dict(read_json(path)) if path.is_file() else None
