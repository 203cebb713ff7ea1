"""How a training step runs fast on an accelerator: fused AdamW, activation checkpointing,
`torch.compile`. None of them changes what is computed, only how (to float tolerance).

The CPU keeps the optimizer it always had (torch's default for-each AdamW), so CPU results
stay what they were; the fused kernel, one launch for every parameter, is for CUDA, where
the per-parameter launches of the unfused update are a visible part of a small model's step.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from parscale.errors import UserError

log = logging.getLogger(__name__)


def _fused_here(optimizer_or_params) -> bool:
    params = optimizer_or_params
    if isinstance(optimizer_or_params, torch.optim.Optimizer):
        params = [p for group in optimizer_or_params.param_groups for p in group["params"]]
    return bool(params) and all(p.device.type == "cuda" for p in params)


def adamw(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the parameter `groups`: fused when every parameter is on CUDA, torch's
    default implementation (`fused=None`) otherwise."""
    fused = _fused_here([p for group in groups for p in group["params"]])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if fused else None)


def match_device(optimizer: torch.optim.Optimizer) -> None:
    """After loading a checkpoint's state: loading replaces each group's `fused` flag with the
    saved run's, so a run resumed on another device would keep that device's choice (a CPU
    checkpoint would turn the fused CUDA update off). Put back the choice `adamw` makes here,
    with the step counters where that implementation keeps them (fused: on the parameter's
    device; otherwise on the CPU)."""
    fused = _fused_here(optimizer)
    for group in optimizer.param_groups:
        group["fused"] = True if fused else None
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                step = state["step"]
                state["step"] = step.to(device=p.device, dtype=torch.float32) if fused else step.cpu()


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Keep only each decoder layer's input in the forward and recompute the rest in the
    backward (transformers' own checkpointing of its decoder layers; the non-reentrant
    `torch.utils.checkpoint`, which works with DDP, FSDP and `torch.compile`).

    The stream wrapper's decoder is the backbone's own (`model.model`), so the prefixes and the
    P rows are inside what is recomputed, and the loss and gradients are those without it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"--grad-checkpoint: {type(model).__name__} does not support activation "
                        "checkpointing; train without --grad-checkpoint")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name; older releases have only the other
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compiled(module: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile(module)` (the default inductor backend) for the training forward and
    backward. The caller keeps the plain module for evaluation and saving, so checkpoints hold
    the usual keys (a compiled module's own state dict would prefix them with `_orig_mod.`)."""
    if not torch._dynamo.is_dynamo_supported():
        raise UserError("--compile: torch.compile does not support this Python or platform with this torch; "
                        "train without --compile")
    log.info("torch.compile: the first update compiles the model and takes longer")
    return torch.compile(module)


@contextlib.contextmanager
def compile_errors(enabled: bool):
    """Compilation happens at the first call (and at a recompile): its failures (no C++
    compiler for the CPU backend, no triton for CUDA, an unsupported operation) become one line."""
    if not enabled:
        yield
        return
    from torch._dynamo.exc import TorchDynamoException

    try:
        yield
    except TorchDynamoException as err:
        cause = getattr(err, "inner_exception", None) or err  # what the backend raised, if it raised
        text = f"{type(cause).__name__}: {cause}"
        first = next(line.strip() for line in text.splitlines() if line.strip())
        raise UserError(f"--compile: torch.compile failed ({first}); train without --compile") from err
