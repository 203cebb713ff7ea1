"""`parscale demo --budget smoke` end to end, checked against what it is built from.

One smoke demo (a handful of stdlib modules, a few steps per run, two runs at a time) is run
as a subprocess through the CLI, stopped once with a real Ctrl-C (SIGINT) and rerun to the end,
then checked against each run's own metrics.jsonl, the saved safetensors files, and an
independent rebuild of the initial backbone.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parscale.demo.plan import DemoConfig, plan, train_config
from parscale.errors import UserError
from parscale.train.logs import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"
FROM_SCRATCH_TINY = ("p1", "p2", "p4", "p1-prefix")  # one seed: one initial backbone
pytestmark = pytest.mark.xdist_group("demo")


SMOKE_FLAGS = ["--budget", "smoke"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The smoke demo, stopped by one real SIGINT once the longest run (p4) has logged an update:
    (OUT, the finished process, the checkpoints each run kept). The `smoke` fixture then reruns it."""
    import signal
    import time

    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.Popen([sys.executable, "-m", "parscale", "demo", *SMOKE_FLAGS, "--out", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "runs" / "p4" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 900  # a hang guard
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        proc.kill()
    kept = {run.name: sorted(c.name for c in run.glob("ckpt-*")) for run in (out / "runs").iterdir()}
    return out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), kept


@pytest.fixture(scope="module")
def smoke(interrupted):
    out = interrupted[0]
    proc = subprocess.run([sys.executable, "-m", "parscale", "demo", *SMOKE_FLAGS, "--out", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=1800)  # a hang guard; minutes only under heavy load
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return out, summary, DemoConfig.preset(str(out), budget="smoke"), proc.stdout


def _runs(summary):
    return {r["name"]: r for r in summary["runs"]}


@pytest.mark.slow
def test_every_artifact_is_written_and_well_formed(smoke):
    out, summary, cfg, stdout = smoke
    for name in ("curves.png", "loss_vs_p.png", "loss_vs_latency.png", "loss_vs_flops.png", "law_fit.png",
                 "cost_compare.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"({name})" in (out / "report.md").read_text(), name  # linked from the report
    assert json.loads((out / "demo.json").read_text())["budget"] == "smoke"
    names = [r["name"] for r in summary["runs"]]
    assert names == [s.name for s in plan(cfg)]
    assert any("prefix" in n for n in names) and any("wide" in n for n in names)
    for r in summary["runs"]:
        for key, kind in (("name", str), ("P", int), ("val_loss", float), ("train_seconds", float),
                          ("decode_ms_per_token", float), ("decode_ms_per_token_bf16", float)):
            assert isinstance(r[key], kind), (r["name"], key)
        assert r["decode_ms_per_token"] > 0 and r["train_seconds"] > 0 and r["train_flops"] > 0
    assert "paper's data" in (out / "report.md").read_text()
    for r in summary["runs"]:  # the stream diagnostics: for every P > 1 run, none for one stream
        if r["P"] > 1:
            s = r["streams"]
            assert -1 <= s["stream_cosine"] <= 1 and 1 / r["P"] <= s["top_weight"] <= 1, r["name"]
            assert 0 <= s["weight_entropy"] <= 1, r["name"]
        else:
            assert r["streams"] is None, r["name"]
    assert "| stream cos | top weight | weight entropy |" in (out / "report.md").read_text()
    assert "| p1-prefix |" in stdout  # the table is printed too


@pytest.mark.slow
def test_report_numbers_equal_the_runs_own_metrics(smoke):
    out, summary, cfg, _ = smoke
    report = (out / "report.md").read_text()
    by = _runs(summary)
    for spec in plan(cfg):
        tc = train_config(cfg, spec)
        records = read_metrics(tc.run_dir / "metrics.jsonl")
        last = [r["val_loss"] for r in records if r["step"] == tc.steps and "val_loss" in r][-1]
        seconds = sum(tc.batch_size * tc.seq_len / r["tokens_per_s"] for r in records
                      if r["step"] > 0 and r.get("tokens_per_s"))
        run = by[spec.name]
        assert run["val_loss"] == last
        assert run["train_seconds"] == pytest.approx(seconds, rel=1e-12)
        assert f"| {spec.name} | {spec.label} | {spec.P} | **{last:.4f}** |" in report
    for name in ("p2", "p4", "p1-prefix", "p1-wide", "post-p2-streams"):
        delta = by[name]["val_loss"] - by["p1"]["val_loss"]
        assert by[name]["delta_vs_p1"] == pytest.approx(delta, abs=1e-12)
        assert f"**{by[name]['val_loss']:.4f}** | {delta:+.4f} |" in report
    gap = by["post-p2-streams"]["val_loss"] - by["post-p1-control"]["val_loss"]
    assert f"post-p2-streams {gap:+.4f}" in report
    # Parameter counts of the saved models, counted here from their safetensors files.
    for name in ("p1", "p2", "p1-prefix", "p1-wide"):
        tensors = load_file(str(out / "runs" / name / "final" / "model.safetensors"))
        non_emb = sum(t.numel() for k, t in tensors.items() if "embed_tokens" not in k and k != "lm_head.weight")
        assert by[name]["non_embedding_params"] == non_emb


def _initial_backbone_digest(run_dir: Path, seed: int) -> str:
    """The initial backbone rebuilt with plain transformers (torch.manual_seed, then from_config),
    hashed by name and bytes, stream parameters and the tied lm_head left out."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    fields = json.loads((run_dir / "final" / "config.json").read_text())
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rope_parameters", "tie_word_embeddings",
            "rms_norm_eps", "initializer_range", "hidden_act")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**{k: fields[k] for k in keep}), dtype=torch.float32)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name != "lm_head.weight":
            digest.update(name.encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_runs_of_one_seed_share_their_initialisation(smoke):
    out, summary, _, _ = smoke
    by = _runs(summary)
    digests = {name: by[name]["init_backbone_sha256"] for name in FROM_SCRATCH_TINY}
    assert len(set(digests.values())) == 1, digests
    assert digests["p1"] == _initial_backbone_digest(out / "runs" / "p1", seed=0)
    assert by["p1-wide"]["init_backbone_sha256"] not in digests.values()  # another shape: cannot share
    control = load_file(str(out / "runs" / "p1-prefix" / "final" / "model.safetensors"))
    assert control["model.layers.0.self_attn.prefix_k"].shape[0] == 1  # one prefix ...
    assert not any("aggregate_layer" in k for k in control)  # ... and no aggregation
    # Shared init, different training: the final backbones differ.
    a = load_file(str(out / "runs" / "p1" / "final" / "model.safetensors"))
    b = load_file(str(out / "runs" / "p2" / "final" / "model.safetensors"))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.slow
def test_frozen_backbone_runs_hold_the_source_backbone_bit_for_bit(smoke):
    out, summary, _, _ = smoke
    ref = load_file(str(out / "runs" / "p1" / "final" / "model.safetensors"))
    for name in ("post-p2-streams", "post-p4-streams"):
        got = load_file(str(out / "runs" / name / "final" / "model.safetensors"))
        assert {k for k in got if "prefix_" not in k and "aggregate_layer" not in k} == set(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
        assert _runs(summary)[name]["backbone_vs_source"]["identical"]
    control = load_file(str(out / "runs" / "post-p1-control" / "final" / "model.safetensors"))
    assert not all(torch.equal(control[k], ref[k]) for k in ref)  # the contrast: it trained every weight
    # Every two-stage run goes on with new tokens: past the sequences p1 trained on, all from the same place.
    import yaml

    # data_order.json records how far each run got in the one order (start + its own sequences)
    p1 = yaml.safe_load((out / "runs" / "p1" / "config.yaml").read_text())
    p1_rows = json.loads((out / "runs" / "p1" / "final" / "data_order.json").read_text())["rows"]
    assert p1_rows == p1["steps"] * p1["batch_size"]
    for name in ("post-p2-streams", "post-p4-streams", "post-p1-control"):
        run = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        rows = json.loads((out / "runs" / name / "final" / "data_order.json").read_text())["rows"]
        assert rows == p1_rows + run["steps"] * run["batch_size"], name


@pytest.mark.slow
def test_changed_settings_in_the_same_out_are_refused(smoke):
    from parscale.demo.study import run_demo

    out, _, _, _ = smoke
    with pytest.raises(UserError, match="other settings.*steps"):
        run_demo(DemoConfig.preset(str(out), budget="smoke", scale=2))


def test_full_budget_is_paired_over_four_seeds_and_three_sizes():
    cfg = DemoConfig.preset("unused", budget="full")
    specs = plan(cfg)
    by_seed: dict[int, set[str]] = {}
    for s in specs:
        by_seed.setdefault(s.seed, set()).add(s.setting)
    assert sorted(by_seed) == [0, 1, 2, 3] and len({frozenset(v) for v in by_seed.values()}) == 1
    settings = by_seed[0]
    assert {f"{size}-p{p}" for size in ("tiny-xs", "tiny-s") for p in (1, 2, 4)} <= settings
    assert {"p1", "p2", "p4", "p1-prefix", "p1-wide", "p2-smooth0.1", "p2-2x"} <= settings
    # The default's eight runs are trained exactly as the default budget trains them.
    default = DemoConfig.preset("unused")
    assert (cfg.steps, cfg.post_steps, cfg.evals, cfg.eval_tokens) == \
        (default.steps, default.post_steps, default.evals, default.eval_tokens)
    # Paired: P=2 and the prefix control of one seed differ only in the model's streams.
    a, b = (train_config(cfg, next(s for s in specs if s.name == n)).to_dict() for n in ("p2-s1", "p1-prefix-s1"))
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"out", "P", "prefix_at_p1"}
    # Each prefix attempt changes P=2 and its control alike, and only in its one option.
    by_name = {s.name: train_config(cfg, s).to_dict() for s in specs if s.seed == 1}
    attempts = {"init0.002": {"prefix_init_std": 0.002}, "init0.2": {"prefix_init_std": 0.2},
                "slr3": {"stream_lr_mult": 3.0}, "slr0.3": {"stream_lr_mult": 0.3}, "mlp": {"prefix_mlp_hidden": 128}}
    for name, option in attempts.items():
        for arm in ("p2", "p1-prefix"):
            got, base = by_name[f"{arm}-{name}-s1"], by_name[f"{arm}-s1"]
            assert {k: got[k] for k in got if got[k] != base[k] and k != "out"} == option, (arm, name)
    for coef in (0.1, 1.0):
        got = by_name[f"p2-penalty{coef:g}-s1"]
        assert {k: got[k] for k in got if got[k] != by_name["p2-s1"][k] and k != "out"} == \
            {"stream_similarity_penalty": coef}
    assert len(specs) == 4 * 31


def test_a_run_trained_before_the_new_options_is_still_reused(tmp_path):
    """A config.yaml without the options added later (they were at their defaults) is the same run."""
    import yaml

    from parscale.demo.runner import ensure_run

    cfg = DemoConfig.preset(str(tmp_path), budget="quick")
    tc = train_config(cfg, plan(cfg)[1])  # p2
    old = {k: v for k, v in tc.to_dict().items()
           if k not in ("prefix_init_std", "prefix_mlp_hidden", "stream_lr_mult", "stream_similarity_penalty")}
    del old["data"]["format"]  # the data's own options grow too (chat data came later)
    (tc.run_dir / "final").mkdir(parents=True)
    (tc.run_dir / "final" / "config.json").write_text("{}")
    (tc.run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    assert ensure_run(tc) == (tc.run_dir / "final", "reused")
    (tc.run_dir / "config.yaml").write_text(yaml.safe_dump({**old, "prefix_init_std": 0.2}))
    with pytest.raises(UserError, match="other options .*prefix_init_std"):
        ensure_run(tc)


def test_finished_runs_are_reused_without_a_worker_and_said_to_be(tmp_path, capsys):
    """A rerun in the same OUT: finished runs print "reuse", an interrupted one "resume", a new
    one "start"; only the last two go to a worker and have their data prepared."""
    from concurrent.futures import Future

    import yaml

    from parscale.demo.runner import train_all

    cfg = DemoConfig.preset(str(tmp_path), budget="smoke")
    specs = plan(cfg)
    states = {s.name: "finished" for s in specs} | {"p4": "interrupted", "p2": "new"}
    for spec in specs:
        tc = train_config(cfg, spec)
        if states[spec.name] != "new":
            tc.run_dir.mkdir(parents=True)
            (tc.run_dir / "config.yaml").write_text(yaml.safe_dump(tc.to_dict()))
        if states[spec.name] == "finished":
            (tc.run_dir / "final").mkdir()
            (tc.run_dir / "final" / "config.json").write_text("{}")

    class Pool:
        workers, submitted = 2, []

        def submit_run(self, tc):  # what a worker's `ensure_run` returns, without the training
            self.submitted.append(tc.run_dir.name)
            fut = Future()
            fut.set_result({"final": str(tc.run_dir / "final"), "wall_seconds": 1.0, "action": actions[states[tc.run_dir.name]]})
            return fut

        def signal_workers(self, signum):
            raise AssertionError("nothing was stopped")

    actions = {"finished": "reused", "interrupted": "resumed", "new": "trained"}
    prepared = []
    done = train_all(cfg, specs, Pool(), lambda tc: prepared.append(tc.run_dir.name))
    assert sorted(Pool.submitted) == ["p2", "p4"] and prepared and set(prepared) <= {"p2", "p4"}
    assert {name: d["action"] for name, d in done.items()} == {name: actions[state] for name, state in states.items()}
    said: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():
        said.setdefault(line.split()[2].rstrip(":"), []).append(line)
    for spec in specs:
        verb = {"finished": "reuse", "interrupted": "resume", "new": "start"}[states[spec.name]]
        first, *then = said[spec.name]
        assert first.startswith(f"[demo] {verb} {spec.name}: {spec.label} ("), first
        if verb == "reuse":  # one line, and nothing else about it
            assert first.endswith(f"(finished earlier; {list(done).index(spec.name) + 1}/{len(specs)})") and not then
        else:  # and the worker's result when it comes
            assert then == [f"[demo] {done[spec.name]['action']} {spec.name} in 1 s "
                            f"({list(done).index(spec.name) + 1}/{len(specs)})"]


def test_budgets_and_flags():
    with pytest.raises(UserError, match="--scale"):
        DemoConfig.preset("x", scale=0)
    with pytest.raises(UserError, match="--budget"):
        DemoConfig.preset("x", budget="huge")
    quick = DemoConfig.preset("x", budget="quick", scale=2)
    assert (quick.steps, quick.post_steps) == (200, 60)
    assert DemoConfig.preset("x", scale=0.001).post_steps == 1


def test_cli_reports_bad_flags_in_one_line(capsys):
    from parscale.cli.main import main

    assert main(["demo", "--scale", "-1", "--out", "unused"]) == 2
    assert "--scale" in capsys.readouterr().err
    assert main(["demo", "--quick", "--budget", "full", "--out", "unused"]) == 2
    assert "--quick" in capsys.readouterr().err



@pytest.mark.slow
def test_ctrl_c_prints_the_demo_notice_keeps_checkpoints_and_a_rerun_resumes(interrupted, smoke):
    from parscale.demo.runner import STOP_NOTICE
    from parscale.interrupt import STOP_NOTICE as TRAIN_NOTICE

    out, stopped_proc, kept = interrupted
    stdout, stderr = stopped_proc.stdout, stopped_proc.stderr
    assert stopped_proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines.count(STOP_NOTICE) == 1 and TRAIN_NOTICE not in stderr  # the demo speaks once, its runs do not
    finished = stdout.count("[demo] trained ")
    assert lines[-1] == (f"parscale demo: stopped with {finished} of 8 runs finished; finished runs and "
                         f"checkpoints are kept, continue with: parscale demo {' '.join(SMOKE_FLAGS)} --out {out}")
    stopped = [line.split()[2].rstrip(";") for line in stdout.splitlines() if line.startswith("[demo] stopped ")]
    assert "p4" in stopped, stdout  # the run that had logged an update stopped mid-run ...
    p4_steps = [r["step"] for r in read_metrics(out / "runs" / "p4" / "metrics.jsonl")]
    assert p4_steps == list(range(1, DemoConfig.preset("x", budget="smoke").steps + 1))  # resumed without a gap
    rerun = smoke[3]
    assert kept["p4"] and kept["p4"][-1] != "ckpt-0000004", kept  # ... kept a checkpoint of the update it was in
    for name in stopped:  # ... and the rerun resumed every stopped run
        assert f"[demo] resume {name}: " in rerun and f"[demo] resumed {name} " in rerun, rerun
    assert "[demo] trained p4" not in rerun
    # the runs that finished before the stop are reused, and said to be: not started again
    for name in [line.split()[2] for line in stdout.splitlines() if line.startswith("[demo] trained ")]:
        assert f"[demo] reuse {name}: " in rerun and "(finished earlier; " in rerun, rerun
        assert f"[demo] start {name}:" not in rerun and f"[demo] resume {name}:" not in rerun, rerun


def test_a_demo_recorded_before_a_new_option_existed_is_still_the_same_demo(tmp_path):
    from parscale.demo.study import DEMO_FILE, check_demo_dir

    cfg = DemoConfig.preset(tmp_path / "demo", "smoke")
    check_demo_dir(cfg)
    recorded = json.loads((tmp_path / "demo" / DEMO_FILE).read_text())
    del recorded["data"]["format"], recorded["eval_tokens"]  # as written by a version without these keys
    (tmp_path / "demo" / DEMO_FILE).write_text(json.dumps(recorded))
    with pytest.raises(UserError, match="other settings.*eval_tokens"):  # absent = the default, not smoke's value
        check_demo_dir(cfg)
    check_demo_dir(DemoConfig.preset(tmp_path / "demo", "smoke", eval_tokens=DemoConfig.eval_tokens))


def test_seeds_option_runs_every_setting_over_paired_seeds(monkeypatch, tmp_path):
    """`--seeds N` gives the budget's design N seeds (0..N-1, shifted by --seed), nothing else changed."""
    import parscale.demo.study as study
    from parscale.cli.demo import main

    seen = []
    monkeypatch.setattr(study, "run_demo", seen.append)
    assert main(["--out", str(tmp_path / "a"), "--budget", "quick", "--seeds", "3", "--seed", "5", "--no-measure"]) == 0
    cfg = seen[0]
    assert cfg.seeds == (5, 6, 7)
    one = DemoConfig.preset(str(tmp_path / "a"), budget="quick", seed=5, measure=False, workers=cfg.workers)
    assert {k: v for k, v in cfg.to_dict().items() if k != "seeds"} == \
        {k: v for k, v in one.to_dict().items() if k != "seeds"}
    specs = plan(cfg)
    assert {s.setting for s in specs if s.seed == 5} == {s.setting for s in specs if s.seed == 7}
    assert len(specs) == 3 * len(plan(one))
    with pytest.raises(UserError, match="--seeds must be at least 1"):
        main(["--out", str(tmp_path / "b"), "--seeds", "0"])


def test_loss_vs_p_draws_one_line_per_seed(tmp_path, monkeypatch):
    """With several seeds, each seed's P = 1, 2, 4 runs are joined on their own; pooling them
    into one sorted line zig-zags between seeds and pairs runs that share nothing."""
    from parscale.demo import plots

    runs = [{"group": "scratch", "kind": "p1" if p == 1 else "streams", "P": p, "seed": seed,
             "val_loss": 4.0 + seed - 0.1 * p} for seed in (0, 1) for p in (1, 2, 4)]
    runs.append({"group": "scratch", "kind": "prefix", "P": 1, "seed": 0, "val_loss": 3.5})
    drawn = {}
    monkeypatch.setattr(plots, "atomic_save_figure", lambda fig, path, **kw: drawn.setdefault("fig", fig))
    plots.plot_loss_vs_p({"runs": runs}, tmp_path / "p.png")
    lines = [list(zip(*line.get_data())) for line in drawn["fig"].axes[0].get_lines()]
    expected = [[(p, 4.0 + seed - 0.1 * p) for p in (1, 2, 4)] for seed in (0, 1)]
    assert sorted(lines) == sorted(expected)


def test_only_picks_settings_and_the_runs_they_continue_from(tmp_path):
    """`--only` keeps the named settings over every seed plus the sources of two-stage runs,
    and refuses a name the budget does not have, listing the ones it has."""
    cfg = DemoConfig.preset(str(tmp_path), budget="full", seeds=(0, 1), only=("post-p2-streams", "p2-smooth0.1"))
    names = [s.name for s in plan(cfg)]
    assert names == ["p1-s0", "post-p2-streams-s0", "p2-smooth0.1-s0", "p1-s1", "post-p2-streams-s1", "p2-smooth0.1-s1"]
    assert cfg.identity() == DemoConfig.preset(str(tmp_path), budget="full", seeds=(0, 1)).identity()
    with pytest.raises(UserError, match=r"no setting 'p2-smooth0.1'.*its settings are p1, p2"):
        plan(DemoConfig.preset(str(tmp_path), budget="default", only=("p2", "p2-smooth0.1")))


@pytest.mark.slow
def test_only_into_a_finished_out_reuses_its_runs_and_reports_just_those(smoke, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(smoke[0], out)
    proc = subprocess.run([sys.executable, "-m", "parscale", "demo", *SMOKE_FLAGS, "--out", str(out),
                           "--only", "p2,post-p2-streams", "--no-measure"],
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["p1", "p2", "post-p2-streams"]
    assert {r["action"] for r in summary["runs"]} == {"reused"}
    assert {r["name"]: r["val_loss"] for r in summary["runs"]} == \
        {name: r["val_loss"] for name, r in _runs(smoke[1]).items() if name in ("p1", "p2", "post-p2-streams")}


def test_comparisons_plot_draws_each_mean_with_two_standard_errors(tmp_path, monkeypatch):
    from parscale.demo import plots

    comps = [{"a": "p2", "b": "p1", "seeds": [0, 1, 2, 3], "mean": -0.6, "se": 0.05, "beyond_2se": True},
             {"a": "p2", "b": "p1-prefix", "seeds": [0, 1, 2, 3], "mean": -0.02, "se": 0.03, "beyond_2se": False}]
    drawn = {}
    monkeypatch.setattr(plots, "atomic_save_figure", lambda fig, path, **kw: drawn.setdefault("fig", fig))
    assert plots.plot_comparisons({"comparisons": comps}, tmp_path / "c.png")
    ax = drawn["fig"].axes[0]
    bars = sorted([float(x) for x in seg.ravel()] for seg in ax.collections[0].get_segments())  # x0 y0 x1 y1
    assert bars == [pytest.approx([-0.7, 1.0, -0.5, 1.0]), pytest.approx([-0.08, 0.0, 0.04, 0.0])]
    at = {float(y): t.get_text() for y, t in zip(ax.get_yticks(), ax.get_yticklabels())}
    assert at == {1.0: "p2 − p1", 0.0: "p2 − p1-prefix"}  # the first comparison on top
    one_seed = [{**c, "se": None} for c in comps]
    assert not plots.plot_comparisons({"comparisons": one_seed}, tmp_path / "none.png")


@pytest.mark.parametrize("written", [True, False])
def test_a_stop_after_the_final_model_was_written_counts_the_run_as_finished(tmp_path, monkeypatch, written):
    """A stop can land between the trainer's last update and the worker's return: once the final
    model is written the run is finished (a rerun reuses it), so the demo must not call it stopped."""
    import signal

    from parscale.demo import runner
    from parscale.interrupt import Interrupted
    from parscale.train.config import dump_yaml

    cfg = DemoConfig.preset(str(tmp_path / "d"), budget="smoke")
    tc = train_config(cfg, plan(cfg)[0])

    def train_then_stop(tc, notice):
        tc.run_dir.mkdir(parents=True)
        dump_yaml(tc, tc.run_dir / "config.yaml")  # as the trainer records a run it starts
        if written:
            (tc.run_dir / "final").mkdir()
            (tc.run_dir / "final" / "config.json").write_text("{}")
        raise Interrupted(signal.SIGINT, "stopped")

    monkeypatch.setattr(runner, "ensure_run", train_then_stop)
    got = runner._job(tc)
    assert runner.run_state(tc) == ("finished" if written else "interrupted")
    if written:
        assert (got["action"], got["final"]) == ("trained", str(tc.run_dir / "final"))
    else:
        assert (got["action"], got["final"], got["signum"]) == ("interrupted", None, signal.SIGINT)
