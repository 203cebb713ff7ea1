"""The keyword arguments of `from_pretrained`: the usual ones accepted, every other one refused.

Users (and `AutoModelForCausalLM`, `pipeline`, lm-eval, TRL) call `from_pretrained` with the
keywords they pass to any transformers model. We read a local directory only, so the hub's
keywords are accepted when they change nothing (`local_files_only`, `cache_dir`, `token`, ...)
and refused when they would (`force_download=True`, a `revision`); a keyword we do not know
is a `UserError` naming the ones we do, never a `TypeError` or a silent no-op.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from parscale.errors import UserError
from parscale.model.config import ParScaleConfig

_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "half": torch.float16}
# Passed by AutoModelForCausalLM / pipeline for their own bookkeeping, or hub options that are
# meaningless for a local directory: accepted and ignored.
# ParScaleConfig's fields and the names people guess for them: keywords that ask for streams
_STREAM_FIELDS = {f.name for f in fields(ParScaleConfig)} | {"P", "num_streams", "streams", "n_prefix", "parscale_config"}
_IGNORED = {"_from_auto", "_from_pipeline", "_commit_hash", "cache_dir", "proxies", "token",
            "local_files_only", "low_cpu_mem_usage", "trust_remote_code", "code_revision", "resume_download"}
ACCEPTED = ("dtype", "torch_dtype", "device_map", "local_files_only", "attn_implementation", "use_safetensors",
            "subfolder", "revision", "force_download", "config", "adapter_kwargs", "cache_dir", "token",
            "trust_remote_code", "low_cpu_mem_usage")


ATTENTION = ("sdpa", "eager", "flash_attention_2")  # the kinds `attention` registers a prefix version of


@dataclass(frozen=True)
class LoadOptions:
    """What the keywords ask for: a dtype (None: the checkpoint's), a device, a subfolder."""

    dtype: torch.dtype | None = None
    device: torch.device | None = None
    subfolder: str = ""
    attn_implementation: str = "sdpa"


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or value == "auto":
        return None  # the dtype config.json records, as transformers does for "auto"
    if isinstance(value, str):
        if value.removeprefix("torch.") not in _DTYPE_NAMES:
            raise UserError(f"dtype {value!r} is not one of {sorted(_DTYPE_NAMES)} or 'auto'")
        return _DTYPE_NAMES[value.removeprefix("torch.")]
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    raise UserError(f"dtype must be a floating torch dtype (e.g. torch.bfloat16), a name or 'auto'; got {value!r}")


def resolve_device(value: Any) -> torch.device | None:
    """`device_map`: "cpu", "auto" (the accelerator if there is one), a device, an index or {"": device}."""
    if value is None:
        return None
    if isinstance(value, dict):
        if set(value) != {""}:
            raise UserError("device_map dicts that split the model across devices are not supported; "
                            "pass one device, e.g. device_map='cpu', 'cuda:0' or 'auto'")
        value = value[""]
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"device_map {value!r} is not a device; use 'cpu', 'auto', 'cuda:0' or an index") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device_map {value!r} asks for CUDA, which is not available; use 'cpu' or 'auto'")
    return device


def parse_load_kwargs(model_args: tuple, kwargs: dict[str, Any]) -> LoadOptions:
    """Check `from_pretrained`'s extra arguments; returns the ones that matter."""
    if model_args:
        raise UserError(f"from_pretrained takes the directory and keywords only; got {len(model_args)} extra "
                        "positional argument(s)")
    unknown = sorted(set(kwargs) - set(ACCEPTED) - _IGNORED)
    streams = [key for key in unknown if key in _STREAM_FIELDS]
    if streams:  # a plain checkpoint's streams are added by wrapping it, not by loading
        raise UserError(f"from_pretrained loads the streams a checkpoint has and does not take {', '.join(streams)}; "
                        "to give a plain checkpoint P streams, wrap it: to_parscale(AutoModelForCausalLM."
                        "from_pretrained(path), ParScaleConfig(n_streams=4)) (then train the new streams)")
    if unknown:
        raise UserError(f"from_pretrained does not take {', '.join(unknown)}; it takes {', '.join(ACCEPTED)}")
    dtype, torch_dtype = kwargs.get("dtype"), kwargs.get("torch_dtype")
    if dtype is not None and torch_dtype is not None and _dtype(dtype) != _dtype(torch_dtype):
        raise UserError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype")
    if kwargs.get("attn_implementation") not in (None, *ATTENTION):
        raise UserError(f"attn_implementation={kwargs['attn_implementation']!r}: the stream prefixes run on "
                        f"{', '.join(ATTENTION)}; drop the argument (sdpa) or pass one of them")
    if kwargs.get("use_safetensors") is False:
        raise UserError("use_safetensors=False: parscale reads safetensors only (no pickled weights)")
    if kwargs.get("force_download"):
        raise UserError("force_download=True: parscale reads a local directory and never downloads; download "
                        "the model first (e.g. `huggingface-cli download`) and pass its folder")
    if kwargs.get("revision") not in (None, "main"):
        raise UserError(f"revision={kwargs['revision']!r}: parscale reads a local directory, which has no "
                        "revisions; check out the revision you want and pass its folder")
    if kwargs.get("adapter_kwargs"):
        raise UserError("adapter_kwargs: load stream adapters with model.load_streams(DIR) instead")
    config = kwargs.get("config")
    if config is not None and type(config).__name__ != "Qwen2ParScaleConfig":  # the one AutoModel passes on
        raise UserError("config=...: the config is read from the directory's config.json; drop the argument")
    return LoadOptions(dtype=_dtype(dtype if dtype is not None else torch_dtype),
                       device=resolve_device(kwargs.get("device_map")), subfolder=kwargs.get("subfolder") or "",
                       attn_implementation=kwargs.get("attn_implementation") or "sdpa")
