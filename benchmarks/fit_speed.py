"""Speed of the law fit: parscale.law.fitting.fit against the straightforward scipy 300-start loop.

    python benchmarks/fit_speed.py [--repeats 5]

Prints a table and writes benchmarks/results/fit_speed.json. BLAS is pinned to one
thread before numpy loads: scipy's L-BFGS-B calls BLAS on 4-vectors, and on a shared
machine threaded BLAS slows the baseline loop by up to 10x, so pinning is the fair setting.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import minimize  # noqa: E402
from scipy.special import huber  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _result import write_result  # noqa: E402  (benchmarks/_result.py)

from parscale.law import fitting as L  # noqa: E402
from parscale.law.points import load_points  # noqa: E402
from parscale.machine import describe, header  # noqa: E402

DATASETS = ("paper-stack", "paper-pile")


def plain_objective(x, n, p, y) -> float:
    E, A, alpha, k = x
    return float(np.sum(huber(1e-3, np.log(y) - np.log(E + (A * 1e9 / (n * (k * np.log(p) + 1))) ** alpha))))


def scipy_loop(n, p, y):
    """The straightforward procedure: L-BFGS-B, finite differences, default tolerances, 300 starts."""
    grid = list(itertools.product(L.GRID_E, L.GRID_A, L.GRID_ALPHA, L.GRID_K))
    best = None
    with np.errstate(all="ignore"):
        for x0 in tqdm(grid, desc="scipy loop", leave=False):
            r = minimize(plain_objective, x0, args=(n, p, y), method="L-BFGS-B", bounds=[(L.LOWER, None)] * 4)
            if best is None or r.fun < best.fun:
                best = r
    return best


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of our fit (median reported)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fit_speed.json"))
    args = ap.parse_args()
    rows, load_before = [], os.getloadavg()[0]
    for name in DATASETS:
        pts = load_points(name)
        n, p, y = pts.params, pts.streams, pts.loss
        L.fit(n, p, y)  # warm-up: first-call imports and allocations
        t_ours, res = timed(lambda: L.fit(n, p, y), args.repeats)
        t_full, _ = timed(lambda: (L.fit(n, p, y, bootstrap=1000), L.extrapolation_check(n, p, y)), 1)
        t_scipy, ref = timed(lambda: scipy_loop(n, p, y), 1)
        ours = np.array([res.E, res.A, res.alpha, res.k])
        rows.append({
            "data": name, "ours_s": t_ours, "ours_with_bootstrap1000_and_extrapolation_s": t_full,
            "scipy_loop_s": t_scipy, "speedup": t_scipy / t_ours,
            "objective_ours": res.objective, "objective_scipy_loop": float(ref.fun),
            "max_rel_param_diff": float(np.max(np.abs(ours / ref.x - 1))),
            "params_ours": dict(zip(L.NAMES, ours.tolist())), "params_scipy_loop": dict(zip(L.NAMES, ref.x.tolist())),
        })
    total = {k: sum(r[k] for r in rows) for k in ("ours_s", "scipy_loop_s", "ours_with_bootstrap1000_and_extrapolation_s")}
    columns = f"{'data':<12} {'ours (s)':>9} {'+CIs+extrap (s)':>16} {'scipy loop (s)':>15} {'speed-up':>9} " \
             f"{'objective ours':>15} {'objective scipy':>16} {'max rel dparam':>15}"
    machine = describe()
    print(header(machine))
    print(columns)
    print("-" * len(columns))
    for r in rows:
        print(f"{r['data']:<12} {r['ours_s']:>9.3f} {r['ours_with_bootstrap1000_and_extrapolation_s']:>16.3f} "
              f"{r['scipy_loop_s']:>15.2f} {r['speedup']:>8.0f}x {r['objective_ours']:>15.8e} "
              f"{r['objective_scipy_loop']:>16.8e} {r['max_rel_param_diff']:>15.1e}")
    print(f"{'both':<12} {total['ours_s']:>9.3f} {total['ours_with_bootstrap1000_and_extrapolation_s']:>16.3f} "
          f"{total['scipy_loop_s']:>15.2f} {total['scipy_loop_s'] / total['ours_s']:>8.0f}x")
    load = [load_before, os.getloadavg()[0]]
    result = {"rows": rows, "total": total, "repeats": args.repeats, "numpy": np.__version__,
              "load_average_1min": load}
    print(f"1-minute load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} CPUs")
    write_result(args.out, result, __file__, machine=machine)


if __name__ == "__main__":
    main()
