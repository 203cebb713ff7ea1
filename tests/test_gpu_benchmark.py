"""`benchmarks/gpu.py --dry-run`: the prepared GPU run, shrunk onto the CPU, so that the script
a run on a GPU executes once has already run on the CPU. Its FLOPs count is checked against the model."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from parscale import machine

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_training_flops_count_every_matmul_weight_of_the_model():
    """6 x (the Linear weights of the layers + the lm_head product) per token, counted from a
    built model, plus causal attention 6 x layers x L x hidden."""
    gpu = _script()
    model = gpu.build_base(gpu.TINY, torch.float32, torch.device("cpu"))
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # lm_head included
    length = 128
    attention = 6 * gpu.TINY["num_hidden_layers"] * length * gpu.TINY["hidden_size"]
    assert gpu.train_flops_per_token(gpu.TINY, length) == 6 * weights + attention


def test_the_device_block_names_the_cpu_and_no_gpu_on_the_cpu():
    info = _script().device_info(torch.device("cpu"))
    assert info["gpu"] is None and info["cpu"] == {**machine.cpu_info(), "load_average": info["cpu"]["load_average"]}
    assert info["host_cpu"] == info["cpu"]["name"] and info["torch"] == torch.__version__


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    gpu = _script()
    assert gpu.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "400"]) == 0
    tests = json.loads((tmp_path / "gpu_tests_dry.json").read_text())
    assert tests["exit_code"] in (0, 5), tests["output_tail"]  # collected (5: none selected without a GPU)
    train = json.loads((tmp_path / "gpu_train_dry.json").read_text())
    rows = [r for r in train["rows"] if "step_s" in r]
    assert {(r["kind"], r["P"], r["L"]) for r in rows} == {(k, p, n) for k in ("plain", "parscale")
                                                           for p in (1, 2) for n in (64, 128)}
    for r in rows:
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] * r["L"] / r["step_s"])
        assert r["batch"] == (r["P"] if r["kind"] == "plain" else 1)  # P streams at B against plain at P*B
        assert (r["kind"] == "parscale") == ("x_plain_time" in r)
    decode = json.loads((tmp_path / "gpu_decode_dry.json").read_text())
    done = [r for r in decode["rows"] if "ms_per_token" in r]
    assert {(r["model"], r["batch"], r["compiled"]) for r in done} == {(m, b, False) for m in ("plain", "P1", "P2")
                                                                        for b in (1, 2)}
    for r in done:
        assert r["x_floor"] == pytest.approx(r["ms_per_token"] / (r["step_bytes"] / decode["bandwidth_bytes_per_s"] * 1e3))
    assert train["device"]["gpu"] is None and train["device"]["host_cpu"] == machine.cpu_info()["name"]
    for section in (tests, train, decode):  # every file names the machine it ran on
        cpu = section["device"]["cpu"]
        assert cpu["name"] == machine.cpu_info()["name"] and cpu["cores"] == os.cpu_count()
        assert section["device"]["torch"] == torch.__version__
