"""The prefix slots on vLLM's requests, prepended on the way in.

vLLM has no public hook that lets a model lengthen its prompts (its placeholder expansion runs
for multimodal inputs only), so `wrap_process_inputs` wraps `InputProcessor.process_inputs`:
the prompts of a P > 1 model get T slot tokens in front, and a prompt that leaves no room in
the usable context is refused.
"""
from __future__ import annotations

import functools

from parscale.errors import UserError
from parscale.model.format import RELEASED_ARCHITECTURE
from parscale.serve import prompts


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


def wrap_process_inputs(original):
    """`InputProcessor.process_inputs` that prepends the slots."""

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        n_slots = prompts.n_prefix_slots(self.model_config.hf_config)
        if not n_slots or RELEASED_ARCHITECTURE not in (self.model_config.architectures or []):
            return original(self, request_id, prompt, params, *args, **kwargs)
        if not (isinstance(prompt, dict) and "type" in prompt):  # a raw prompt: render it first
            from vllm.renderers.inputs.preprocess import parse_model_prompt

            parsed = parse_model_prompt(self.model_config, prompt)
            (prompt,) = self.renderer.render_cmpl([parsed], self.renderer.default_cmpl_tok_params)
        return original(self, request_id, _extended(prompt, n_slots, self.model_config.max_model_len),
                        params, *args, **kwargs)

    process_inputs._parscale_slots = True
    return process_inputs

