"""The `law` budget: its premise check on synthetic runs of known truth, its plan against the
presets counted independently, its report's refusal to compare when the premise fails, the
CLI, and (slow) its whole code path at a few steps."""
from __future__ import annotations

import dataclasses
import json

import pytest

from parscale.demo.law_report import law_markdown
from parscale.demo.plan import LAW_DESIGNS, DemoConfig, plan, smoke_data, train_config
from parscale.demo.stats import comparisons, premise, settings_table

PNG = b"\x89PNG\r\n\x1a\n"
# P = 1 loss per seed (0, 1, 2) where the premise holds: every size step and the wider model lower the loss.
HOLDS = {"law-xs-p1": [2.60, 2.64, 2.58], "law-s-p1": [2.45, 2.50, 2.44], "law-m-p1": [2.30, 2.33, 2.31],
         "law-s-wide": [2.40, 2.47, 2.41]}


def _runs(losses: dict[str, list[float]]) -> list[dict]:
    return [{"setting": s, "seed": seed, "val_loss": v} for s, vals in losses.items() for seed, v in enumerate(vals)]


def _check(pre: dict, a: str, b: str) -> dict:
    return next(c for c in pre["checks"] if (c["a"], c["b"]) == (a, b))


def test_premise_holds_when_every_size_step_and_the_wide_model_lower_the_loss():
    pre = premise(_runs(HOLDS))
    assert pre["holds"] and pre["n_falls"] and pre["wide_beats"]
    assert [(c["a"], c["b"]) for c in pre["checks"]] == [("law-s-p1", "law-xs-p1"), ("law-m-p1", "law-s-p1"),
                                                         ("law-s-wide", "law-s-p1")]
    # s - xs: -0.15, -0.14, -0.14; mean -0.143333; squared deviations 4.444e-5 + 1.111e-5 + 1.111e-5
    # = 6.667e-5; sample sd sqrt(6.667e-5 / 2) = 0.0057735; SE = sd / sqrt(3) = 0.0033333
    step = _check(pre, "law-s-p1", "law-xs-p1")
    assert step["mean"] == pytest.approx(-0.143333, abs=1e-6) and step["se"] == pytest.approx(0.0033333, abs=1e-6)
    # m - s: -0.15, -0.17, -0.13; mean -0.15; squares 0 + 0.0004 + 0.0004; sd sqrt(0.0008 / 2) = 0.02; SE 0.011547
    step = _check(pre, "law-m-p1", "law-s-p1")
    assert step["mean"] == pytest.approx(-0.15, abs=1e-9) and step["se"] == pytest.approx(0.011547, abs=1e-6)
    # wide - s: -0.05, -0.03, -0.03; mean -0.036667; squares 1.778e-4 + 4.444e-5 + 4.444e-5 = 2.667e-4;
    # sd sqrt(1.333e-4) = 0.011547; SE 0.0066667: |mean| = 5.5 SE
    wide = _check(pre, "law-s-wide", "law-s-p1")
    assert wide["mean"] == pytest.approx(-0.036667, abs=1e-6) and wide["se"] == pytest.approx(0.0066667, abs=1e-6)
    assert all(c["holds"] for c in pre["checks"])


def test_premise_fails_where_more_parameters_do_not_help():
    # m - s: +0.05, -0.06, +0.03; mean +0.006667; squares 0.0018778 + 0.0044444 + 0.00054444 = 0.0068667;
    # sd sqrt(0.0068667 / 2) = 0.058595; SE 0.033830: within two SE (and of the wrong sign)
    pre = premise(_runs({**HOLDS, "law-m-p1": [2.50, 2.44, 2.47]}))
    step = _check(pre, "law-m-p1", "law-s-p1")
    assert step["mean"] == pytest.approx(0.006667, abs=1e-6) and step["se"] == pytest.approx(0.033830, abs=1e-6)
    assert not step["holds"] and _check(pre, "law-s-p1", "law-xs-p1")["holds"]
    assert not pre["n_falls"] and pre["wide_beats"] and not pre["holds"]


def test_premise_fails_where_the_wider_model_does_not_beat_p1():
    # wide - s: +0.02, -0.01, +0.02; mean +0.01; squares 0.0001 + 0.0004 + 0.0001; sd sqrt(0.0003) = 0.017321;
    # SE 0.01: within two SE
    pre = premise(_runs({**HOLDS, "law-s-wide": [2.47, 2.49, 2.46]}))
    wide = _check(pre, "law-s-wide", "law-s-p1")
    assert wide["mean"] == pytest.approx(0.01, abs=1e-9) and wide["se"] == pytest.approx(0.01, abs=1e-6)
    assert pre["n_falls"] and not pre["wide_beats"] and not pre["holds"]
    # beyond two SE but worse (+0.05, +0.06, +0.05: mean +0.053333, SE 0.0033333) is no premise either
    pre = premise(_runs({**HOLDS, "law-s-wide": [2.50, 2.56, 2.49]}))
    wide = _check(pre, "law-s-wide", "law-s-p1")
    assert wide["beyond_2se"] and wide["mean"] == pytest.approx(0.053333, abs=1e-6)
    assert not pre["wide_beats"] and not pre["holds"]


def test_premise_without_the_runs_or_with_one_seed_is_not_shown():
    assert not premise(_runs({k: v[:1] for k, v in HOLDS.items()}))["holds"]  # one seed: no standard error
    missing = premise(_runs({k: v for k, v in HOLDS.items() if k != "law-m-p1"}))
    assert not missing["holds"] and _check(missing, "law-m-p1", "law-s-p1")["seeds"] == []


# ---------------------------------------------------------------- the plan
def _non_embedding(preset: str, vocab: int) -> int:
    """Counted from a plain transformers Qwen2 model of the preset's shape (the head is tied)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from parscale.train.presets import _SMALL_MODELS

    d, ffn, layers, heads, kv, pos = _SMALL_MODELS[preset]
    model = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=vocab, hidden_size=d, intermediate_size=ffn,
                                                         num_hidden_layers=layers, num_attention_heads=heads,
                                                         num_key_value_heads=kv, max_position_embeddings=pos,
                                                         tie_word_embeddings=True))
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def test_law_plan_has_every_arm_over_paired_seeds_and_twenty_tokens_per_parameter():
    cfg = DemoConfig.preset("unused", budget="law")
    specs = plan(cfg)
    assert cfg.seeds == (0, 1, 2)
    by_seed: dict[int, set[str]] = {}
    for s in specs:
        by_seed.setdefault(s.seed, set()).add(s.setting)
    arms = {f"{size}-{arm}" for size in ("law-xs", "law-s", "law-m")
            for arm in ("p1", "p2", "p4", "prefix48", "prefix96", "p2-decor", "p2-lora4", "p2-lora4-decor")}
    arms |= {"law-s-wide"}
    assert all(settings == arms for settings in by_seed.values()) and len(specs) == 3 * 25
    n = {p: _non_embedding(p, cfg.data.vocab_size) for p in ("law-xs", "law-s", "law-s-wide", "law-m")}
    assert n["law-xs"] < n["law-s"] < n["law-m"]
    assert n["law-s-wide"] / n["law-s"] == pytest.approx(1.27, abs=0.01)
    for spec in specs:
        tc = train_config(cfg, spec)
        if spec.P == 1:  # every P = 1 run, the controls and the wider model too, sees 20 tokens per parameter
            assert tc.steps * tc.batch_size * tc.seq_len >= 20 * n[spec.preset], spec.name
    # Paired: P = 2 and the 96-token control of one seed differ only in the model's streams and prefix.
    by = {s.name: train_config(cfg, s).to_dict() for s in specs if s.seed == 1}
    a, b, c = by["law-s-p2-s1"], by["law-s-prefix96-s1"], by["law-s-prefix48-s1"]
    assert {k for k in a if a[k] != b[k]} == {"out", "P", "prefix_at_p1", "prefix_tokens"}
    assert (b["P"], b["prefix_at_p1"], b["prefix_tokens"], c["prefix_tokens"], a["prefix_tokens"]) == (1, True, 96, 48, 48)
    assert by["law-m-p4-s1"]["data"]["vocab_size"] == 512 and by["law-m-p4-s1"]["seed"] == 1
    # The attempts: plain P = 2 plus their option, nothing else.
    for name, options in (("decor", {"stream_decorrelation": 10.0}), ("lora4", {"stream_lora_rank": 4}),
                          ("lora4-decor", {"stream_decorrelation": 10.0, "stream_lora_rank": 4})):
        attempt = by[f"law-s-p2-{name}-s1"]
        assert {k for k in a if a[k] != attempt[k]} == {"out"} | set(options)
        assert all(attempt[k] == v for k, v in options.items())


# ---------------------------------------------------------------- the report
def _summary(losses: dict[str, list[float]], budget: str = "law") -> dict:
    """A law summary from per-seed losses, through the same statistics as the study."""
    tag = budget + "-"  # the sizes' names: law-m, or law-gpu-m
    n = {tag + k: v for k, v in {"xs": 26_328, "s": 46_624, "s-wide": 59_364, "m": 104_496}.items()}
    runs = []
    for setting, vals in losses.items():
        parts = setting[len(tag):].split("-")  # m-p2, m-prefix96, m-p2-lora4 (an attempt), s-wide
        wide = parts == ["s", "wide"]
        preset = setting if wide else tag + parts[0]
        arm = parts[1] if len(parts) > 1 and not wide else ""
        P = int(arm[1:]) if arm[:1] == "p" and arm[1:].isdigit() else 1
        group = "attempt" if len(parts) > 2 else "law"
        for seed, v in enumerate(vals):
            runs.append({"name": f"{setting}-s{seed}", "label": setting, "setting": setting, "seed": seed, "P": P,
                         "preset": preset, "group": group, "val_loss": v, "delta_vs_p1": None,
                         "delta_vs_control": None, "train_seconds": 1.0, "train_flops": 1e12,
                         "non_embedding_params": n[preset], "extra_params": None, "decode_ms_per_token": None,
                         "decode_ms_per_token_bf16": None, "streams": {"stream_cosine": 0.99} if P > 1 else None})
    return {"budget": budget, "config": {"steps": 1024, "batch_size": 16, "data": {"vocab_size": 512},
                                        "seeds": [0, 1, 2], "eval_tokens": 65536},
            "machine": {"start": {"cores": 2, "load_average": [0.1]}, "end": {"load_average": [0.1]}},
            "parallel": {"workers": 1}, "wall_seconds": 60.0, "runs": runs, "settings": settings_table(runs),
            "comparisons": comparisons(runs), "own_law": None,
            "law": {"premise": premise(runs, LAW_DESIGNS[budget]), "tokens_per_run": 2_097_152, "train_tokens": 5_627_984,
                    "epochs": 0.37, "N": n, "tokens_per_param": {k: 2_097_152 / v for k, v in n.items()},
                    "paper_k": {"paper-stack": 0.39, "paper-pile": 0.33}}}


STREAMS = {f"{size}-{arm}": [v - 0.1, v - 0.12, v - 0.11] for size, v in (("law-xs", 2.6), ("law-s", 2.45),
                                                                          ("law-m", 2.3))
           for arm in ("p2", "p4", "prefix48", "prefix96")}


def test_report_compares_the_streams_only_where_the_premise_holds():
    text = law_markdown(_summary({**HOLDS, **STREAMS}))
    assert "The premise holds" in text and "What the streams buy" in text and "cannot test the law" not in text
    assert text.index("First: does the law's premise hold") < text.index("What the streams buy")
    failed = law_markdown(_summary({**HOLDS, **STREAMS, "law-s-wide": [2.47, 2.49, 2.46]}))
    assert "The premise fails" in failed and "cannot test the law at this budget" in failed
    assert "the wider model does not beat P = 1" in failed and "P = 1 loss does not fall" not in failed
    for section in ("What the streams buy", "fitted to our own runs", "comparisons.png"):
        assert section not in failed, section


def test_report_names_the_cpu_and_its_vector_flags():
    summary = _summary(HOLDS)
    summary["machine"]["start"].update(cpu="AMD EPYC 7B12", flags="avx2 fma no avx512")
    assert "from AMD EPYC 7B12 (avx2 fma no avx512), 2 cores" in law_markdown(summary)
    del summary["machine"]["start"]["flags"]  # a summary.json written before the flags were recorded
    assert "from AMD EPYC 7B12, 2 cores" in law_markdown(summary)


def test_streams_are_compared_with_p1_and_both_controls_at_every_size():
    # law-m P = 2 below its 96-token control by 0.02, 0.04, 0.03: mean -0.03; squares 0.0001 + 0.0001 + 0;
    # sd sqrt(0.0002 / 2) = 0.01; SE 0.0057735: beyond two SE
    control = STREAMS["law-m-prefix96"]
    summary = _summary({**HOLDS, **STREAMS, "law-m-p2": [c - d for c, d in zip(control, (0.02, 0.04, 0.03))]})
    pairs = {(c["a"], c["b"]): c for c in summary["comparisons"]}
    for size in ("law-xs", "law-s", "law-m"):
        for p in (2, 4):
            assert {(f"{size}-p{p}", f"{size}-{b}") for b in ("p1", "prefix48", "prefix96")} <= set(pairs)
    got = pairs[("law-m-p2", "law-m-prefix96")]
    assert got["mean"] == pytest.approx(-0.03, abs=1e-9) and got["se"] == pytest.approx(0.0057735, abs=1e-6)
    assert got["beyond_2se"] and ("law-s-p2", "law-s-wide") in pairs
    row = next(line for line in law_markdown(summary).splitlines() if line.startswith("| `law-m` | -0.1"))
    assert row.split(" | ")[3] == "-0.030 ± 0.006 (yes)"  # P = 2 − 96-token prefix


def test_loss_vs_n_joins_each_arms_mean_over_seeds(tmp_path, monkeypatch):
    from parscale.demo import plots

    runs = _summary({**HOLDS, **STREAMS})["runs"]
    drawn = {}
    monkeypatch.setattr(plots, "atomic_save_figure", lambda fig, path, **kw: drawn.setdefault("fig", fig))
    for r in runs:
        r["kind"] = "wide" if r["preset"] == "law-s-wide" else "prefix" if "prefix" in r["setting"] else \
            "p1" if r["P"] == 1 else "streams"
        r["prefix_tokens"] = 96 if r["setting"].endswith("prefix96") else 48
    plots.plot_loss_vs_n({"runs": runs}, tmp_path / "n.png")
    lines = {line.get_label(): [v for xy in zip(*line.get_data()) for v in xy]  # x0, y0, x1, y1, ...
             for line in drawn["fig"].axes[0].get_lines()}
    mean = lambda v: sum(v) / 3  # noqa: E731
    assert lines["P=1"] == pytest.approx([26_328, mean(HOLDS["law-xs-p1"]), 46_624, mean(HOLDS["law-s-p1"]),
                                          104_496, mean(HOLDS["law-m-p1"])])
    assert lines["P=1 + one 96-token prefix"][4:] == pytest.approx([104_496, mean(STREAMS["law-m-prefix96"])])
    assert lines["P=1 wider (1.27x params)"] == pytest.approx([59_364, mean(HOLDS["law-s-wide"])])
    assert set(lines) == {"P=1", "P=2", "P=4", "P=1 + one 48-token prefix", "P=1 + one 96-token prefix",
                          "P=1 wider (1.27x params)"}


# ---------------------------------------------------------------- the CLI and the code path
def test_cli_accepts_the_law_budget(monkeypatch, tmp_path):
    import parscale.demo.study as study
    from parscale.cli import demo as cli_demo
    from parscale.demo.plan import BUDGETS

    assert cli_demo.BUDGETS == BUDGETS  # the CLI's list (kept free of torch imports) is the plan's
    seen = []
    monkeypatch.setattr(study, "run_demo", seen.append)
    assert cli_demo.main(["--out", str(tmp_path / "law"), "--budget", "law", "--no-measure",
                          "--only", "law-s-p1,law-s-wide"]) == 0
    assert seen[0].budget == "law" and seen[0].seeds == (0, 1, 2) and seen[0].only == ("law-s-p1", "law-s-wide")
    assert [s.name for s in plan(seen[0])] == [f"{n}-s{seed}" for seed in (0, 1, 2) for n in ("law-s-p1", "law-s-wide")]


@pytest.mark.slow
def test_the_law_budget_runs_end_to_end_at_two_steps(tmp_path):
    """Every run of the law design at 2 steps on the smoke corpus, in this process: the report,
    its plots and its statements of tokens per parameter and epochs."""
    from parscale.demo.study import run_demo

    cfg = DemoConfig.preset(str(tmp_path / "law"), budget="law", seeds=(0, 1), steps=2, evals=1, eval_tokens=512,
                            batch_size=4, data=smoke_data(), workers=1, measure=False)
    summary = run_demo(cfg)
    out = tmp_path / "law"
    assert json.loads((out / "summary.json").read_text())["law"] == json.loads(json.dumps(summary["law"]))
    law = summary["law"]
    assert law["tokens_per_run"] == 2 * 4 * 128
    by = {r["name"]: r for r in summary["runs"]}
    for preset in ("law-xs", "law-s", "law-s-wide", "law-m"):
        n = by[(preset if preset == "law-s-wide" else preset + "-p1") + "-s0"]["non_embedding_params"]
        assert law["N"][preset] == n and law["tokens_per_param"][preset] == pytest.approx(1024 / n)
    assert law["epochs"] == pytest.approx(1024 / law["train_tokens"])
    assert by["law-s-prefix96-s1"]["delta_vs_p1"] == pytest.approx(by["law-s-prefix96-s1"]["val_loss"]
                                                                   - by["law-s-p1-s1"]["val_loss"])
    text = (out / "report.md").read_text()
    assert text.startswith("# ParScale law study") and "First: does the law's premise hold" in text
    assert ("The premise holds" in text) == law["premise"]["holds"]
    for name in ("loss_vs_n.png", "curves.png", "comparisons.png"):
        assert (out / name).read_bytes()[:8] == PNG, name


def test_each_attempt_is_compared_with_plain_p2_and_both_controls():
    # law-m P = 2 with LoRA below plain P = 2 by 0.05, 0.07, 0.06: mean -0.06, sd 0.01, SE 0.0057735
    plain = STREAMS["law-m-p2"]
    lora = [v - d for v, d in zip(plain, (0.05, 0.07, 0.06))]
    summary = _summary({**HOLDS, **STREAMS, "law-m-p2-lora4": lora})
    pairs = {(c["a"], c["b"]): c for c in summary["comparisons"]}
    got = pairs[("law-m-p2-lora4", "law-m-p2")]
    assert got["mean"] == pytest.approx(-0.06, abs=1e-9) and got["se"] == pytest.approx(0.0057735, abs=1e-6)
    assert {("law-m-p2-lora4", "law-m-prefix48"), ("law-m-p2-lora4", "law-m-prefix96")} <= set(pairs)
    text = law_markdown(summary)
    row = next(line for line in text.splitlines() if line.startswith("| `law-m` | per-stream LoRA rank 4 on"))
    assert row.split(" | ")[2] == "-0.060 ± 0.006 (yes)"  # − plain P = 2
    assert "Attempts to make the streams differ" in text


# ---------------------------------------------------------------- law-gpu: the same design at 10x
def _gpu(losses: dict[str, list[float]]) -> dict[str, list[float]]:
    return {k.replace("law-", "law-gpu-", 1): v for k, v in losses.items()}


def test_law_gpu_is_the_law_design_at_ten_times_the_parameters_and_tokens():
    law, gpu = DemoConfig.preset("unused", budget="law"), DemoConfig.preset("unused", budget="law-gpu")
    law_specs, gpu_specs = plan(law), plan(gpu)
    assert gpu.seeds == law.seeds and gpu.data == law.data and gpu.eval_tokens == law.eval_tokens
    # every run of `law`, its size renamed, and nothing else: the same arms, controls and attempts
    assert [s.name.replace("law-", "law-gpu-", 1) for s in law_specs] == [s.name for s in gpu_specs]
    for a, b in zip(law_specs, gpu_specs):
        assert dataclasses.replace(a, name=b.name, setting=b.setting, preset=b.preset, baseline=b.baseline,
                                   label=b.label) == b
    n_law = {p: _non_embedding(p, law.data.vocab_size) for p in ("law-xs", "law-s", "law-s-wide", "law-m")}
    n_gpu = {p: _non_embedding("law-gpu-" + p[4:], gpu.data.vocab_size) for p in n_law}
    for p in n_law:
        assert 9.5 <= n_gpu[p] / n_law[p] <= 100, p
    assert n_gpu["law-s-wide"] / n_gpu["law-s"] == pytest.approx(1.27, abs=0.01)
    tokens = {c.budget: c.steps * c.batch_size * 128 for c in (law, gpu)}
    assert 10 <= tokens["law-gpu"] / tokens["law"] <= 100
    for spec in gpu_specs:
        tc = train_config(gpu, spec)
        if spec.P == 1:  # 20 tokens per parameter at every size, as in `law`
            assert tc.steps * tc.batch_size * tc.seq_len >= 20 * n_gpu["law-" + spec.preset[8:]], spec.name


def test_law_gpu_premise_and_report_name_its_own_sizes():
    holds = _gpu(HOLDS)
    pre = premise(_runs(holds), LAW_DESIGNS["law-gpu"])
    assert pre["holds"] and [(c["a"], c["b"]) for c in pre["checks"]] == [
        ("law-gpu-s-p1", "law-gpu-xs-p1"), ("law-gpu-m-p1", "law-gpu-s-p1"), ("law-gpu-s-wide", "law-gpu-s-p1")]
    assert not premise(_runs(holds))["holds"]  # the `law` design finds none of these runs
    text = law_markdown(_summary({**holds, **_gpu(STREAMS)}, budget="law-gpu"))
    assert text.startswith("# ParScale law study (`--budget law-gpu`)") and "The premise holds" in text
    assert "`law-gpu-s-wide` beats P = 1 of `law-gpu-s`" in text
    row = next(line for line in text.splitlines() if line.startswith("| `law-gpu-m` | -"))  # the streams' table
    # law-gpu-m P = 2 - P = 1: 2.20 - 2.30, 2.18 - 2.33, 2.19 - 2.31 = -0.10, -0.15, -0.12: mean -0.123333;
    # squared deviations 5.444e-4 + 7.111e-4 + 1.111e-5 = 1.2667e-3; sd sqrt(6.333e-4) = 0.025166; SE 0.014530
    assert row.split(" | ")[1] == "-0.123 ± 0.015 (yes)"


def test_law_gpu_is_refused_without_a_gpu(monkeypatch, tmp_path):
    import torch

    from parscale.cli import demo as cli_demo
    from parscale.demo.study import run_demo
    from parscale.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="law-gpu trains on a CUDA GPU.*--budget law"):
        run_demo(DemoConfig.preset(str(tmp_path / "g"), budget="law-gpu", workers=1))
    assert not (tmp_path / "g").exists()  # nothing left that a rerun with --budget law would trip on
    assert cli_demo.default_workers("law-gpu") == 4


def test_a_study_run_in_pieces_states_the_training_time_of_all_its_runs():
    summary = _summary({**HOLDS, **STREAMS})
    assert "the whole demo took 1.0 min" in law_markdown(summary)  # wall_seconds 60, nothing reused
    for r in summary["runs"]:
        r["train_seconds"] = 90.0
    summary["parallel"]["reused"] = 5
    n = len(summary["runs"])  # (4 + 12) settings x 3 seeds = 48 runs of 1.5 min: 72 min
    assert n == 48
    assert "this invocation took 1.0 min and reused 5 of the 48 runs" in law_markdown(summary)
    assert "the training of all runs sums to 72 min" in law_markdown(summary)
