"""Tiny random causal LMs shared by the test files (CPU, float32, built in-process).

`tiny_factory(family, seed=0, **overrides)` returns a fresh eval-mode model; `tiny_qwen2`
is the most common case. Families: qwen2, llama, mistral, gemma.
"""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

_COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,
)
TINY_CONFIGS = {
    "qwen2": (Qwen2Config, dict(tie_word_embeddings=True)),
    "llama": (LlamaConfig, dict(tie_word_embeddings=False)),
    "mistral": (MistralConfig, dict(tie_word_embeddings=False, sliding_window=None)),
    "gemma": (GemmaConfig, dict(head_dim=8)),
}


def build_tiny(family: str = "qwen2", seed: int = 0, **overrides):
    config_cls, extra = TINY_CONFIGS[family]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def pytest_collection_modifyitems(config, items):
    """A test marked `@pytest.mark.cuda` needs a CUDA GPU (`pytest -m cuda` runs those tests):
    where torch sees none, it is skipped, saying why."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(no_gpu)


@pytest.fixture
def tiny_factory():
    return build_tiny


@pytest.fixture
def tiny_qwen2():
    return build_tiny("qwen2")


@pytest.fixture
def count_calls(monkeypatch):
    """`count_calls(module, name)` wraps `module.name` for this test and returns a one-element
    list that counts its calls: how the tests see which path a forward took."""
    def wrap(module, name: str) -> list[int]:
        calls = [0]
        original = getattr(module, name)

        def counted(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
        return calls

    return wrap


@pytest.fixture
def count_steps(count_calls, monkeypatch):
    """`count_steps(name)`: `count_calls(decode_layer, name)` for a layer's decode step ("_step")
    or its one-call step ("_chained"), each layer's step that a stack's single call served
    (`decode_stack`) counted as well: such a step is the layer's one-call step, called from C."""
    from parscale.model import decode_layer, decode_stack

    counters = []
    real = decode_stack.step

    def served(*args):
        out = real(*args)
        if out is not None:
            for counter in counters:
                counter[0] += 1
        return out

    monkeypatch.setattr(decode_stack, "step", served)

    def wrap(name: str) -> list[int]:
        counters.append(count_calls(decode_layer, name))
        return counters[-1]

    return wrap


# The vLLM tests need the `serve` extra; `make test` runs them in a second environment that
# has it (see the Makefile), so the main run neither collects nor silently skips them.
import importlib.util  # noqa: E402

collect_ignore = [] if importlib.util.find_spec("vllm") else ["serve"]


@pytest.fixture(autouse=True, scope="session")
def _private_cache_home(tmp_path_factory):
    """Runs that use the default cache (~/.cache/parscale) write to a temporary one instead,
    shared by this session's tests (and the subprocesses they start)."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
