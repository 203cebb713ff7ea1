"""The speed fields of metrics.jsonl: training FLOPs per token and MFU against hand counts of
the micro model's matrices, the peak table, and the fields of a real CPU run."""
from __future__ import annotations

import pytest
import torch
from _trainkit import MICRO, micro_setup, read_metrics, train_in_process
from transformers import Qwen2Config

from parscale.train import convert, throughput

# The micro model by hand: hidden 32, FFN 64, 2 layers, 4 heads of 8, 2 KV heads (16 wide), vocab 320.
LAYER_MACS = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64  # q, k, v, o; gate, up, down = 9216
DECODER = 2 * LAYER_MACS
LM_HEAD = 320 * 32
AGGREGATION = (2 * 32) * 32 + 32 * 2  # Linear(P*h, h), Linear(h, P) at P = 2


def attention_flops(seq_len: int, prefix: int) -> float:
    """Forward attention FLOPs of one token in one stream: 2 layers x (q.k + a.v) x 2 FLOPs x width 32."""
    return 2 * 2 * 2 * 32 * ((seq_len + 1) / 2 + prefix)


def micro(P: int, prefix_tokens: int = 48, train: str = "full", **options):
    fields = {k: v for k, v in MICRO.items() if k != "model_type"}
    model = convert.model_from_scratch(Qwen2Config(**fields), P, prefix_tokens, 0.01, seed=0, **options)
    if train == "streams":
        model.freeze_backbone()
    return model


def test_flops_per_token_match_a_hand_count():
    L = 32
    # P = 2, every weight learns: 3 passes (6 FLOPs per MAC) over the decoder on 2 rows, over
    # lm_head and aggregation once; attention 3 passes on 2 rows over (L+1)/2 keys + 48 prefix slots.
    want = 2 * (6 * DECODER + 3 * attention_flops(L, 48)) + 6 * (LM_HEAD + AGGREGATION)
    assert throughput.training_flops_per_token(throughput.flop_shape(micro(2)), L) == pytest.approx(want, rel=1e-12)
    # The backbone frozen (lm_head tied to the frozen embeddings): its weight gradients are skipped.
    want = 2 * (4 * DECODER + 3 * attention_flops(L, 48)) + 4 * LM_HEAD + 6 * AGGREGATION
    frozen = throughput.flop_shape(micro(2, train="streams"))
    assert throughput.training_flops_per_token(frozen, L) == pytest.approx(want, rel=1e-12)
    # P = 1 is the plain model: no prefix, no aggregation, 6 N + the attention term.
    want = 6 * DECODER + 3 * attention_flops(L, 0) + 6 * LM_HEAD
    assert throughput.training_flops_per_token(throughput.flop_shape(micro(1)), L) == pytest.approx(want, rel=1e-12)


def test_stream_adapters_count_one_streams_slice_per_row():
    """Rank 4 on q, k, v, o: each row runs its own stream's A [4, in] and B [out, 4], i.e. 4 x (in + out)
    multiply-accumulates per projection: 4 x ((32+32) + (32+16) + (32+16) + (32+32)) = 896 per layer."""
    L, adapters = 32, 2 * 896
    want = 2 * (6 * (DECODER + adapters) + 3 * attention_flops(L, 48)) + 6 * (LM_HEAD + AGGREGATION)
    got = throughput.training_flops_per_token(throughput.flop_shape(micro(2, stream_lora_rank=4)), L)
    assert got == pytest.approx(want, rel=1e-12)
    want = 2 * (4 * DECODER + 6 * adapters + 3 * attention_flops(L, 48)) + 4 * LM_HEAD + 6 * AGGREGATION
    got = throughput.training_flops_per_token(throughput.flop_shape(micro(2, train="streams", stream_lora_rank=4)), L)
    assert got == pytest.approx(want, rel=1e-12)  # frozen backbone: the adapters still learn


def test_flops_per_token_agree_with_the_cost_model():
    """The serving-cost model counts training FLOPs from the config alone; full training agrees."""
    from parscale.cost.flops import training_flops
    from parscale.cost.roofline import ModelShape

    shape = ModelShape(layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=320)
    for P, L in ((2, 32), (4, 128)):
        want = training_flops(shape, n_streams=P, tokens=1, seq_len=L, prefix_tokens=48)
        got = throughput.training_flops_per_token(throughput.flop_shape(micro(P)), L)
        assert got == pytest.approx(want, rel=1e-12), (P, L)


def test_mfu_is_the_needed_flops_over_the_peak():
    # 10,000 tokens/s x 6e9 FLOPs per token = 6e13 FLOP/s of a 989.4e12 peak
    assert throughput.mfu(10_000, 6e9, 989.4e12) == pytest.approx(6e13 / 989.4e12, rel=1e-12)
    assert throughput.mfu(10_000, 6e9, 989.4e12) == pytest.approx(0.060643, rel=1e-4)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.05), ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 3090", None), ("Tesla V100-SXM2-16GB", None),
])
def test_known_gpus_have_their_bf16_peak_and_others_none(name, peak):
    assert throughput.known_peak_tflops(name) == peak


def test_the_cpu_has_no_peak_unless_given():
    cpu = torch.device("cpu")
    assert throughput.peak_flops(cpu, bf16=False) is None
    assert throughput.peak_flops(cpu, bf16=True) is None
    assert throughput.peak_flops(cpu, bf16=False, peak_tflops=2.5) == 2.5e12


def test_a_cpu_run_logs_speed_and_memory(tmp_path):
    opts = micro_setup(tmp_path)
    opts.update(P=2, steps=2, eval_every=0, save_every=0)
    train_in_process(out=str(tmp_path / "plain"), **opts)
    train_in_process(out=str(tmp_path / "peak"), peak_tflops=0.5, **opts)
    L = opts["seq_len"]
    flops = 2 * (6 * DECODER + 3 * attention_flops(L, 48)) + 6 * (LM_HEAD + AGGREGATION)
    for run in ("plain", "peak"):
        for record in read_metrics(tmp_path / run):
            assert record["tokens_per_s"] > 0
            assert record["peak_mem_kind"] == "process_max_rss"
            # this process holds torch, a model and a corpus: more than 100 MB, less than the machine
            assert 0.1 < record["peak_mem_gb"] < 1e3
            if run == "plain":
                assert "mfu" not in record  # no known peak for a CPU: none is invented
            else:
                assert record["mfu"] == pytest.approx(record["tokens_per_s"] * flops / 0.5e12, rel=1e-9)
