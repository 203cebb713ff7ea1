"""Activation checkpointing, torch.compile and the AdamW choice: each changes how a training step
runs, never what it computes; checked against the eager step of the same model on the CPU."""
from __future__ import annotations

import pytest
import torch
from _trainkit import MICRO, cli_args, micro_setup, read_metrics, train_in_process
from safetensors.torch import load_file
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.utils import counters
from transformers import Qwen2Config

from parscale.cli.main import main as cli_main
from parscale.errors import UserError
from parscale.train import convert, speed


def micro(P: int = 2):
    fields = {k: v for k, v in MICRO.items() if k != "model_type"}
    return convert.model_from_scratch(Qwen2Config(**fields), P, 8, 0.01, seed=0).train()


def loss_and_grads(module: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor):
    """One training forward and backward through `module` (the model or a wrapper of it)."""
    model.zero_grad(set_to_none=True)
    loss = module(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol: float, atol: float) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=rtol, atol=atol, msg=name)


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, MICRO["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(seed))  # b s


def test_activation_checkpointing_recomputes_the_layers_and_keeps_loss_and_gradients():
    x = batch()
    eager = micro()
    want = loss_and_grads(eager, eager, x)
    model = micro()
    speed.checkpoint_activations(model)
    calls = [0]
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    got = loss_and_grads(model, model, x)
    # The attention of layer 0 ran twice: in the forward and again in the backward.
    assert calls[0] == 2
    # The same operations in the same order: equal to float rounding (seen: bit for bit).
    assert_same(want, got, rtol=1e-6, atol=1e-9)
    assert any(name.endswith("prefix_k") for name in got[1])  # the prefixes learn through the recompute


def test_activation_checkpointing_of_a_model_without_it_is_refused():
    with pytest.raises(UserError, match="--grad-checkpoint: Linear does not support"):
        speed.checkpoint_activations(torch.nn.Linear(2, 2))


def test_adamw_on_the_cpu_is_the_default_implementation_and_a_fused_state_is_set_back():
    model = torch.nn.Linear(3, 2)
    optimizer = speed.adamw([{"params": list(model.parameters())}], lr=0.1, betas=(0.9, 0.95))
    assert optimizer.param_groups[0]["fused"] is None and optimizer.param_groups[0]["foreach"] is None
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    # A state saved by a fused (CUDA) run: loading takes its flag, match_device puts back this device's.
    state = optimizer.state_dict()
    state["param_groups"][0]["fused"] = True
    other = speed.adamw([{"params": list(model.parameters())}], lr=0.1, betas=(0.9, 0.95))
    other.load_state_dict(state)
    assert other.param_groups[0]["fused"] is True
    speed.match_device(other)
    assert other.param_groups[0]["fused"] is None
    assert all(s["step"].device.type == "cpu" and float(s["step"]) == 1.0 for s in other.state.values())


@pytest.mark.slow  # compiling a forward and backward on two shared cores: a minute or more
def test_a_compiled_step_gives_the_eager_loss_and_gradients():
    torch._dynamo.reset()
    x = batch()
    eager = micro()
    want = loss_and_grads(eager, eager, x)
    model = micro()
    counters.clear()
    compiled = speed.compiled(model)
    assert isinstance(compiled, OptimizedModule)
    got = loss_and_grads(compiled, model, x)
    assert counters["stats"]["unique_graphs"] >= 1  # the step ran through a compiled graph
    # Inductor fuses and reorders float32 sums: ~1e-7 relative (seen: 2e-8 absolute on the gradients).
    assert_same(want, got, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_compiled_checkpointed_run_trains_as_the_eager_run_and_saves_the_usual_keys(tmp_path):
    torch._dynamo.reset()
    opts = micro_setup(tmp_path)
    opts.update(P=2, steps=2, eval_every=0, save_every=1)
    train_in_process(out=str(tmp_path / "eager"), **opts)
    counters.clear()
    train_in_process(out=str(tmp_path / "fast"), compile=True, grad_checkpoint=True, **opts)
    assert counters["stats"]["unique_graphs"] >= 1  # the training steps ran through a compiled graph
    eager, fast = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "fast")
    assert [r["step"] for r in fast] == [1, 2]
    for a, b in zip(eager, fast):  # float32 in another order: ~1e-7 relative per step
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5), a["step"]
    assert fast[0]["grad_norm"] == pytest.approx(eager[0]["grad_norm"], rel=1e-4)
    for name in ("ckpt-0000001/model/model.safetensors", "final/model.safetensors"):
        want, got = load_file(str(tmp_path / "eager" / name)), load_file(str(tmp_path / "fast" / name))
        assert got.keys() == want.keys()  # no `_orig_mod.` prefix
        assert not any("_orig_mod" in key for key in got)
    # the gradient of the first update, as Adam's first moment (1 - beta1) x g holds it
    want, got = (load_file(str(tmp_path / run / "ckpt-0000001" / "optimizer.safetensors")) for run in ("eager", "fast"))
    assert got.keys() == want.keys()
    for key in want:
        if key.endswith("/exp_avg"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-8, msg=key)


def test_a_failing_compiler_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """torch.compile fails at the first call (no C++ compiler, no triton): one line, no traceback."""
    torch._dynamo.reset()
    real = torch.compile

    def no_compiler(gm, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda module: real(module, backend=no_compiler))
    opts = micro_setup(tmp_path)
    opts.update(P=2, steps=1, eval_every=0, save_every=0, compile=True)
    assert cli_main(["train", *cli_args(opts), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--compile: torch.compile failed" in err and "no working C++ compiler found" in err, err
    assert "train without --compile" in err
    assert "Traceback" not in err
    torch._dynamo.reset()
