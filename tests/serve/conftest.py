"""Tiny qwen2_parscale checkpoints and vLLM engines for the serving tests.

vLLM's CPU attention needs head_dim 32 and block sizes that are multiples of 32, so the tiny
model has hidden size 64 over 2 heads; float32 and eager mode keep it exact and quick to
start. Engine start-ups dominate the time, so engines are module-scoped and one at a time.
"""
from __future__ import annotations

import gc
import os

# Before vLLM is imported: the engine runs in this process (no process spawns, errors arrive
# here), and torch.compile stays off (vLLM's sampler would otherwise compile for a minute).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from parscale import ParScaleConfig, ParScaleForCausalLM, to_parscale  # noqa: E402

MAX_MODEL_LEN = 256
N_PREFIX = 48  # the released prefix length; with block size 32 the first block of slots is shared
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, skip_tokenizer_init=True, gpu_memory_utilization=0.1,
                   max_model_len=MAX_MODEL_LEN, block_size=32, seed=0, max_num_seqs=32,
                   distributed_executor_backend="uni")


def save_tiny(directory, n_streams: int, seed: int = 0) -> None:
    """A random Qwen2 backbone with P streams; prefixes and aggregation drawn large enough to matter."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_MODEL_LEN,
                         eos_token_id=None, bos_token_id=None, tie_word_embeddings=n_streams != 2)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = to_parscale(base, ParScaleConfig(n_streams=n_streams, n_prefix_tokens=N_PREFIX, attn_smooth=0.1), seed=1)
    with torch.no_grad():  # trained-looking stream parameters: prefixes and weights far from uniform
        generator = torch.Generator().manual_seed(seed + 7)
        for _, param in model.stream_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parscale_serve")
    found = {}
    for n_streams in (1, 2, 4):
        save_tiny(root / f"p{n_streams}", n_streams)
        found[n_streams] = root / f"p{n_streams}"
    return found


def reference_generate(model: ParScaleForCausalLM, prompt: list[int], n_new: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of our transformers implementation and their log-probabilities (float64)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def reference_prompt_logprobs(model: ParScaleForCausalLM, prompt: list[int]) -> list[float]:
    """log p(prompt[i] | prompt[:i]) for i >= 1 from one full forward of our implementation (float64)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].double()  # L V
    logprobs = torch.log_softmax(logits, -1)
    return [logprobs[i - 1, prompt[i]].item() for i in range(1, len(prompt))]


def save_char_tokenizer(directory) -> None:
    """One token per ASCII character (id = code point, the tiny vocabulary's 128 ids), made here, no download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({chr(i): i for i in range(128)}, unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="?").save_pretrained(directory)


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()
