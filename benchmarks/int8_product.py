"""The few-row products behind `quantize_int8()`: int8 candidates against the float32 and bfloat16 kernel.

    python benchmarks/int8_product.py [--rows 1,2,4,8] [--threads 1,2] [--reps 5] [--matrices 48]
                                      [--shape 2816x1024] [--against REV]

The issue's workload: 48 weight matrices of 2816 x 1024 (as many as the 16-layer decode model's
gate/up/down projections), multiplied by M rows, timed over all 48 in a row. Variants:
`f32` and `bf16` (`kernels.skinny_linear`, the default decode path), `int8` (our int8 kernel,
float32 or bfloat16 activations; "int8 act." rounds them to int8 per row,
`quantize_int8(activation_bits=8)`; "tiles": the weights in tiles of 16 rows, `quantize.tile_weight`,
as `quantize_int8` stores them on AVX-512 VNNI, "rows" as [N, K]) and `torch_int8pack` (`torch._weight_int8pack_mm`, torch's CPU
int8 weight-only kernel). Repetitions are interleaved (each round runs every variant once) and
the table gives the best of the rounds, in ms. `--against REV` adds the same kernels as
they were at git revision REV (that revision's `kernels.py`, `quantize.py` and `csrc/`, rows
marked `@REV`), so a kernel change is measured against its predecessor in one run. Writes
benchmarks/results/int8_product.json.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _result import write_result  # benchmarks/_result.py

from parscale.machine import describe, header

RESULTS = Path(__file__).resolve().parent / "results" / "int8_product.json"


def kernels_at(rev: str):
    """`parscale.model.kernels` and `quantize` as they were at git revision `rev`, Python and C++
    alike (the Python around a product is part of its cost), loaded beside today's modules."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    where = Path(tempfile.mkdtemp(prefix="parscale-at-"))
    (where / "csrc").mkdir()

    def show(path: str) -> str:
        return subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], capture_output=True, text=True,
                              check=True).stdout

    for name in ("skinny_linear.cpp", "int8_linear.cpp", "common.h"):
        (where / "csrc" / name).write_text(show(f"src/parscale/model/csrc/{name}"))
    modules = []
    for name in ("kernels", "quantize"):
        (where / f"{name}.py").write_text(show(f"src/parscale/model/{name}.py"))
        spec = importlib.util.spec_from_file_location(f"parscale_{name}_at", where / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return tuple(modules)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--matrices", type=int, default=48)
    parser.add_argument("--shape", default="2816x1024", help="N x K of each matrix (1024x2816: a down projection)")
    parser.add_argument("--against", metavar="REV", help="also time the kernels of this git revision")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from parscale.model import kernels, quantize

    lib, lib8 = kernels.library(), quantize.library()
    if lib is None or lib8 is None:
        print("the kernels cannot be built here (no C++ compiler)", file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(0)
    n_out, k = (int(v) for v in args.shape.lower().split("x"))
    w32 = [torch.randn(n_out, k, generator=gen) * 0.02 for _ in range(args.matrices)]
    w16 = [w.bfloat16() for w in w32]
    q8 = [quantize.quantize_weight(w) for w in w32]
    s16 = [s.bfloat16() for _, s in q8]
    tiled = [(quantize.tile_weight(q), s) for q, s in q8]
    variants = {
        "f32": lambda x32, x16: [kernels.skinny_linear(x32, w, None, lib) for w in w32],
        "bf16": lambda x32, x16: [kernels.skinny_linear(x16, w, None, lib) for w in w16],
        "int8 (x f32)": lambda x32, x16: [quantize.int8_linear(x32, q, s, None, lib8) for q, s in q8],
        "int8 rows (x bf16)": lambda x32, x16: [quantize.int8_linear(x16, q, s, None, lib8) for q, s in q8],
        "int8 tiles (x bf16)": lambda x32, x16: [quantize.int8_linear(x16, q, s, None, lib8) for q, s in tiled],
        "int8 rows (x bf16, int8 act.)": lambda x32, x16: [quantize.int8_linear(x16, q, s, None, lib8, 8)
                                                           for q, s in q8],
        "int8 tiles (x bf16, int8 act.)": lambda x32, x16: [quantize.int8_linear(x16, q, s, None, lib8, 8)
                                                            for q, s in tiled],
        "torch_int8pack (x f32)": lambda x32, x16: [torch._weight_int8pack_mm(x32, q, s) for q, s in q8],
        "torch_int8pack (x bf16)": lambda x32, x16: [torch._weight_int8pack_mm(x16, q, s) for (q, _), s in zip(q8, s16)],
    }
    if args.against:
        kernels_then, quantize_then = kernels_at(args.against)
        old, old8 = kernels_then.library(), quantize_then.library()
        if old is None or old8 is None:
            print(f"the kernels of {args.against} cannot be built here", file=sys.stderr)
            return 1
        variants.update({
            f"f32 @{args.against}": lambda x32, x16: [kernels_then.skinny_linear(x32, w, None, old) for w in w32],
            f"bf16 @{args.against}": lambda x32, x16: [kernels_then.skinny_linear(x16, w, None, old) for w in w16],
            f"int8 (x bf16) @{args.against}": lambda x32, x16: [quantize_then.int8_linear(x16, q, s, None, old8)
                                                                for q, s in q8],
            f"int8 (x bf16, int8 act.) @{args.against}": lambda x32, x16: [
                quantize_then.int8_linear(x16, q, s, None, old8, 8) for q, s in q8],
        })
    rows = [int(m) for m in args.rows.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    best: dict[tuple, float] = {}
    for rep in range(args.reps):
        for t in threads:
            torch.set_num_threads(t)
            for m in rows:
                x32 = torch.randn(m, k, generator=gen)
                x16 = x32.bfloat16()
                for name, run in variants.items():
                    if rep == 0:
                        run(x32, x16)  # warm-up: first-call dispatch, page faults
                    start = time.perf_counter()
                    run(x32, x16)
                    elapsed = (time.perf_counter() - start) * 1e3
                    best[(name, t, m)] = min(best.get((name, t, m), float("inf")), elapsed)
        print(f"round {rep + 1}/{args.reps} done", file=sys.stderr)
    machine = describe()
    print(header(machine))
    print(f"{args.matrices} matrices of {n_out} x {k}, "
          f"best of {args.reps} interleaved rounds, ms; int8 kernel path: {lib8.isa}")
    width = max(24, *(len(name) for name in variants))
    digits = 1 if args.matrices >= 8 else 3  # one matrix takes tens of microseconds
    print(f"{'variant':<{width}} {'threads':>7} " + " ".join(f"{f'M={m}':>7}" for m in rows))
    for t in threads:
        for name in variants:
            print(f"{name:<{width}} {t:>7} " + " ".join(f"{best[(name, t, m)]:>7.{digits}f}" for m in rows))
    result = {"int8_isa": lib8.isa, "matrices": args.matrices, "shape": [n_out, k], "reps": args.reps,
              "against": args.against,
              "best_ms": [{"variant": n, "threads": t, "rows": m, "ms": v} for (n, t, m), v in best.items()]}
    write_result(args.out, result, __file__, argv, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
