"""Our models in lm-evaluation-harness, registered in its model registry as `parscale`.

    parscale lm-eval --model parscale --model_args pretrained=runs/tiny-p1/final,streams=runs/p4/final-streams \
        --tasks hellaswag --device cpu
    import parscale.evaluate.harness; lm_eval.simple_evaluate(model="parscale", model_args="pretrained=DIR", ...)

`ParScaleLM` is lm-eval's own `HFLM` (its batching, caching, `loglikelihood`,
`loglikelihood_rolling` and `generate_until`) given a model we load: the full model, or a
backbone with a stream adapter switched on (`streams=DIR`), so adapters are evaluated without
ever writing a merged model. lm-eval 0.4 has no plugin entry point for models, so the plain
`lm_eval` command cannot see the name; `parscale lm-eval` imports this module and then runs
lm-eval's own command line with the same arguments.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from parscale.errors import UserError

logger = logging.getLogger(__name__)


@register_model("parscale")
class ParScaleLM(HFLM):
    """An lm-eval model over `ParScaleForCausalLM.from_pretrained(pretrained)` (+ `streams`).

    Args:
        pretrained: a model directory (ours, a released checkpoint or a plain model).
        streams: an adapter directory (`parscale streams`), switched on after loading.
        tokenizer: a tokenizer directory (default: `pretrained`).
        dtype: "float32", "bfloat16", "float16" or "auto" (the checkpoint's).
        Every other keyword is HFLM's (batch_size, max_length, device, ...); its model-loading
        ones (parallelize, peft, delta, ...) do not apply to a model loaded here.
    """

    def __init__(self, pretrained: str, streams: str | None = None, tokenizer: str | None = None,
                 dtype: str = "auto", device: str = "cpu", **kwargs) -> None:
        from transformers import AutoTokenizer

        from parscale.model.wrapper import ParScaleForCausalLM

        if not isinstance(pretrained, str):
            raise UserError("pretrained= must be a model directory")
        model = ParScaleForCausalLM.from_pretrained(pretrained, dtype=dtype, device_map=device)
        if streams:
            model.set_streams(model.load_streams(streams))
        tok = AutoTokenizer.from_pretrained(tokenizer or pretrained, local_files_only=True)
        logger.info("lm-eval model: %s, P=%d (%s)", pretrained, model.parscale_config.n_streams,
                    model.active_streams or "base")
        # HFLM is given the directory, not the model: handed a loaded model it warns twice on
        # every run; given a name it loads through `_get_config` and `_create_model`, the
        # methods it asks subclasses to override, and ours below hand over this model. The
        # name is made absolute because HFLM looks names up on the Hugging Face Hub for its
        # results record (`get_model_info`), and an absolute path is never a Hub name.
        self._loaded = model
        super().__init__(pretrained=str(Path(pretrained).resolve()), tokenizer=tok, device=device,
                         backend="causal", **kwargs)

    def _get_config(self, pretrained: str, **kwargs) -> None:
        """HFLM's hook for reading the config: the config of the model loaded in `__init__`."""
        self._config = self._loaded.config

    def _create_model(self, pretrained: str, **kwargs) -> None:
        """HFLM's hook for loading the model: the model loaded in `__init__` (with `streams`)."""
        self._model = self._loaded


def main(argv: list[str]) -> int:
    """`parscale lm-eval ARGS`: lm-eval's command line, with the `parscale` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0
