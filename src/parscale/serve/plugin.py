"""The `vllm.general_plugins` entry point: `register()` runs in every vLLM process.

Three things, each idempotent (vLLM may load plugins several times per process):
1. transformers learns the `qwen2_parscale` config (a `Qwen2Config` with the `parscale_*`
   fields), so vLLM reads a checkpoint's config.json without remote code;
2. vLLM's `ModelRegistry` maps `Qwen2ParScaleForCausalLM` to our model (and our name for
   ParScale checkpoints of other backbones to a class that refuses them clearly);
3. vLLM's input processor prepends the T prefix slots to every prompt of a P > 1 model and
   refuses prompts that leave no room in the usable context. vLLM has no public hook that
   lets a model lengthen its prompts (its placeholder expansion runs for multimodal inputs
   only), so this wraps `InputProcessor.process_inputs`; `parscale[serve]` pins the vLLM
   release this was written against, and `register()` refuses any other.
"""
from __future__ import annotations

import functools
import logging

from transformers import AutoConfig, Qwen2Config

from parscale.errors import UserError
from parscale.model.format import RELEASED_ARCHITECTURE, RELEASED_MODEL_TYPE
from parscale.serve import prompts

logger = logging.getLogger(__name__)
SUPPORTED_VLLM = ("0.32.",)  # the releases whose input processor `_wrap_process_inputs` fits
OTHER_BACKBONE_ARCHITECTURE = "ParScaleForCausalLM"  # what save_pretrained writes for non-Qwen2 backbones


class Qwen2ParScaleConfig(Qwen2Config):
    """`qwen2_parscale`: Qwen2 plus parscale_n, parscale_n_tokens, parscale_attn_smooth (kept as attributes)."""

    model_type = RELEASED_MODEL_TYPE


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


def _wrap_process_inputs(original):
    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, *args, **kwargs):
        n_slots = prompts.n_prefix_slots(self.model_config.hf_config)
        if n_slots and RELEASED_ARCHITECTURE in (self.model_config.architectures or []):
            if not (isinstance(prompt, dict) and "type" in prompt):  # a raw prompt: render it first
                from vllm.renderers.inputs.preprocess import parse_model_prompt

                parsed = parse_model_prompt(self.model_config, prompt)
                (prompt,) = self.renderer.render_cmpl([parsed], self.renderer.default_cmpl_tok_params)
            prompt = _extended(prompt, n_slots, self.model_config.max_model_len)
        return original(self, request_id, prompt, *args, **kwargs)

    process_inputs._parscale_slots = True
    return process_inputs


def register() -> None:
    """Register the config, the model classes and the prompt slots with transformers and vLLM."""
    import vllm
    from vllm import ModelRegistry
    from vllm.v1.engine.input_processor import InputProcessor

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise UserError(f"parscale's vLLM plugin supports vLLM {SUPPORTED_VLLM[0]}x, found {vllm.__version__}; "
                        'install it with pip install "parscale[serve]"')
    AutoConfig.register(RELEASED_MODEL_TYPE, Qwen2ParScaleConfig, exist_ok=True)
    ModelRegistry.register_model(RELEASED_ARCHITECTURE, "parscale.serve.model:ParScaleQwen2ForCausalLM")
    ModelRegistry.register_model(OTHER_BACKBONE_ARCHITECTURE, "parscale.serve.model:UnservableParScaleForCausalLM")
    if not getattr(InputProcessor.process_inputs, "_parscale_slots", False):
        InputProcessor.process_inputs = _wrap_process_inputs(InputProcessor.process_inputs)
