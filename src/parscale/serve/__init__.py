"""Serving ParScale checkpoints in vLLM through its out-of-tree model plugin.

- `plugin.register()` is the `vllm.general_plugins` entry point: it teaches transformers the
  `qwen2_parscale` config, registers `Qwen2ParScaleForCausalLM` with vLLM's `ModelRegistry`
  and makes vLLM's input processor prepend the prefix slots to every prompt.
- `prompts` holds the pure rules (no vLLM import): which checkpoints can be served, how many
  prefix slots a model takes, how a prompt is extended and checked.
- `model` is the vLLM model, built from vLLM's own Qwen2 layers (imports vLLM).

This folder may import `model` (the aggregation head, the config names); only `cli` imports it.
"""
