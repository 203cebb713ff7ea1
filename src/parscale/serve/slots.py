"""The prefix slots on vLLM's requests: prepended on the way in, left out of what is reported.

vLLM has no public hook that lets a model lengthen its prompts (its placeholder expansion runs
for multimodal inputs only), so `wrap_process_inputs` wraps `InputProcessor.process_inputs`:
the prompts of a P > 1 model get T slot tokens in front, and a prompt that leaves no room in
the usable context is refused. The engine's request then carries T in its sampling
parameters' `extra_args`, the field vLLM keeps for plugins, which reaches the per-request
output state (`RequestState`, in the process that answers the user, once per request and per
sample of n > 1). There `wrap_make_request_output` takes the slots out of every
`RequestOutput`: `prompt_token_ids`, `prompt_logprobs` and `num_cached_tokens` describe the
user's prompt only, and so do the usage, the prompt log-probabilities and the echo of vLLM's
OpenAI server, which are read from them.
"""
from __future__ import annotations

import functools

from parscale.errors import UserError
from parscale.model.format import RELEASED_ARCHITECTURE
from parscale.serve import prompts

SLOTS_KEY = "parscale_prefix_slots"  # in SamplingParams.extra_args: the slots the request starts with


def _extended(prompt, n_slots: int, max_model_len: int):
    """The engine input with the slots prepended, or a `VLLMValidationError` vLLM reports as such."""
    from vllm.exceptions import VLLMValidationError

    if not isinstance(prompt, dict) or prompt.get("type") != "token" or "encoder_prompt" in prompt:
        raise VLLMValidationError("a ParScale model takes text or token-id prompts only (no embeddings, "
                                  "no multimodal or encoder-decoder inputs)", parameter="prompt")
    try:
        ids = prompts.extend_prompt(list(prompt["prompt_token_ids"]), n_slots, max_model_len)
    except UserError as err:
        raise VLLMValidationError(str(err), parameter="prompt") from err
    return {**prompt, "prompt_token_ids": ids}


def _refuse_unsupported(params, kwargs) -> None:
    """Requests whose prompt positions the slots would shift: fixed-id prompt scores, streamed inputs."""
    from vllm.exceptions import VLLMValidationError

    if getattr(params, "prompt_logprob_token_ids", None) is not None:  # rows per prompt position
        raise VLLMValidationError("prompt_logprob_token_ids is not supported by ParScale models; "
                                  "ask for prompt_logprobs instead", parameter="prompt_logprob_token_ids")
    if kwargs.get("resumable"):  # every chunk of a streamed input would get the slots again
        raise VLLMValidationError("streaming inputs are not supported by ParScale models; send the whole "
                                  "prompt", parameter="resumable")


def wrap_process_inputs(original):
    """`InputProcessor.process_inputs` that prepends the slots and marks the request with T."""

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        n_slots = prompts.n_prefix_slots(self.model_config.hf_config)
        if not n_slots or RELEASED_ARCHITECTURE not in (self.model_config.architectures or []):
            return original(self, request_id, prompt, params, *args, **kwargs)
        _refuse_unsupported(params, kwargs)
        if not (isinstance(prompt, dict) and "type" in prompt):  # a raw prompt: render it first
            from vllm.renderers.inputs.preprocess import parse_model_prompt

            parsed = parse_model_prompt(self.model_config, prompt)
            (prompt,) = self.renderer.render_cmpl([parsed], self.renderer.default_cmpl_tok_params)
        request = original(self, request_id, _extended(prompt, n_slots, self.model_config.max_model_len),
                           params, *args, **kwargs)
        if request.sampling_params is not None:  # the request's own copy: the caller's params stay as given
            request.sampling_params.extra_args = {**(request.sampling_params.extra_args or {}), SLOTS_KEY: n_slots}
        return request

    process_inputs._parscale_slots = True
    return process_inputs


def wrap_from_new_request(original):
    """`RequestState.from_new_request` (the function under the classmethod) that keeps T on the state."""

    @functools.wraps(original)
    def from_new_request(cls, tokenizer, request, *args, **kwargs):
        state = original(cls, tokenizer, request, *args, **kwargs)
        params = request.sampling_params
        state.parscale_slots = int(((params.extra_args if params is not None else None) or {}).get(SLOTS_KEY, 0))
        return state

    from_new_request._parscale_slots = True
    return classmethod(from_new_request)


def wrap_make_request_output(original):
    """`RequestState.make_request_output` whose outputs describe the user's prompt only."""

    @functools.wraps(original)
    def make_request_output(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        n_slots = getattr(self, "parscale_slots", 0)
        if n_slots and output is not None:
            hide_slots(output, n_slots)
        return output

    make_request_output._parscale_slots = True
    return make_request_output


def hide_slots(output, n_slots: int) -> None:
    """Drop the slots from an output's prompt ids, prompt log-probabilities and cached-token count."""
    output.prompt_token_ids = output.prompt_token_ids[n_slots:]
    if getattr(output, "num_cached_tokens", None):  # the slots come first, so they are cached first
        output.num_cached_tokens = max(0, output.num_cached_tokens - n_slots)
    logprobs = getattr(output, "prompt_logprobs", None)
    if logprobs:
        output.prompt_logprobs = _user_prompt_logprobs(logprobs, n_slots)


def _user_prompt_logprobs(logprobs, n_slots: int):
    """The entries of the user's tokens, the first one None as at the start of any prompt.

    Position 0 (the first slot) has no log-probability; positions 1..T score slots 2..T and
    the user's first token after the slots, which the released model never scores (it sees the
    prefixes, not tokens). vLLM hands all prompt log-probabilities out with the first output
    after prefill (its engine returns no partial prefills); later DELTA outputs carry none.
    """
    kept = logprobs[:1]  # the same container (a list or vLLM's FlatLogprobs) holding position 0
    for index in range(n_slots + 1, len(logprobs)):
        kept.append(logprobs[index])
    return kept
