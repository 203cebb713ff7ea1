"""`Qwen2ParScaleForCausalLM` for vLLM: P streams as P groups of attention heads.

Built from vLLM's own Qwen2 pieces (the projections, the rotary embedding, `Attention`, the
MLP, the norms, `Qwen2Model` and the weight loading of `Qwen2ForCausalLM`), so the paged
cache, continuous batching and the attention kernels work unchanged:

- **Streams as heads.** Each of the N scheduled tokens becomes P rows (token-major, row
  `t*P + s`), so the MLPs and projections run on N*P rows. Inside attention the P rows of a
  token are viewed as one token with P*n_heads query heads and P*n_kv KV heads (stream-major
  heads); vLLM's grouped-query rule (query head i reads KV head i // group) then pairs every
  stream's queries with that stream's own KV heads. The KV cache per token grows P times.
- **Prefixes as slots.** vLLM's input processor prepends T slot tokens to every prompt
  (`parscale.serve.plugin`). Positions are shifted back by T, so real tokens get rotary
  positions 0..L-1 as in the released model and the slots get -T..-1; in every layer the
  keys and values of the slots are replaced, after the rotary embedding (the prefixes are
  never rotated) and before the cache write, by the stream's prefix. Causal attention then
  lets every real token see all T prefix entries, exactly like the released model's
  always-visible prefix.
- **Aggregation** after the final norm, before `compute_logits`: `AggregationHead`, the same
  float32 softmax, smoothing and weighted sum as `ParScaleForCausalLM`.
At P = 1 there are no slots, no prefixes and no aggregation: the model is plain Qwen2.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2MLP, Qwen2Model
from vllm.model_executor.models.utils import maybe_prefix
from vllm.transformers_utils.config import set_default_rope_theta

from parscale.errors import UserError
from parscale.model.aggregation import AggregationHead
from parscale.serve import prompts

logger = logging.getLogger(__name__)


class ParScaleQwen2Attention(nn.Module):
    """Qwen2 attention over N*P rows, with one vLLM `Attention` of P*n_heads heads."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.n_streams, self.n_slots = prompts.n_streams(config), prompts.n_prefix_slots(config)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // heads
        self.q_size, self.kv_size = heads * self.head_dim, kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads, bias=True,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   rope_parameters=config.rope_parameters)
        self.attn = Attention(self.n_streams * heads, self.head_dim, self.head_dim**-0.5,
                              num_kv_heads=self.n_streams * kv_heads, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")
        if self.n_slots:  # the released names and shapes: [P, n_kv, T, head_dim]
            shape = (self.n_streams, kv_heads, self.n_slots, self.head_dim)
            self.prefix_k = nn.Parameter(torch.empty(shape), requires_grad=False)
            self.prefix_v = nn.Parameter(torch.empty(shape), requires_grad=False)

    def _slot_rows(self, prefix: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The prefix entry of every row: row `t*P + s` at position p gets prefix[s, :, p + T]."""
        table = prefix.permute(0, 2, 1, 3).flatten(2)  # P T (kv d)
        stream = torch.arange(positions.shape[0], device=positions.device) % self.n_streams  # (N P)
        slot = (positions + self.n_slots).clamp(0, self.n_slots - 1)  # (N P)
        return table[stream, slot]  # (N P) (kv d)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """positions `(N P)` (slots negative), hidden `(N P) H` -> `(N P) H`."""
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions.clamp(min=0), q, k)
        if self.n_slots:
            is_slot = (positions < 0).unsqueeze(-1)  # (N P) 1
            k = torch.where(is_slot, self._slot_rows(self.prefix_k, positions).to(k.dtype), k)
            v = torch.where(is_slot, self._slot_rows(self.prefix_v, positions).to(v.dtype), v)
        rows = q.shape[0]
        tokens = rows // self.n_streams
        out = self.attn(q.reshape(tokens, -1), k.reshape(tokens, -1), v.reshape(tokens, -1))  # N (P heads d)
        output, _ = self.o_proj(out.reshape(rows, self.q_size))  # (N P) H
        return output


class ParScaleQwen2DecoderLayer(Qwen2DecoderLayer):
    """vLLM's Qwen2 decoder layer (its forward as is) with the stream-aware attention."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        nn.Module.__init__(self)  # the parent's __init__ would build a one-stream Attention
        set_default_rope_theta(config, default_theta=1000000)
        self.hidden_size = config.hidden_size
        self.self_attn = ParScaleQwen2Attention(config, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


def _check_parallelism(vllm_config: VllmConfig) -> None:
    if get_tensor_model_parallel_world_size() > 1 or get_pp_group().world_size > 1:
        raise UserError("the ParScale vLLM model runs on one device for now; drop --tensor-parallel-size "
                        "and --pipeline-parallel-size (or set them to 1)")


class ParScaleQwen2ForCausalLM(Qwen2ForCausalLM):
    """`Qwen2ParScaleForCausalLM` checkpoints (the released ones and ours) in vLLM."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config.get_text_config()
        prompts.check_servable(config.to_dict())
        _check_parallelism(vllm_config)
        nn.Module.__init__(self)  # the parent's __init__ would build a one-stream Qwen2Model
        self.config, self.quant_config = config, vllm_config.quant_config
        self.n_streams, self.n_slots = prompts.n_streams(config), prompts.n_prefix_slots(config)
        self.model = Qwen2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                decoder_layer_type=ParScaleQwen2DecoderLayer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        if self.n_slots:
            limit = vllm_config.model_config.max_model_len
            logger.warning("ParScale P=%d: every prompt starts with %d prefix slots, so prompt + output may use "
                           "%d of max_model_len %d tokens", self.n_streams, self.n_slots, limit - self.n_slots, limit)
        if self.n_streams > 1:  # under the released name model.aggregate_layer.{0,2}.*
            self.model.aggregate_layer = AggregationHead(config.hidden_size, self.n_streams,
                                                         float(getattr(config, "parscale_attn_smooth", 0.01)),
                                                         device=vllm_config.device_config.device,
                                                         dtype=vllm_config.model_config.dtype)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        """N scheduled tokens -> N aggregated hidden states; N*P rows inside the decoder."""
        if self.n_streams == 1:
            return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_input_ids(input_ids)  # N H, computed once
        n_streams, tokens = self.n_streams, inputs_embeds.shape[0]
        rows = inputs_embeds.repeat_interleave(n_streams, dim=0)  # (N P) H, row t*P + s
        row_positions = (positions - self.n_slots).repeat_interleave(n_streams)  # (N P), slots < 0
        hidden = self.model(None, row_positions, intermediate_tensors, rows)  # (N P) H, final norm applied
        per_stream = hidden.view(tokens, n_streams, -1).transpose(0, 1).reshape(n_streams * tokens, 1, -1)  # (P N) 1 H
        return self.model.aggregate_layer(per_stream).squeeze(1)  # N H


class UnservableParScaleForCausalLM(Qwen2ForCausalLM):
    """Registered for ParScale checkpoints of other backbones, only to refuse them clearly.

    A causal-LM class (vLLM checks the registered class's interfaces before building it), whose
    construction raises the reason.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        prompts.check_servable(vllm_config.model_config.hf_config.to_dict())
        raise UserError("this ParScale checkpoint cannot be served by the vLLM plugin")
