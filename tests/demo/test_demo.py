"""`parscale demo` end to end, at the smallest size that still runs every stage.

One module-scoped demo (a handful of stdlib modules as the corpus, a few steps per run)
is checked against what it is built from: each run's own metrics.jsonl, an independent
held-out evaluation of a final model, the saved safetensors files, and a second call
that must reuse every run.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parscale.data.corpus import stdlib_root
from parscale.data.prepare import DataConfig, evaluate_loss, prepare_split
from parscale.demo.study import PRETRAIN, STAGE2, DemoConfig, run_demo, train_configs
from parscale.errors import UserError
from parscale.model.wrapper import ParScaleForCausalLM
from parscale.train.logs import read_metrics

TRAIN_MODULES = ["textwrap.py", "heapq.py", "bisect.py", "string.py", "shlex.py", "fnmatch.py", "glob.py"]
VAL_MODULES = ["calendar.py", "quopri.py"]
RUNS = [PRETRAIN] + [s.name for s in STAGE2]
# One demo is built per module and shared: keep these tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("demo")


def small_config(out: Path, **fields) -> DemoConfig:
    lib = stdlib_root()
    data = DataConfig(source="files", files=tuple(str(lib / m) for m in TRAIN_MODULES),
                      val_files=tuple(str(lib / m) for m in VAL_MODULES), vocab_size=320, val_tokens=4096)
    base = dict(pretrain_steps=6, post_steps=2, pretrain_evals=2, post_evals=1, eval_tokens=512,
                new_tokens=6, measure_cost=False, data=data)
    return DemoConfig(out=str(out), **{**base, **fields})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what `parscale demo` uses: faster for this model on a shared CPU
    cfg = small_config(tmp_path_factory.mktemp("demo") / "out")
    yield cfg, run_demo(cfg)
    torch.set_num_threads(threads)


def _stamp(cfg: DemoConfig) -> dict[str, tuple[bytes, int]]:
    files = {}
    for name in RUNS:
        for rel in ("metrics.jsonl", "final/model.safetensors"):
            path = cfg.out_dir / "runs" / name / rel
            files[f"{name}/{rel}"] = (path.read_bytes(), path.stat().st_mtime_ns)
    return files


@pytest.mark.slow
def test_outputs_exist(demo):
    cfg, _ = demo
    for name in ("report.md", "summary.json", "losses.png", "law_fit.png", "cost_compare.png", "demo.json"):
        assert (cfg.out_dir / name).stat().st_size > 0, name


@pytest.mark.slow
def test_report_numbers_come_from_the_runs_metrics(demo):
    cfg, _ = demo
    summary = json.loads((cfg.out_dir / "summary.json").read_text())
    report = (cfg.out_dir / "report.md").read_text()
    for name, tc in train_configs(cfg).items():
        records = read_metrics(tc.run_dir / "metrics.jsonl")
        last_val = [r["val_loss"] for r in records if r["step"] == tc.steps and "val_loss" in r]
        run = summary["runs"][name]
        assert run["final_val_loss"] == last_val[-1]
        assert f"**{last_val[-1]:.4f}**" in report
        assert run["tokens"] == tc.steps * tc.batch_size * tc.seq_len
        step0 = [r for r in records if r["step"] == 0]
        if name == PRETRAIN:
            assert not step0 and run["step0_val_loss"] is None
        else:  # the converted model before any update, and the stage-1 model it came from
            assert run["step0_val_loss"] == step0[0]["val_loss"]
            assert run["base_val_loss"] == pytest.approx(summary["runs"][PRETRAIN]["final_val_loss"], abs=1e-6)
            assert abs(run["step0_val_loss"] / run["base_val_loss"] - 1) < 0.02  # the required 2% bound
    control = summary["runs"]["p1-control"]["final_val_loss"]
    gap = summary["runs"]["p2-streams"]["final_val_loss"] - control
    assert f"{gap:+.4f}" in report


@pytest.mark.slow
def test_final_loss_matches_an_independent_evaluation(demo, tmp_path):
    """Re-tokenise validation into a fresh cache with the saved tokenizer, evaluate the saved model."""
    cfg, summary = demo
    final = cfg.out_dir / "runs" / "p2-streams" / "final"
    data = DataConfig(source="files", files=cfg.data.files, val_files=cfg.data.val_files, vocab_size=320,
                      val_tokens=cfg.data.val_tokens, tokenizer=str(final))
    val, _, _, _ = prepare_split(data, tmp_path / "cache", "val")
    model = ParScaleForCausalLM.from_pretrained(final).eval()
    loss = evaluate_loss(model, val, seq_len=128, batch_size=8, max_tokens=cfg.eval_tokens)
    assert loss == pytest.approx(summary["runs"]["p2-streams"]["final_val_loss"], abs=1e-5)


@pytest.mark.slow
def test_stream_models_share_the_stage1_backbone_bit_for_bit(demo):
    cfg, summary = demo

    def tensors(name: str) -> dict[str, torch.Tensor]:
        return load_file(str(cfg.out_dir / "runs" / name / "final" / "model.safetensors"))

    def is_stream(key: str) -> bool:
        return "prefix_" in key or "aggregate_layer" in key

    ref = tensors(PRETRAIN)
    for name in ("p2-streams", "p4-streams"):
        got = tensors(name)
        assert {k for k in got if not is_stream(k)} == set(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
        assert any(is_stream(k) for k in got)
    full = tensors("p2-full")  # the contrast: training every weight moves the backbone
    assert not all(torch.equal(full[k], ref[k]) for k in ref)
    assert summary["backbone"]["streams_share_backbone"]
    assert not summary["backbone"]["runs"]["p2-full"]["identical"]


@pytest.mark.slow
def test_generations_are_greedy_and_reproducible(demo):
    cfg, summary = demo
    from parscale.data.tokenizer import load_tokenizer

    final = cfg.out_dir / "runs" / "p4-streams" / "final"
    tok = load_tokenizer(final)
    model = ParScaleForCausalLM.from_pretrained(final).eval()
    ids = tok(cfg.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # greedy by hand: the argmax of the last logits, one token at a time
        for _ in range(cfg.new_tokens):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) == tok.eos_token_id:
                break
    n = len(tok(cfg.prompt, add_special_tokens=False)["input_ids"])
    expected = tok.decode(ids[0, n:], skip_special_tokens=True)
    assert summary["runs"]["p4-streams"]["completion"] == expected


@pytest.mark.slow
def test_law_and_cost_sections(demo):
    _, summary = demo
    law = summary["law"]
    assert law["converged"] and law["r2"] > 0.99
    for p, m in law["multipliers"].items():
        assert m == pytest.approx(law["k"] * math.log(int(p)) + 1)
    p8 = [r for r in summary["cost"]["rows"] if r["P"] == 8 and r["batch_size"] == 1][0]
    # The paper (Figure 4, 1.6B, batch 1): about 22x less memory increase, 6x less latency increase.
    assert 15 < p8["memory_ratio"] < 35 and 4 < p8["latency_ratio"] < 9


@pytest.mark.slow
def test_second_call_reuses_every_run(demo):
    cfg, _ = demo
    before = _stamp(cfg)
    again = run_demo(cfg)
    assert _stamp(cfg) == before
    assert {r["action"] for r in again["runs"].values()} == {"reused"}


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(demo):
    cfg, summary = demo
    run = cfg.out_dir / "runs" / "p2-full"
    metrics = (run / "metrics.jsonl").read_bytes()
    shutil.rmtree(run / "final")  # as if killed after the last checkpoint, before the final model
    again = run_demo(cfg)
    assert again["runs"]["p2-full"]["action"] == "resumed"
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert again["runs"]["p2-full"]["final_val_loss"] == summary["runs"]["p2-full"]["final_val_loss"]


@pytest.mark.slow
def test_changed_settings_in_the_same_out_are_refused(demo):
    cfg, _ = demo
    with pytest.raises(UserError, match="other settings.*post_steps"):
        run_demo(small_config(cfg.out_dir, post_steps=3))


def test_config_validation():
    with pytest.raises(UserError, match="--scale"):
        DemoConfig.preset("x", scale=0)
    quick = DemoConfig.preset("x", quick=True, scale=2)
    assert (quick.pretrain_steps, quick.post_steps) == (120, 40)
    assert DemoConfig.preset("x", scale=0.001).post_steps == 1


def test_cli_reports_a_bad_scale_without_traceback(capsys):
    from parscale.cli.main import main

    assert main(["demo", "--scale", "-1", "--out", "unused"]) == 2
    assert "--scale" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_demo_resumes_to_the_same_numbers(demo, tmp_path):
    """SIGKILL the demo mid-update in stage 1 (after a checkpoint), rerun it: the losses and the
    final weights equal the uninterrupted demo's."""
    import os
    import subprocess
    import sys

    cfg, _ = demo
    out = tmp_path / "killed"
    script = ("import sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]); "
              "from test_demo import small_config; from parscale.demo.study import run_demo; "
              "run_demo(small_config(sys.argv[2]))")
    env = {**os.environ, "PARSCALE_KILL_DURING_STEP": "5"}  # stage 1 checkpoints at step 3
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(out)], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (out / "runs" / PRETRAIN / "final").exists()
    again = run_demo(small_config(out))
    assert again["runs"][PRETRAIN]["action"] == "resumed"

    def losses(root: Path, name: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"}
                for r in read_metrics(root / "runs" / name / "metrics.jsonl")]

    for name in RUNS:
        assert losses(out, name) == losses(cfg.out_dir, name), name
    a = load_file(str(out / "runs" / "p2-full" / "final" / "model.safetensors"))
    b = load_file(str(cfg.out_dir / "runs" / "p2-full" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
