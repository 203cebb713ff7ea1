"""Register `qwen2_parscale` with transformers' Auto classes on `import parscale`, lazily.

`import parscale` must stay cheap (`parscale fit` and `parscale cost` never import torch),
but registering a config class imports transformers' config machinery, which imports torch.
So the registration waits for transformers: if its Auto modules are already imported we
register at once; otherwise, once `transformers.models.auto.configuration_auto` (AutoConfig)
or `...modeling_auto` (AutoModelForCausalLM) has been imported, we register as soon as the
outermost transformers import in progress has finished (registering in the middle of it would
re-enter half-initialised transformers modules), and so has any import of `parscale.model`'s
own modules (the registration imports `auto` and the wrapper). Python has no public post-import
hook, so a meta-path finder wraps the loader of those modules to learn when each finished
executing; it finds nothing itself, and it removes itself once both registrations are done.
This module is the top of the folder: it imports `auto` and the wrapper (inside `flush`, so
that `import parscale` stays free of torch), and neither imports it.
"""
from __future__ import annotations

import importlib.abc
import sys

CONFIG_MODULE = "transformers.models.auto.configuration_auto"
MODEL_MODULE = "transformers.models.auto.modeling_auto"
_WAIT_FOR = ("transformers", "parscale.model")
_state = {"config": False, "model": False, "busy": False}


def _initializing(module) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def flush(just_run: str | None = None) -> None:
    """Register what transformers has imported, unless one of its imports is still running."""
    wanted = {"config": CONFIG_MODULE in sys.modules, "model": MODEL_MODULE in sys.modules}
    if _state["busy"] or not any(wanted[k] and not _state[k] for k in wanted):
        return
    if any(name.startswith(_WAIT_FOR) and name != just_run and _initializing(module)
           for name, module in list(sys.modules.items())):
        return  # the end of that import calls us again (see `_AfterImport`)
    _state["busy"] = True
    try:
        from parscale.model import auto

        if wanted["model"]:
            from parscale.model.wrapper import Qwen2ParScaleForCausalLM

            auto.register_model(Qwen2ParScaleForCausalLM)  # registers the config too
            _state["config"] = _state["model"] = True
        else:
            auto.register_config()
            _state["config"] = True
    finally:
        _state["busy"] = False
    flush(just_run)  # the registration itself may have imported modeling_auto
    if _state["config"] and _state["model"]:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; decorates the real loader of transformers' and `parscale.model`'s
    modules, so that `flush` runs when each has finished executing."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith(_WAIT_FOR):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module

                def exec_module(module, run=run, name=fullname):
                    run(module)
                    flush(just_run=name)

                spec.loader.exec_module = exec_module  # this module's own loader instance
            return spec
        return None


def install() -> None:
    """Register now if transformers' Auto modules are imported, else when they are."""
    flush()
    if not (_state["config"] and _state["model"]) and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
