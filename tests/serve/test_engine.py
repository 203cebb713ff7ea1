"""vLLM with the parscale plugin gives the tokens and log-probabilities of `ParScaleForCausalLM`."""
from __future__ import annotations

import random

import pytest
from conftest import ENGINE_ARGS, MAX_MODEL_LEN, N_PREFIX, reference_generate, shutdown
from vllm import LLM, SamplingParams

from parscale import ParScaleForCausalLM

pytestmark = pytest.mark.slow

N_NEW = 8
GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0.0, logprobs=0, ignore_eos=True)


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(128) for _ in range(length)]


# One engine at a time (module scope, parametrised): P = 1 and 2 with prefix caching, P = 4 without.
@pytest.fixture(scope="module", params=[(1, True), (2, True), (4, False)], ids=["P1-cache", "P2-cache", "P4-nocache"])
def engine(request, checkpoints):
    n_streams, caching = request.param
    llm = LLM(model=str(checkpoints[n_streams]), enable_prefix_caching=caching, **ENGINE_ARGS)
    reference = ParScaleForCausalLM.from_pretrained(checkpoints[n_streams]).eval()
    yield n_streams, caching, llm, reference
    shutdown(llm)


def _run(llm, prompts: list[list[int]], params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def test_greedy_tokens_and_logprobs_equal_transformers(engine):
    n_streams, _, llm, reference = engine
    prompts = [_prompt(n, seed=n) for n in (1, 5, 17, 60, 150)]
    for prompt, out in zip(prompts, _run(llm, prompts)):
        tokens, logprobs = reference_generate(reference, prompt, N_NEW)
        got = list(out.outputs[0].token_ids)
        assert got == tokens, (n_streams, len(prompt))
        got_logprobs = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, got)]
        assert max(abs(a - b) for a, b in zip(got_logprobs, logprobs)) < 1e-3  # float32 kernels vs float32 torch


def test_32_concurrent_requests_equal_each_request_alone(engine):
    n_streams, caching, llm, _ = engine
    prompts = [_prompt(1 + (7 * i) % 90, seed=100 + i) for i in range(32)]
    together = [list(o.outputs[0].token_ids) for o in _run(llm, prompts)]
    alone = [list(_run(llm, [p])[0].outputs[0].token_ids) for p in prompts]
    assert together == alone
    if caching and n_streams > 1:  # the slot tokens' first full block is shared by every request
        assert _run(llm, [prompts[0]])[0].num_cached_tokens >= 32


def test_prompt_longer_than_the_usable_context_is_refused(engine):
    n_streams, _, llm, _ = engine
    usable = MAX_MODEL_LEN - (N_PREFIX if n_streams > 1 else 0)
    with pytest.raises(Exception) as err:
        _run(llm, [_prompt(usable, seed=3)])
    if n_streams > 1:
        assert "usable context" in str(err.value) and str(usable) in str(err.value)
    longest = _run(llm, [_prompt(usable - 1, seed=3)], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    assert len(longest[0].outputs[0].token_ids) == 1
