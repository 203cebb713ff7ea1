"""`parscale data prepare` on synthetic corpora: peak memory against corpus size, and throughput.

    python benchmarks/data_prepare.py                       # 0.25, 1 and 4 GB corpora
    python benchmarks/data_prepare.py --sizes-gb 0.01 0.04 0.16 --ratio-gb 0.01

The corpora (JSON Lines, ~4 KB English-like documents drawn from a Zipf vocabulary of
made-up words) and a 8,192-token byte-level BPE are made in a temporary directory outside
the project, which is deleted at the end (`--workdir` to choose it, `--keep` to keep it).

Three measurements, each a fresh `parscale data prepare` process:
- memory: peak RSS of the whole process tree (the prepare and its workers, summed, sampled
  every 0.1 s from /proc) for each corpus size, with 2 workers;
- scaling: tokens/s with 1 and with 2 workers on the `--ratio-gb` corpus;
- reference: `tokenizers`' own `encode_batch` on one thread over the same documents (the
  text already in memory, only the encoding timed), in a fresh process.
The throughput runs alternate (1 worker, 2 workers, reference) `--repeats` times and the
best of each is quoted, so that one slow moment on a shared machine does not decide a ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_prepare.json"
_LETTERS = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))


def make_pool(n_docs: int, seed: int = 0) -> list[str]:
    """Distinct documents of ~4 KB: Zipf-distributed words over a 50k made-up vocabulary."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 11, size=50_000)
    words = ["".join(rng.choice(_LETTERS, size=n)) for n in lengths]
    docs = []
    for _ in range(n_docs):
        ids = np.minimum(rng.zipf(1.3, size=700), len(words)) - 1
        text = " ".join(words[i] for i in ids)
        docs.append(". ".join(text[i:i + 90].capitalize() for i in range(0, len(text), 90)) + ".\n")
    return docs


def write_corpus(path: Path, pool: list[str], target_bytes: int) -> int:
    """JSON Lines of pool documents, each made unique by a first line, up to `target_bytes`."""
    lines = [json.dumps({"text": d}) for d in pool]
    written, i = 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target_bytes:
            row = lines[i % len(lines)]
            line = '{"text": "document %d\\n' % i + row[len('{"text": "'):] + "\n"
            fh.write(line)
            written += len(line)
            i += 1
    return i


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def run_prepare(corpus: Path, tok: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "parscale", "data", "prepare", "--data-files", str(corpus), "--data-tokenizer",
           str(tok), "--out", str(out), "--workers", str(workers), "--json"]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT / "src")}
    t0, peak = time.perf_counter(), 0
    with tempfile.TemporaryFile("w+") as out_fh, tempfile.TemporaryFile("w+") as err_fh:
        proc = subprocess.Popen(cmd, stdout=out_fh, stderr=err_fh, text=True, env=env)
        while True:  # wait4 gives the CPU time of the prepare and the workers it reaped
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_fh.seek(0), err_fh.seek(0)
        stdout, stderr = out_fh.read(), err_fh.read()
    if proc.returncode:
        raise SystemExit(f"prepare failed:\n{stderr}")
    result = json.loads(stdout)
    tokens = sum(s["tokens"] for s in result["splits"].values())
    shutil.rmtree(out)
    return {"workers": workers, "wall_s": time.perf_counter() - t0, "prepare_s": result["seconds"],
            "cpu_s": usage.ru_utime + usage.ru_stime, "tokens": tokens,
            "tokens_per_s": tokens / result["seconds"], "peak_rss_mb": peak / 2**20}


_REFERENCE = r"""
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
texts = [json.loads(line)["text"] for line in open(sys.argv[1], encoding="utf-8")]
t0, c0, n = time.perf_counter(), time.process_time(), 0
for i in range(0, len(texts), 256):
    n += sum(len(e.ids) + 1 for e in tok.encode_batch(texts[i:i + 256], add_special_tokens=False))
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}))
"""


def run_reference(corpus: Path, tok: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _REFERENCE, str(corpus), str(tok / "tokenizer.json")],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    return {**r, "tokens_per_s": r["tokens"] / r["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-gb", type=float, nargs="*", default=[0.25, 1.0, 4.0],
                    help="corpus sizes of the memory runs (none: throughput only)")
    ap.add_argument("--ratio-gb", type=float, default=0.25, help="corpus size of the throughput runs")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="where corpora go (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the corpora")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from _result import write_result  # benchmarks/_result.py

    from parscale.data.tokenizer import train_bpe
    from parscale.machine import describe, header

    work = Path(args.workdir or tempfile.mkdtemp(prefix="parscale-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        pool = make_pool(4000)
        tok = work / "tok"
        train_bpe(pool[:1000], 8192).save_pretrained(tok)
        rows = []
        for gb in sorted(set(args.sizes_gb) | {args.ratio_gb}):
            corpus = work / f"corpus-{gb:g}gb.jsonl"
            docs = write_corpus(corpus, pool, int(gb * 1e9))
            rows.append({"gb": gb, "bytes": corpus.stat().st_size, "docs": docs, "corpus": corpus})
        memory = []
        for row in rows:
            if row["gb"] in args.sizes_gb:
                r = run_prepare(row["corpus"], tok, work / "out", workers=2)
                memory.append({"gb": row["gb"], "docs": row["docs"], **r})
                print(f"{row['gb']:>6g} GB  {r['prepare_s']:8.1f} s  {r['tokens_per_s']:>10,.0f} tok/s  "
                      f"peak RSS {r['peak_rss_mb']:7.1f} MB", flush=True)
        ratio_corpus = next(r["corpus"] for r in rows if r["gb"] == args.ratio_gb)
        names = ("1 worker", "2 workers", "tokenizers encode_batch, 1 thread")
        runs: dict[str, list] = {name: [] for name in names}
        for _ in range(args.repeats):
            runs[names[0]].append(run_prepare(ratio_corpus, tok, work / "out", 1))
            runs[names[1]].append(run_prepare(ratio_corpus, tok, work / "out", 2))
            runs[names[2]].append(run_reference(ratio_corpus, tok))
        best = {k: max(r["tokens_per_s"] for r in v) for k, v in runs.items()}
        # Tokens per CPU-second (all processes of a prepare, main and workers) do not depend on
        # how much of the machine other work takes: the fair per-core comparison.
        per_cpu = {k: max(r["tokens"] / r["cpu_s"] for r in v) for k, v in runs.items()}
        ratios = {"2 workers / 1 worker (wall)": best[names[1]] / best[names[0]],
                  "1 worker / tokenizers (wall)": best[names[0]] / best[names[2]],
                  "1 worker / tokenizers (per CPU-second)": per_cpu[names[0]] / per_cpu[names[2]]}
        growth = memory[-1]["peak_rss_mb"] / memory[0]["peak_rss_mb"] - 1 if len(memory) > 1 else 0.0
        machine = describe()
        print(f"\n{header(machine)}\n| corpus | seconds | tokens/s | peak RSS (MB) |\n|---|---|---|---|")
        for m in memory:
            print(f"| {m['gb']:g} GB | {m['prepare_s']:.1f} | {m['tokens_per_s']:,.0f} | {m['peak_rss_mb']:.0f} |")
        print(f"\npeak RSS growth, smallest to largest: {100 * growth:+.1f}%")
        for name, values in runs.items():
            each = ", ".join(f"{v['tokens_per_s']:,.0f}" for v in values)
            print(f"{name:<36} best {best[name]:>10,.0f} tok/s, {per_cpu[name]:>10,.0f} tok per CPU-s  (runs: {each})")
        for name, value in ratios.items():
            print(f"{name:<40} {value:.2f}x")
        load = os.getloadavg()
        print(f"1-minute load average {load[0]:.1f} on {os.cpu_count()} CPUs")
        command = " ".join(a for i, a in enumerate(sys.argv) if "--workdir" not in sys.argv[max(i - 1, 0):i + 1])
        results = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not memory else {}
        results.pop("cpu", None)  # the CPU as results before parscale.machine named it
        if memory:  # a throughput-only run (no --sizes-gb) keeps the last memory table
            results.update(memory_command=command, memory=memory, rss_growth=growth)
        results.update(command=command, load_average=load, throughput=runs, best=best, tokens_per_cpu_s=per_cpu,
                       ratios=ratios)
        write_result(RESULTS, results, __file__, machine=machine)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
