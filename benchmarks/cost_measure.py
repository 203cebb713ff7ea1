"""Predicted against measured memory and decode latency of a real ParScale model on this CPU.

    python benchmarks/cost_measure.py [--threads 1] [--P 1,2,4,8] [--batch-size 1,2,4,8]

Runs `parscale cost measure` (random-weight Qwen2, hidden 1024, 12 layers, float32), prints
the table, and writes benchmarks/results/cost_measure.json with the machine load alongside.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from _result import write_result  # benchmarks/_result.py

from parscale.machine import describe, header

RESULTS = Path(__file__).resolve().parent / "results" / "cost_measure.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--P", default="1,2,4,8")
    parser.add_argument("--batch-size", default="1,2,4,8")
    parser.add_argument("--output-length", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--unpaired", action="store_true", help="one cpu-local profile for all configurations")
    args = parser.parse_args()

    import torch

    from parscale.cli.cost import int_list
    from parscale.cost.measure import MeasureConfig, format_table, run_measurements
    from parscale.cost.hardware import cpu_local, profile_dict

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    hw = cpu_local(refresh=True)
    cfg = MeasureConfig(output_length=args.output_length)
    start = time.perf_counter()
    rows = run_measurements(cfg, int_list(args.P), int_list(args.batch_size), hw, paired=not args.unpaired)
    seconds = time.perf_counter() - start
    machine = describe()
    print(header(machine))
    print(format_table(rows, hw))
    mem_ok = sum(abs(r["memory_error"]) <= 0.10 for r in rows)
    lat_ok = sum(abs(r["latency_error"]) <= 0.30 for r in rows)
    print(f"memory within 10%: {mem_ok}/{len(rows)}; decode latency within 30%: {lat_ok}/{len(rows)}; "
          f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; {seconds:.0f} s")
    result = {
        "config": asdict(cfg), "threads": args.threads, "paired": not args.unpaired, "hardware": profile_dict(hw),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "seconds": seconds, "rows": rows,
    }
    write_result(args.out, result, __file__, machine=machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
