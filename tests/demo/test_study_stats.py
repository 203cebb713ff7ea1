"""The full study's statistics on synthetic runs whose truth is known: the law fitted to our
own runs recovers the k it was drawn from, and the per-setting table averages what each run says."""
from __future__ import annotations

import math

import numpy as np
import pytest

from parscale.demo.stats import comparisons, paired, settings_table
from parscale.demo.study import own_law

PNG = b"\x89PNG\r\n\x1a\n"
TRUTH = {"E": 1.2, "A": 2e-4, "alpha": 0.6, "k": 0.5}  # A in units of 1e9 parameters
SIZES = {"tiny-xs": 190_000, "tiny-s": 420_000, "tiny": 740_000}


def _loss(n: float, p: int) -> float:  # written out here, not taken from parscale.law
    return TRUTH["E"] + (TRUTH["A"] * 1e9 / (n * (TRUTH["k"] * math.log(p) + 1))) ** TRUTH["alpha"]


def _runs(seeds=(0, 1, 2, 3), noise=0.002, sizes=SIZES):
    rng = np.random.default_rng(0)
    runs = []
    for seed in seeds:
        for preset, n in sizes.items():
            for p in (1, 2, 4):
                setting = f"p{p}" if preset == "tiny" else f"{preset}-p{p}"
                streams = None if p == 1 else {"stream_cosine": 0.9 + 0.01 * seed, "top_weight": 0.5 + 0.1 * seed,
                                               "weight_entropy": 1.0 - 0.1 * seed}
                runs.append({"name": f"{setting}-s{seed}", "setting": setting, "seed": seed, "P": p, "preset": preset,
                             "group": "scratch" if preset == "tiny" else "size", "kind": "p1" if p == 1 else "streams",
                             "non_embedding_params": n + (0 if p == 1 else 1000 * p),
                             "val_loss": _loss(n, p) * (1 + noise * rng.standard_normal()), "streams": streams})
    return runs


def test_own_law_recovers_the_k_the_runs_were_drawn_from_and_draws_it(tmp_path):
    law = own_law(_runs(), bootstrap=30, plot=tmp_path / "own.png")
    assert law["converged"] and law["points"] == 36
    assert law["k"] == pytest.approx(TRUTH["k"], abs=0.1)
    assert law["E"] == pytest.approx(TRUTH["E"], abs=0.1)
    assert law["k_ci"][0] <= TRUTH["k"] <= law["k_ci"][1]
    assert (tmp_path / "own.png").read_bytes()[:8] == PNG


def test_own_law_needs_three_sizes():
    two = {k: v for k, v in SIZES.items() if k != "tiny-xs"}
    assert own_law(_runs(sizes=two), bootstrap=0) is None


def test_settings_table_averages_loss_and_stream_diagnostics_over_seeds():
    runs = _runs(noise=0.0)
    table = {s["setting"]: s for s in settings_table(runs)}
    p2 = [r for r in runs if r["setting"] == "p2"]
    assert table["p2"]["n"] == 4
    assert table["p2"]["mean"] == pytest.approx(_loss(SIZES["tiny"], 2))
    assert table["p2"]["stream_cosine"] == pytest.approx((0.90 + 0.91 + 0.92 + 0.93) / 4)
    assert table["p2"]["top_weight"] == pytest.approx(sum(0.5 + 0.1 * s for s in range(4)) / 4)
    assert table["p2"]["weight_entropy"] == pytest.approx(sum(r["streams"]["weight_entropy"] for r in p2) / 4)
    assert table["p1"]["stream_cosine"] is None and table["p1"]["se"] == pytest.approx(0.0)


def test_paired_comparison_is_the_mean_of_per_seed_differences():
    runs = _runs(noise=0.01)
    got = next(c for c in comparisons(runs) if (c["a"], c["b"]) == ("p2", "p1"))
    loss = {(r["setting"], r["seed"]): r["val_loss"] for r in runs}
    diffs = [loss[("p2", s)] - loss[("p1", s)] for s in range(4)]
    mean = sum(diffs) / 4
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3 / 4)
    assert got["mean"] == pytest.approx(mean) and got["se"] == pytest.approx(se)
    # the streams at every other size, against that size's P = 1
    pairs = {(c["a"], c["b"]) for c in comparisons(runs)}
    assert {(f"{size}-p{p}", f"{size}-p1") for size in ("tiny-xs", "tiny-s") for p in (2, 4)} <= pairs


BASE = [3.0, 3.5, 2.8, 3.2]  # setting b's loss per seed: unequal, so only pairing by seed gives the diffs below


def _paired_runs(diffs: list[float]) -> list[dict]:
    """Setting a = b + diffs[seed]; one extra seed of a alone, which has no pair."""
    runs = [{"setting": "b", "seed": s, "val_loss": BASE[s]} for s in range(len(diffs))]
    runs += [{"setting": "a", "seed": s, "val_loss": BASE[s] + d} for s, d in enumerate(diffs)]
    return runs + [{"setting": "a", "seed": 9, "val_loss": 0.0}]


@pytest.mark.parametrize("diffs, mean, se, beyond", [
    # mean -0.15; squares of the deviations .0025+.0225+.0225+.0025 = .05; sample sd sqrt(.05/3)
    # = 0.1290994449; SE = sd / sqrt(4) = 0.0645497224; |mean| = 2.32 SE: beyond 2 SE
    ([-0.1, -0.3, 0.0, -0.2], -0.15, 0.0645497224, True),
    # mean 0.2; squares .01+.01+.09+.09 = .2; sd sqrt(.2/3) = 0.2581988897; SE 0.1290994449;
    # |mean| = 1.55 SE: more than one standard error but not two, so not beyond
    ([0.1, 0.3, -0.1, 0.5], 0.2, 0.1290994449, False),
])
def test_paired_statistics_by_hand(diffs, mean, se, beyond):
    got = paired(_paired_runs(diffs), "a", "b")
    assert got["seeds"] == [0, 1, 2, 3]
    assert got["diffs"] == pytest.approx(diffs, abs=1e-12)
    assert got["mean"] == pytest.approx(mean, abs=1e-12)
    assert got["se"] == pytest.approx(se, rel=1e-9)
    assert got["beyond_2se"] is beyond


def test_one_paired_seed_has_no_standard_error_and_is_never_beyond():
    # one seed: the sample sd is undefined (n - 1 = 0), so no SE, and even a large gap is not called beyond
    got = paired(_paired_runs([-0.5]), "a", "b")
    assert got["seeds"] == [0] and got["mean"] == pytest.approx(-0.5, abs=1e-12)
    assert got["se"] is None and got["beyond_2se"] is False
    assert paired(_paired_runs([-0.5]), "a", "missing") is None  # no common seed: no comparison
