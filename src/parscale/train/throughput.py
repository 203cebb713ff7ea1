"""What `metrics.jsonl` says about speed: model FLOPs utilisation and peak memory.

MFU is the training FLOPs the model needs per second, at the measured tokens/s, over the
device's peak (PaLM, Chowdhery et al. 2022, appendix B): recomputation under
`--grad-checkpoint` is not counted, so MFU is the share of the device that did useful work.
The FLOPs per token count every matrix multiply once per row it runs on, as the package's
serving-cost model does (`cost/flops.py`, which training may not import):

- forward: 2 FLOPs per multiply-accumulate. The decoder's matrices run on all P rows, the
  aggregation head and the lm_head once per token. Attention adds q·k and a·v over the keys
  a token sees: on average (L+1)/2 in a causal window of L, plus the prefix.
- backward: the activations' gradient costs as much as the forward again, and so does the
  weights' gradient where the weights learn (a frozen backbone skips it). The whole step is
  the familiar 6·N per token plus the attention term (Kaplan et al. 2020, section 2.1;
  nanoGPT's `estimate_mfu`).

The peak is that of the precision the step runs in: a table of known GPUs' dense bfloat16
peaks under bf16 autocast, or `--peak-tflops`. Without either (the CPU, a float32 run, an
unknown GPU) the record has no `mfu` rather than an invented one.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass

import torch

# Dense (no sparsity) bfloat16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s, matched
# against `torch.cuda.get_device_name` in order (the first match wins).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH[12]00\b.*\bNVL\b", 835.5),      # H100 NVL, H200 NVL
    (r"\bH100\b.*\bPCIe\b", 756.0),        # H100 PCIe
    (r"\bGH200\b|\bH200\b|\bH100\b", 989.4),  # H100 SXM, H200 SXM, GH200
    (r"\bA100\b", 312.0),                  # A100 SXM and PCIe
    (r"\bL40S\b", 362.05),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),                   # not the A10G, whose peak is not published
)


@dataclass(frozen=True)
class FlopShape:
    """What the FLOPs of one token depend on, read off a model by `flop_shape`.

    `row_*` are multiply-accumulates of one token in one stream (the decoder's matrices),
    `token_*` those once per token (lm_head, aggregation); each split into trainable and frozen."""

    row_trainable: int
    row_frozen: int
    token_trainable: int
    token_frozen: int
    layers: int
    attention_width: int  # query heads x head dim
    prefix_tokens: int    # 0 without prefixes
    n_streams: int


def training_flops_per_token(s: FlopShape, seq_len: int) -> float:
    """FLOPs of one training token (forward and backward) at sequence length `seq_len`."""
    keys = (seq_len + 1) / 2 + s.prefix_tokens
    attention = s.layers * 2 * 2 * s.attention_width * keys  # forward: q·k and a·v, 2 FLOPs per MAC
    row = 6 * s.row_trainable + 4 * s.row_frozen + 3 * attention  # fwd + activation grads (+ weight grads)
    return float(s.n_streams * row + 6 * s.token_trainable + 4 * s.token_frozen)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the FLOP/s the measured tokens/s needed, over the peak FLOP/s."""
    return tokens_per_s * flops_per_token / peak_flops


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def flop_shape(model: torch.nn.Module) -> FlopShape:
    """The `FlopShape` of a causal LM (ours or a plain transformers one): every `nn.Linear`
    weight inside a decoder layer runs per stream row, every other one (lm_head, aggregation)
    per token; the prefix encoder runs once per step, not per token, and is left out. A stream
    adapter (`stream_lora_A`/`_B`, `[P, ...]`) runs one stream's slice per row: 1/P of it."""
    cfg = model.config
    layers = _decoder_layers(model)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    counts = {"row": [0, 0], "token": [0, 0]}  # [trainable, frozen]
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[0] == "prefix_encoder":
            continue
        where = "row" if id(module) in in_layers else "token"
        counts[where][0 if module.weight.requires_grad else 1] += module.weight.numel()
    for name, param in model.named_parameters():
        if ".stream_lora_" in name:
            counts["row"][0 if param.requires_grad else 1] += param[0].numel()
    pcfg = getattr(model, "parscale_config", None)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return FlopShape(row_trainable=counts["row"][0], row_frozen=counts["row"][1],
                     token_trainable=counts["token"][0], token_frozen=counts["token"][1],
                     layers=len(layers), attention_width=heads * head_dim,
                     prefix_tokens=pcfg.n_prefix_tokens if pcfg is not None and pcfg.has_prefixes else 0,
                     n_streams=pcfg.n_streams if pcfg is not None else 1)


def peak_flops(device: torch.device, bf16: bool, peak_tflops: float | None = None) -> float | None:
    """The device's peak FLOP/s: `peak_tflops` if given, else the table's bfloat16 peak for a
    known GPU under bf16 autocast, else None (no MFU is logged)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda" or not bf16:
        return None
    known = known_peak_tflops(torch.cuda.get_device_name(device))
    return None if known is None else known * 1e12


def known_peak_tflops(device_name: str) -> float | None:
    """The table's dense bfloat16 peak for a GPU name, or None."""
    return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.search(pattern, device_name)), None)


def peak_memory(device: torch.device) -> dict[str, float | str]:
    """`peak_mem_gb` (10^9 bytes) and `peak_mem_kind`: on CUDA the most the caching allocator
    held for tensors since the start (`cuda_max_allocated`); elsewhere the process's peak
    resident memory (`process_max_rss`: the model, the data and Python itself)."""
    if device.type == "cuda":
        return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9, "peak_mem_kind": "cuda_max_allocated"}
    try:
        import resource
    except ImportError:  # Windows
        return {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"peak_mem_gb": rss * scale / 1e9, "peak_mem_kind": "process_max_rss"}


class Speedometer:
    """The speed fields of each update's record: `tokens_per_s`, `mfu` (with a known peak) and
    the peak memory (`peak_mem_gb`, `peak_mem_kind`)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, seq_len: int, *, tokens_per_update: int,
                 world_size: int, peak_flops: float | None) -> None:
        self.device, self.tokens = device, tokens_per_update  # over all ranks
        self.peak = None if peak_flops is None else peak_flops * world_size  # every rank on a device alike
        self.flops_per_token = training_flops_per_token(flop_shape(model), seq_len)

    def record(self, t0: float) -> dict[str, float | str]:
        """The fields of the update that began at `time.perf_counter()` = `t0`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the update's kernels, not just their launch
        tok_s = self.tokens / max(time.perf_counter() - t0, 1e-9)
        out: dict[str, float | str] = {"tokens_per_s": tok_s}
        if self.peak is not None:
            out["mfu"] = mfu(tok_s, self.flops_per_token, self.peak)
        return {**out, **peak_memory(self.device)}
