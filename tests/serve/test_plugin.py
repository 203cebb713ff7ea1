"""The plugin's registration, the vLLM interface it checks, the config without remote code, and a backbone it refuses."""
from __future__ import annotations

import pytest
import vllm
from conftest import ENGINE_ARGS, MAX_MODEL_LEN, save_tiny
from vllm import ModelRegistry

from parscale.errors import UserError
from parscale.serve import plugin, prompts


def test_entry_point_registers_the_released_architecture():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "parscale"]
    entry.load()()
    assert "Qwen2ParScaleForCausalLM" in ModelRegistry.get_supported_archs()
    entry.load()()  # vLLM loads plugins more than once per process: registering again is harmless
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm.v1.engine.output_processor import RequestState

    for method in (InputProcessor.process_inputs, RequestState.from_new_request, RequestState.make_request_output):
        assert method._parscale_slots and method.__wrapped__.__name__ == method.__name__
        assert not hasattr(method.__wrapped__, "_parscale_slots")  # wrapped once only


def test_a_release_with_the_interface_loads_whatever_its_version(monkeypatch):
    """vLLM 0.33 keeps the input processor of 0.32: the plugin goes by the interface, not the number."""
    assert plugin.missing_interface() == []
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    plugin.register()
    assert "Qwen2ParScaleForCausalLM" in ModelRegistry.get_supported_archs()


def test_an_input_processor_without_the_interface_is_refused_in_one_line(monkeypatch):
    from vllm.v1.engine.input_processor import InputProcessor

    def process_inputs(self, prompt, params):  # an imagined release that dropped request_id
        raise AssertionError("not to be called")

    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    monkeypatch.setattr(InputProcessor, "process_inputs", process_inputs)
    with pytest.raises(UserError) as err:
        plugin.register()
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "vLLM 0.34.0" in message
    assert "vllm.v1.engine.input_processor.InputProcessor.process_inputs(request_id, prompt, params)" in message
    assert "parse_model_prompt" not in message  # only what is missing is named
    assert InputProcessor.process_inputs is process_inputs  # refused before anything was wrapped


def test_a_missing_prompt_parser_is_named(monkeypatch):
    from vllm.renderers.inputs import preprocess

    monkeypatch.delattr(preprocess, "parse_model_prompt")
    with pytest.raises(UserError, match=r"vllm\.renderers\.inputs\.preprocess\.parse_model_prompt\(model_config, prompt\)"):
        plugin.register()


def test_vllm_reads_the_config_without_remote_code(tmp_path):
    from transformers import AutoConfig

    save_tiny(tmp_path, 4)
    plugin.register()
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config).__name__ == "Qwen2ParScaleConfig"
    assert (prompts.n_streams(config), prompts.n_prefix_slots(config)) == (4, 48)


def test_a_parscale_checkpoint_of_another_backbone_is_refused_by_name(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig
    from vllm import LLM

    from parscale import ParScaleConfig, to_parscale

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_MODEL_LEN)
    to_parscale(AutoModelForCausalLM.from_config(config), ParScaleConfig(n_streams=2)).save_pretrained(tmp_path)
    with pytest.raises(Exception) as err:
        LLM(model=str(tmp_path), **ENGINE_ARGS)
    chain, cause = [], err.value
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    assert any("'llama' backbone" in text and "Qwen2" in text for text in chain), chain
