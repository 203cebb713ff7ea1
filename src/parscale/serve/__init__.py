"""Serving ParScale checkpoints in vLLM through its out-of-tree model plugin.

- `plugin.register()` is the `vllm.general_plugins` entry point: it checks that vLLM has the
  internals the plugin wraps, teaches transformers the `qwen2_parscale` config, registers
  `Qwen2ParScaleForCausalLM` with vLLM's `ModelRegistry` and installs the wrappers of `slots`.
- `slots` wraps vLLM's request handling so that every prompt of a P > 1 model starts with the
  prefix slots and what vLLM reports (prompt ids, usage, prompt log-probabilities, echo)
  covers the user's prompt only (imports vLLM inside its functions).
- `prompts` holds the pure rules (no vLLM import): which checkpoints can be served, how many
  prefix slots a model takes, how a prompt is extended and checked.
- `model` is the vLLM model, built from vLLM's own Qwen2 layers (imports vLLM).

This folder may import `model` (the aggregation head, the config names); only `cli` imports it.
"""
