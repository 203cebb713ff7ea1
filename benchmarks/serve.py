"""Serving throughput and latency: vLLM (CPU backend, the parscale plugin) against our
transformers `generate`, on the same weights, at P = 1, 2, 4 and 1, 8, 32 concurrent requests.

    .venv-serve/bin/python benchmarks/serve.py [--new-tokens 32] [--prompt-tokens 32] [--rounds 2]

Needs the `serve` extra (`make test` builds `.venv-serve`). Each request has the same prompt
length and generates exactly `--new-tokens` tokens (greedy, EOS ignored). vLLM gets all C
requests at once (continuous batching); `generate` gets them as one batch of C rows. Reported:
generated tokens/s over all requests, seconds per generated token seen by one request, and
the KV-cache bytes one request holds (vLLM: its blocks, including the T prefix slots;
transformers: P rows of real tokens, the prefixes being parameters). Medians over rounds.
"""
from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: no spawn start-up per engine
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # the sampler's torch.compile costs a minute on this CPU

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from _result import write_result  # noqa: E402  (benchmarks/_result.py)

from parscale import ParScaleConfig, ParScaleForCausalLM, to_parscale  # noqa: E402
from parscale.machine import describe, header  # noqa: E402

HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB, N_PREFIX, BLOCK = 256, 4, 2, 4, 2048, 48, 32
CONCURRENCY = (1, 8, 32)
STREAMS = (1, 2, 4)


def save_model(directory: Path, n_streams: int) -> None:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                         eos_token_id=None, bos_token_id=None)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    to_parscale(base, ParScaleConfig(n_streams=n_streams, n_prefix_tokens=N_PREFIX)).save_pretrained(directory)


def kv_bytes(n_streams: int, tokens: int, paged: bool) -> int:
    """Keys and values of all layers for one request (float32); paged: whole blocks incl. slots."""
    if paged:
        slots = N_PREFIX if n_streams > 1 else 0
        tokens = math.ceil((tokens + slots) / BLOCK) * BLOCK
    return 2 * LAYERS * n_streams * KV_HEADS * (HIDDEN // HEADS) * 4 * tokens


def time_vllm(llm, prompts, new_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return wall


def time_hf(model, prompts, new_tokens: int) -> float:
    batch = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    wall = time.perf_counter() - start
    assert out.shape[1] == batch.shape[1] + new_tokens
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from vllm import LLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_streams in STREAMS:
            directory = Path(tmp) / f"p{n_streams}"
            save_model(directory, n_streams)
            llm = LLM(model=str(directory), dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
                      gpu_memory_utilization=0.1, max_model_len=512, block_size=BLOCK, max_num_seqs=max(CONCURRENCY),
                      enable_prefix_caching=True, distributed_executor_backend="uni", seed=0)
            model = ParScaleForCausalLM.from_pretrained(directory).eval()
            generator = torch.Generator().manual_seed(n_streams)
            for concurrency in CONCURRENCY:
                prompts = torch.randint(0, VOCAB, (concurrency, args.prompt_tokens), generator=generator).tolist()
                time_vllm(llm, prompts[:1], 2)  # warm-up
                walls = {"vllm": [], "transformers": []}
                for _ in range(args.rounds):  # alternate, so slow phases of a shared machine hit both
                    walls["vllm"].append(time_vllm(llm, prompts, args.new_tokens))
                    walls["transformers"].append(time_hf(model, prompts, args.new_tokens))
                for engine, times in walls.items():
                    wall = statistics.median(times)
                    rows.append(dict(engine=engine, P=n_streams, concurrency=concurrency,
                                     tokens_per_s=concurrency * args.new_tokens / wall,
                                     s_per_token=wall / args.new_tokens,
                                     kv_bytes_per_request=kv_bytes(n_streams, args.prompt_tokens + args.new_tokens,
                                                                   paged=engine == "vllm")))
            llm.llm_engine.engine_core.shutdown()
            del llm

    import vllm

    machine = {**describe(), "vllm": vllm.__version__}
    print(header(machine))
    print(f"{'engine':<13}{'P':>3}{'requests':>10}{'tokens/s':>11}{'s/token':>10}{'KV bytes/request':>18}")
    for r in rows:
        print(f"{r['engine']:<13}{r['P']:>3}{r['concurrency']:>10}{r['tokens_per_s']:>11.1f}"
              f"{r['s_per_token']:>10.4f}{r['kv_bytes_per_request']:>18,d}")
    print(f"1-minute load average {os.getloadavg()[0]:.1f}")
    model = dict(hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, layers=LAYERS, vocab=VOCAB, n_prefix=N_PREFIX,
                 block=BLOCK)
    write_result(Path(__file__).parent / "results" / "serve.json", {"rows": rows, "args": vars(args), "model": model},
                 __file__, machine=machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
