"""Compiled decoding: the `generate` keywords that capture a decode step as one graph.

A batch-1 decode step of a small model on a GPU is bound by kernel launches, not by the bytes
it reads: eager PyTorch launches a few hundred kernels per step. transformers compiles the
model's forward by itself once the cache is static (fixed shapes), with the `CompileConfig`
given to `generate`; on CUDA "reduce-overhead" replays the step as a CUDA graph. Off CUDA
transformers compiles only when told to (`_compile_all_devices`), which we do for users who
ask, so that the same option works on a CPU (inductor's C++ backend). The first call pays the
compilation (seconds on a GPU, a minute or more on a small CPU).
"""
from __future__ import annotations

import torch
from transformers.generation.configuration_utils import CompileConfig


def compiled_generate_kwargs(device: torch.device | str) -> dict:
    """`model.generate(..., **compiled_generate_kwargs(model.device))`: a static cache and a
    compiled forward, one graph per step (`fullgraph`: a graph break is an error, not a slowdown)."""
    device = torch.device(device)
    config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else "default")
    if device.type != "cuda":
        config._compile_all_devices = True  # transformers' own switch for compiling off CUDA
    return {"cache_implementation": "static", "compile_config": config}
