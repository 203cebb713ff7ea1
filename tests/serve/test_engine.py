"""vLLM with the parscale plugin gives the tokens and log-probabilities of `ParScaleForCausalLM`."""
from __future__ import annotations

import random

import pytest
from conftest import ENGINE_ARGS, MAX_MODEL_LEN, N_PREFIX, reference_generate, reference_prompt_logprobs, shutdown
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


def test_prompt_ids_and_prompt_logprobs_are_the_users(engine):
    """The slots stay inside: the output's prompt is the user's, each of its tokens scored as transformers does."""
    n_streams, _, llm, reference = engine
    prompt = _prompt(40, seed=11)
    (out,) = _run(llm, [prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, ignore_eos=True))
    assert list(out.prompt_token_ids) == prompt
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    got = [step[t].logprob for step, t in zip(out.prompt_logprobs[1:], prompt[1:])]
    assert max(abs(a - b) for a, b in zip(got, reference_prompt_logprobs(reference, prompt))) < 1e-3



def test_requests_whose_positions_the_slots_would_shift_are_refused(engine):
    n_streams, _, llm, _ = engine
    if n_streams == 1:
        return
    prompt = _prompt(40, seed=11)
    with pytest.raises(Exception, match="prompt_logprob_token_ids is not supported"):  # rows would count the slots
        _run(llm, [prompt], SamplingParams(max_tokens=1, prompt_logprob_token_ids=[[1]] * (len(prompt) - 1)))
    with pytest.raises(Exception, match="streaming inputs are not supported"):  # as AsyncLLM sends each chunk
        llm.llm_engine.input_processor.process_inputs(request_id="chunk", prompt={"prompt_token_ids": prompt},
                                                      params=SamplingParams(max_tokens=1),
                                                      supported_tasks=("generate",), resumable=True)


def test_cached_tokens_count_the_users_prompt_only(engine):
    n_streams, caching, llm, _ = engine
    prompt = _prompt(100, seed=12)
    _run(llm, [prompt])
    (again,) = _run(llm, [prompt])
    slots = N_PREFIX if n_streams > 1 else 0
    # vLLM reuses the whole 32-token blocks of the slotted prompt but its last token, slots first
    # (so the blocks of slots are shared), and the slots are not the user's tokens.
    assert again.num_cached_tokens == (((slots + len(prompt) - 1) // 32) * 32 - slots if caching else 0)


def test_prompt_longer_than_the_usable_context_is_refused(engine):
    n_streams, _, llm, _ = engine
    usable = MAX_MODEL_LEN - (N_PREFIX if n_streams > 1 else 0)
    with pytest.raises(Exception) as err:
        _run(llm, [_prompt(usable, seed=3)])
    if n_streams > 1:
        assert "usable context" in str(err.value) and str(usable) in str(err.value)
    longest = _run(llm, [_prompt(usable - 1, seed=3)], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    assert len(longest[0].outputs[0].token_ids) == 1
