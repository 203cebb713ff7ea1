"""The plugin's registration and the checks that need no engine."""
from __future__ import annotations

from conftest import save_tiny
from vllm import ModelRegistry

from parscale.serve import plugin, prompts


def test_entry_point_registers_the_released_architecture():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "parscale"]
    entry.load()()
    assert "Qwen2ParScaleForCausalLM" in ModelRegistry.get_supported_archs()
    entry.load()()  # vLLM loads plugins more than once per process: registering again is harmless
    from vllm.v1.engine.input_processor import InputProcessor

    assert InputProcessor.process_inputs.__wrapped__.__name__ == "process_inputs"
    assert not hasattr(InputProcessor.process_inputs.__wrapped__, "_parscale_slots")  # wrapped once only


def test_vllm_reads_the_config_without_remote_code(tmp_path):
    from transformers import AutoConfig

    save_tiny(tmp_path, 4)
    plugin.register()
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config).__name__ == "Qwen2ParScaleConfig"
    assert (prompts.n_streams(config), prompts.n_prefix_slots(config)) == (4, 48)
