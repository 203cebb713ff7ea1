"""One prepared run on a CUDA GPU: the CUDA tests, a training step and decoding, against plain transformers.

    python benchmarks/gpu.py                      # everything, within --budget-s seconds
    python benchmarks/gpu.py --only decode        # some sections: tests, train, decode
    python benchmarks/gpu.py --dry-run            # a tiny version on the CPU (the test suite runs this)

Sections, each written to `OUT/gpu_<section>.json` as soon as it ends (a run stopped by its
time limit keeps what it finished; a section that fails records its error and the others go on):
- tests: `pytest -m cuda` on the model's and the trainer's CUDA tests.
- train: one optimizer update (forward, backward, fused AdamW) of a random Qwen2 shaped like
  Qwen2.5-0.5B, bfloat16 autocast, at L = 2048 and 4096: P = 1, 2, 4, 8 at batch B against the
  plain transformers model at batch P*B (the same backbone rows): step time, tokens/s, model
  FLOPs utilisation, peak memory.
- decode: batch 1, 8, 64 x P = 1, 2, 4, 8 (and the plain model at P = 1), eager and compiled
  (static cache, `torch.compile`, CUDA graphs), bfloat16: ms/token and x the HBM floor, the
  bytes one step must read over the copy bandwidth measured in the same run. Compiled rows come
  in order of the goals (batch 1 first), each compiling its own graph.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config
from transformers.generation.streamers import BaseStreamer

from parscale.atomic import atomic_write_json
from parscale.machine import describe, gpu_info, header
from parscale.model.config import ParScaleConfig
from parscale.model.decoding import compiled_generate_kwargs
from parscale.model.wrapper import to_parscale

ROOT = Path(__file__).resolve().parent.parent
CUDA_TESTS = ["tests/model/test_cuda.py", "tests/train/test_cuda_train.py"]
# Qwen2.5-0.5B's shape (tied embeddings), random weights
FULL = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
            intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
            rope_theta=1_000_000.0)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512)
# dense bfloat16 peak by the vendor's datasheet (SXM parts), for the MFU column
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


class Deadline:
    """The run's time budget: each measurement asks before it starts."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def device_info(device: torch.device) -> dict:
    """parscale.machine.describe() (the CPU, torch, Python) with the GPU measured (None on the CPU)."""
    info = {**describe(), "transformers": transformers.__version__}
    info["host_cpu"] = info["cpu"]["name"]  # the key of the first results
    info["gpu"] = gpu_info(device.index or 0) if device.type == "cuda" else None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float) -> float:
    """Bytes/s of a device-to-device copy, counting the bytes read and written (best of 5)."""
    src = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * int(gib * 2**30) / best


def build_base(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=dtype, attn_implementation="sdpa")
    return model


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ----------------------------------------------------------------------------- training
def train_flops_per_token(shape: dict, seq_len: int) -> float:
    """6 x the matmul parameters (non-embedding + the lm_head product) plus causal attention,
    6 x layers x L x (heads x head_dim) per token (forward 2 L d halved by causality, backward 2x)."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    heads, kv, inter, vocab = (shape["num_attention_heads"], shape["num_key_value_heads"],
                               shape["intermediate_size"], shape["vocab_size"])
    d = h // heads
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter
    return 6 * (layers * per_layer + vocab * h) + 6 * layers * seq_len * heads * d


def time_updates(model, ids: torch.Tensor, device: torch.device, warmup: int, steps: int) -> dict:
    """Seconds per update (median) and peak memory of forward, backward and a fused AdamW step."""
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    free(device)
    times = []
    for step in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    out = {"step_s": statistics.median(times), "peak_gib": peak_memory(device), "loss": loss.item()}
    del optimizer
    return out


def train_section(args, device: torch.device, deadline: Deadline) -> dict:
    shape, rows_per_stream = (TINY, 1) if args.dry_run else (FULL, args.batch)
    lengths = [64, 128] if args.dry_run else [2048, 4096]
    streams = [1, 2] if args.dry_run else [1, 2, 4, 8]
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    rows = []
    for n_streams in streams:
        if deadline.left() < 20:
            rows.append({"P": n_streams, "skipped": "time budget"})
            continue
        model = build_base(shape, torch.float32, device).train()
        measured = {}
        for kind in ("plain", "parscale"):
            if kind == "parscale":  # the same backbone, now with P streams
                model = to_parscale(model, ParScaleConfig(n_streams)).train()
            for length in lengths:
                batch = rows_per_stream * (n_streams if kind == "plain" else 1)
                ids = torch.randint(2, shape["vocab_size"], (batch, length), device=device)
                try:
                    result = time_updates(model, ids, device, args.warmup, args.steps)
                except Exception as error:  # e.g. out of memory: record it, keep the other rows
                    rows.append({"kind": kind, "P": n_streams, "L": length, "error": repr(error)[:2000]})
                    print(f"  train {kind} P={n_streams} L={length}: FAILED {error!r}"[:400], flush=True)
                    model.zero_grad(set_to_none=True)
                    free(device)
                    continue
                backbone_tokens = n_streams * rows_per_stream * length  # rows the backbone runs
                flops = train_flops_per_token(shape, length) * backbone_tokens
                result.update(kind=kind, P=n_streams, L=length, batch=batch,
                              backbone_tokens_per_s=backbone_tokens / result["step_s"],
                              tokens_per_s=batch * length / result["step_s"],
                              mfu=flops / result["step_s"] / peak if peak else None)
                measured[(kind, length)] = result
                rows.append(result)
                print(f"  train {kind:8s} P={n_streams} L={length} batch={batch}: {result['step_s'] * 1e3:8.1f} ms, "
                      f"peak {result['peak_gib'] or 0:.1f} GiB", flush=True)
        for length in lengths:
            if ("parscale", length) not in measured or ("plain", length) not in measured:
                continue
            ours, plain = measured[("parscale", length)], measured[("plain", length)]
            ours["x_plain_time"] = ours["step_s"] / plain["step_s"]
            if ours["peak_gib"] and plain["peak_gib"]:
                ours["x_plain_memory"] = ours["peak_gib"] / plain["peak_gib"]
        del model
        free(device)
    return {"shape": shape, "rows_per_stream": rows_per_stream, "peak_bf16_flops": peak, "rows": rows}


# ----------------------------------------------------------------------------- decoding
class StepClock(BaseStreamer):
    """`generate` hands every new token to its streamer (after a device sync): the time between
    two calls is one decode step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_s(self, skip: int) -> float:
        gaps = [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])][skip:]  # stamps[0]: the prompt
        return statistics.median(gaps)


def step_bytes(model, shape: dict, rows: int, context: float) -> float:
    """The bytes one decode step must read: every parameter once (the tied lm_head reads the whole
    embedding table; the prefixes are parameters) and the real tokens' KV cache of `rows` rows at
    the mean context. A static cache's attention reads its whole length: that is above the floor."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    d = shape["hidden_size"] // shape["num_attention_heads"]
    per_token = shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * d * 2  # bfloat16 K and V
    return weights + per_token * rows * context


def decode_row(model, batch: int, n_streams: int, compiled: bool, args, device: torch.device,
               fullgraph: bool = True) -> dict:
    ids = torch.randint(2, model.config.vocab_size, (batch, args.prompt), device=device,
                        generator=torch.Generator(device).manual_seed(batch))
    clock = StepClock()
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=0, streamer=clock)
    if compiled:
        kwargs.update(compiled_generate_kwargs(device))
        kwargs["compile_config"].fullgraph = fullgraph
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    total = time.perf_counter() - start
    return {"batch": batch, "P": n_streams, "compiled": compiled, "ms_per_token": clock.step_s(args.skip) * 1e3,
            "call_s": total, **({"fullgraph": fullgraph} if compiled else {})}


def decode_section(args, device: torch.device, deadline: Deadline, bandwidth: float) -> dict:
    shape = TINY if args.dry_run else FULL
    batches = [1, 2] if args.dry_run else [1, 8, 64]
    streams = [1, 2] if args.dry_run else [1, 2, 4, 8]
    dtype = torch.bfloat16
    models = {}
    base = build_base(shape, dtype, device).eval()
    models["plain"] = (base, 1)
    for n_streams in streams:  # each wraps its own copy of one random backbone
        models[f"P{n_streams}"] = (to_parscale(build_base(shape, dtype, device).eval(), ParScaleConfig(n_streams)).eval(),
                                   n_streams)
    # eager everywhere first, then compiled in the order of the goals (batch 1 first)
    plan = [(name, batch, False) for batch in batches for name in models]
    order = ["P1", f"P{streams[-1]}", "plain"] + [f"P{p}" for p in streams[1:-1]]
    # the dry run compiles nothing (a minute per graph on a small CPU; tests/model/test_prefix_attention.py
    # checks compiled decoding there)
    plan += [] if args.dry_run else [(name, batch, True) for batch in batches for name in order]
    rows, broken = [], set()  # models whose full-graph compile failed: compiled with graph breaks after
    for name, batch, compiled in plan:
        model, n_streams = models[name]
        if deadline.left() < (90 if compiled else 10):
            rows.append({"model": name, "batch": batch, "compiled": compiled, "skipped": "time budget"})
            continue
        try:
            row = decode_row(model, batch, n_streams, compiled, args, device, fullgraph=name not in broken)
        except Exception as error:  # one row's failure (e.g. a graph break) must not lose the others
            rows.append({"model": name, "batch": batch, "compiled": compiled, "error": repr(error)[:2000]})
            print(f"  decode {name} batch={batch} compiled={compiled}: FAILED {error!r}"[:400], flush=True)
            if compiled:
                broken.add(name)
                torch._dynamo.reset()
            continue
        rows_in_backbone = batch * n_streams
        need = step_bytes(model, shape, rows_in_backbone, args.prompt + args.new_tokens / 2)
        row.update(model=name, step_bytes=need, floor_ms=need / bandwidth * 1e3)
        row["x_floor"] = row["ms_per_token"] / row["floor_ms"]
        rows.append(row)
        print(f"  decode {name:5s} batch={batch:3d} {'compiled' if compiled else 'eager   '}: "
              f"{row['ms_per_token']:7.2f} ms/token, {row['x_floor']:5.1f}x floor (call {row['call_s']:.1f} s)",
              flush=True)
    return {"shape": shape, "dtype": "bfloat16", "prompt": args.prompt, "new_tokens": args.new_tokens,
            "bandwidth_bytes_per_s": bandwidth, "rows": rows}


# ----------------------------------------------------------------------------- tests
def tests_section(args, deadline: Deadline) -> dict:
    """`pytest -m cuda` in a child process (its own CUDA context), limited by the budget."""
    files = [f for f in CUDA_TESTS if (ROOT / f).is_file()]
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *files]
    if args.dry_run:
        command += ["--co"]  # collect only: without a GPU they skip anyway
    limit = max(30.0, min(args.tests_s, deadline.left() - 60))
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as stop:
        output, code = (stop.stdout or b"").decode() if isinstance(stop.stdout, bytes) else (stop.stdout or ""), "timeout"
    print(output[-3000:], flush=True)
    summary = [line for line in output.splitlines() if " passed" in line or " failed" in line or " error" in line]
    return {"command": " ".join(command[2:]), "exit_code": code, "summary": summary[-1:] or None,
            "output_tail": output[-6000:]}


# ----------------------------------------------------------------------------- tables
def print_tables(results: dict, info: dict) -> None:
    print(f"\n{header(info)}")
    train = results.get("train", {}).get("rows", [])
    if train:
        print("\ntraining step, bfloat16 autocast, fused AdamW")
        print(f"{'kind':9s} {'P':>2s} {'L':>5s} {'batch':>5s} {'ms/step':>9s} {'tok/s':>10s} {'MFU':>6s} "
              f"{'peak GiB':>9s} {'x plain t':>9s} {'x plain mem':>11s}")
        for r in train:
            if "step_s" not in r:
                print(f"P={r.get('P')}: {r.get('skipped') or r.get('error')}")
                continue
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
            print(f"{r['kind']:9s} {r['P']:2d} {r['L']:5d} {r['batch']:5d} {r['step_s'] * 1e3:9.1f} "
                  f"{r['tokens_per_s']:10,.0f} {mfu:>6s} {r['peak_gib'] or 0:9.2f} "
                  f"{r.get('x_plain_time', float('nan')):9.3f} {r.get('x_plain_memory', float('nan')):11.3f}")
    decode = results.get("decode", {}).get("rows", [])
    if decode:
        print("\ndecoding, bfloat16, ms/token (x HBM floor)")
        for r in decode:
            if "ms_per_token" in r:
                print(f"{r['model']:5s} batch={r['batch']:3d} {'compiled' if r['compiled'] else 'eager   '} "
                      f"{r['ms_per_token']:8.2f} ms ({r['x_floor']:.1f}x floor)")
            else:
                print(f"{r['model']:5s} batch={r['batch']:3d} compiled={r['compiled']}: "
                      f"{r.get('skipped') or r.get('error')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for gpu_*.json")
    parser.add_argument("--only", default="tests,train,decode", help="sections, comma-separated")
    parser.add_argument("--budget-s", type=float, default=270, help="stop starting new measurements after this")
    parser.add_argument("--tests-s", type=float, default=120, help="time limit of the CUDA tests")
    parser.add_argument("--dry-run", action="store_true", help="a tiny version on the CPU")
    parser.add_argument("--batch", type=int, default=1, help="training rows per stream (default 1)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32, help="decode prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=40, help="decode tokens per call")
    parser.add_argument("--skip", type=int, default=8, help="decode steps left out of the median (warm-up)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.warmup, args.steps, args.prompt, args.new_tokens, args.skip = 1, 1, 8, 6, 1
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        print("no CUDA GPU here: run with --dry-run for the CPU version", file=sys.stderr)
        return 2
    deadline = Deadline(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = device_info(device)
    print(f"{header(info)}; torch {info['torch']}, transformers {info['transformers']}", flush=True)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    results: dict = {}
    bandwidth = copy_bandwidth(device, 0.01 if args.dry_run else 2.0)
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + written)", flush=True)
    for section in sections:
        start = time.perf_counter()
        print(f"== {section}", flush=True)
        try:
            if section == "tests":
                results[section] = tests_section(args, deadline)
            elif section == "train":
                results[section] = train_section(args, device, deadline)
            elif section == "decode":
                results[section] = decode_section(args, device, deadline, bandwidth)
            else:
                raise ValueError(f"unknown section {section!r}; use tests, train, decode")
        except Exception as error:  # keep the other sections' results
            traceback.print_exc()
            results[section] = {"error": repr(error)[:2000], "traceback": traceback.format_exc()[-6000:]}
        results[section].update(device=info, seconds=time.perf_counter() - start, dry_run=args.dry_run,
                                copy_bandwidth_bytes_per_s=bandwidth)
        name = out / f"gpu_{section}{'_dry' if args.dry_run else ''}.json"
        atomic_write_json(name, json.loads(json.dumps(results[section], default=str)))
        print(f"wrote {name}", flush=True)
    print_tables(results, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
