"""`ParScaleForCausalLM`: replicate -> shared backbone -> per-stream final norm -> aggregate -> lm_head.

The wrapper adopts the backbone's decoder (`self.model`) and lm_head (`self.lm_head`), so its
state-dict keys are the backbone's own (`model.layers.*`, `lm_head.weight`) plus the stream
parameters under the released names (`model.layers.{i}.self_attn.prefix_k/prefix_v`,
`model.aggregate_layer.{0,2}.*`). `generate` only ever sees B rows: the wrapper takes B rows,
runs P*B rows through the backbone (the cache holds P*B rows of real tokens) and returns B
rows of logits, so greedy, sampling and static-cache decoding work unchanged. `base_model` is
the same body without the head (B rows of aggregated hidden states), which is what TRL's fused
LM head runs, so transformers' Trainer and TRL's SFTTrainer train it like any causal LM.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from parscale.model import adapters, format as checkpoint_format, introspect, kernels, options, quantize, streams
from parscale.model import decode_layer, kv_cache, norms, stream_lora
from parscale.model import prefix_attention
from parscale.model.cache_api import OUTPUT_FIELD, cache_kwargs, output_cache
from parscale.model.aggregation import AggregationHead
from parscale.model.auto import Qwen2ParScaleConfig
from parscale.model.config import ParScaleConfig
from parscale.errors import UserError

logger = logging.getLogger(__name__)


def _repeat_rows(tensor: torch.Tensor | None, n_streams: int, batch: int, what: str) -> torch.Tensor | None:
    """`b ... -> (n b) ...` for per-sample inputs; a broadcast row (size 1) is left alone."""
    if tensor is None or n_streams == 1:
        return tensor
    if tensor.shape[0] == 1 and batch != 1:
        return tensor
    if tensor.shape[0] != batch:
        raise UserError(f"{what} has {tensor.shape[0]} rows but the input has {batch}; pass one row per sample")
    return tensor.repeat(n_streams, *([1] * (tensor.dim() - 1)))  # (n b) ...


def _positions_from_mask(mask: torch.Tensor, new_tokens: int, cache) -> torch.LongTensor:
    """The positions of the new tokens, counting real tokens only, from a 2D padding mask over the
    cached and the new tokens.

    Rotary scores between real tokens ignore a shift of every position, but a query's score
    against the (unrotated) prefix does not: left padding must not move the positions, so they
    count real tokens, as generate's do (Trainer and hand-written decoding loops pass none).
    A cached call derives them the same way, from the mask's last `new_tokens` columns."""
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    if mask.shape[1] != past + new_tokens:
        raise UserError(f"the attention mask has {mask.shape[1]} columns, but the cache holds {past} tokens and "
                        f"{new_tokens} are new; pass a mask over the cached and the new tokens ({past + new_tokens} "
                        "columns), or pass position_ids")
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # b (past + s)
    return positions[:, past:]  # b s


# Keywords transformers' Trainer passes for the loss only; the backbone never sees them.
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


class ParScaleBody:
    """`model.base_model`: calling it runs the ParScale body (see `ParScaleForCausalLM.base_model`).

    A plain object, not a module, so the state dict and the module tree stay the released ones;
    attribute reads go to the shared decoder."""

    def __init__(self, model: "ParScaleForCausalLM") -> None:
        self._parscale = model

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                 use_cache=None, past_key_values=None, **kwargs) -> BaseModelOutputWithPast:
        for key in _LOSS_KWARGS:
            kwargs.pop(key, None)
        hidden, outputs = self._parscale._body(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                               use_cache, past_key_values, **kwargs)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,  # b s h: aggregated over the streams, ready for lm_head
            **{OUTPUT_FIELD: output_cache(outputs)},
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    forward = __call__

    def __getattr__(self, name: str):
        if name == "_parscale":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self._parscale.model, name)


class ParScaleForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM with P parallel streams; build it with `to_parscale` or `from_pretrained`.

    >>> model = to_parscale(AutoModelForCausalLM.from_config(cfg), ParScaleConfig(n_streams=4))
    >>> model(input_ids).logits.shape   # [B, L, V]
    """

    _supports_sdpa = True
    _supports_attention_backend = True
    _supports_flash_attn = True  # `prefix_attention.flash_attention`, where flash-attn is installed
    _supports_flex_attn = False
    supports_gradient_checkpointing = True
    base_model_prefix = "model"

    def __init__(self, base: PreTrainedModel, parscale_config: ParScaleConfig) -> None:
        introspect.check_supported(base)
        prefix_attention.implementation_for(base.config._attn_implementation)  # e.g. flash-attn missing: one line
        super().__init__(base.config)
        self.parscale_config = parscale_config
        # Stream sets (adapters): the inactive ones live here, outside the module tree.
        self._plain_attention = prefix_attention.plain_kind(base.config._attn_implementation)
        self._stream_sets: dict[str, adapters.StreamSet] = {}
        self._active_streams: str | None = "default" if parscale_config.has_prefixes else None
        self.model = base.get_decoder()
        self.lm_head = base.get_output_embeddings()
        if getattr(base, "generation_config", None) is not None:
            self.generation_config = copy.deepcopy(base.generation_config)
        n_streams = parscale_config.n_streams
        # P = 1 keeps the stock attention: no prefix, no aggregation. The P = 1 control
        # (`prefix_at_p1`) takes the same prefix path as the streams, with one stream.
        if parscale_config.has_prefixes:
            n_kv_heads, head_dim = introspect.kv_geometry(base.config)
            for attention in introspect.attention_modules(base):
                streams.add_prefixes(attention, n_streams, n_kv_heads, parscale_config.n_prefix_tokens, head_dim)
            self.model.set_attn_implementation(prefix_attention.register_attention(self._plain_attention))
        else:  # the stock attention, with the CPU decode kernel for single queries
            self.model.set_attn_implementation(prefix_attention.register_plain(self._plain_attention))
        if parscale_config.stream_lora_rank:  # zero until `init_stream_parameters` or a state dict fills them
            stream_lora.install(base, stream_lora.empty_adapters(base, n_streams, parscale_config.stream_lora_rank),
                                parscale_config.stream_lora_scale)
        if n_streams > 1:
            ref = self.lm_head.weight
            self.model.aggregate_layer = AggregationHead(
                base.config.hidden_size, n_streams, parscale_config.attn_smooth, device=ref.device, dtype=ref.dtype
            )
        self.prefix_encoder: streams.PrefixEncoder | None = None
        if parscale_config.prefix_mlp_hidden:
            self.attach_prefix_encoder(parscale_config.prefix_mlp_hidden)
        self.use_fast_kernels(True)  # few-row CPU inference through the C++ kernels; stock ops otherwise

    # ----- the reparameterised prefix (see `streams.PrefixEncoder`) -----------------------
    def attach_prefix_encoder(self, hidden: int, generator: torch.Generator | None = None) -> None:
        """Replace the learned prefixes by an MLP that produces them (`prefix_mlp_hidden`).

        With `generator` the MLP is initialised at once (prefix std `prefix_init_std`);
        without, its weights are left for a `load_state_dict` to fill.
        """
        if not self.parscale_config.has_prefixes:
            raise UserError("a plain P = 1 model has no prefixes to reparameterise")
        if self.prefix_encoder is not None:
            raise UserError("the model already has a prefix encoder")
        attentions = self.attention_modules()
        n_streams, n_kv, n_prefix, head_dim = attentions[0].prefix_k.shape
        ref = self.lm_head.weight
        encoder = streams.PrefixEncoder(n_streams, n_prefix, self.config.hidden_size, hidden, len(attentions),
                                        n_kv, head_dim, device=ref.device, dtype=ref.dtype)
        for attention in attentions:  # the encoder's output takes their place in every forward
            del attention.prefix_k, attention.prefix_v
        self.prefix_encoder = encoder
        self.parscale_config = dataclasses.replace(self.parscale_config, prefix_mlp_hidden=hidden)
        if generator is not None:
            encoder.reset_parameters(generator, self.parscale_config.prefix_init_std)
        streams.install_encoded_prefixes(attentions, encoder)

    def materialised_prefixes(self) -> dict[str, torch.Tensor]:
        """The prefixes the encoder produces now, under the released state-dict keys."""
        if self.prefix_encoder is None:
            raise UserError("the model has no prefix encoder; its prefixes are in its state dict")
        names = {id(module): name for name, module in self.named_modules()}
        with torch.no_grad():
            prefixes = self.prefix_encoder()  # layers 2 P kv T d
        out = {}
        for attention, (k, v) in zip(self.attention_modules(), prefixes):
            out[f"{names[id(attention)]}.prefix_k"], out[f"{names[id(attention)]}.prefix_v"] = k, v
        return out

    def merge_prefix_encoder(self) -> "ParScaleForCausalLM":
        """Turn the encoder's output into ordinary prefix parameters and drop the encoder
        (like PEFT's `merge_and_unload`): the model becomes a plain ParScale model."""
        for key, prefix in self.materialised_prefixes().items():  # a UserError if there is no encoder
            module, name = key.rsplit(".", 1)
            setattr(self.get_submodule(module), name, nn.Parameter(prefix.clone()))
        self.prefix_encoder = None
        self.parscale_config = dataclasses.replace(self.parscale_config, prefix_mlp_hidden=0)
        return self

    def use_fast_kernels(self, enabled: bool = True) -> None:
        """Switch the CPU decode kernels on (the default) or off (the stock `F.linear` everywhere,
        and at P = 1 without prefixes the stock attention: then the model computes exactly what
        the plain transformers model does)."""
        kernels.enable(self, enabled)
        norms.enable(self, enabled)
        decode_layer.enable(self, enabled)  # a decode step's layer as direct kernel calls
        quantize.enable(self, enabled)  # int8 layers (after quantize_int8): their kernel, or dequantised weights
        for attention in self.attention_modules():  # read by prefix_attention.plain_attention
            attention.parscale_fast_decode = enabled

    def quantize_int8(self, activation_bits: int = 16, tiled: bool | None = None) -> "ParScaleForCausalLM":
        """Weight-only int8 for CPU decoding (opt-in; see `quantize`): the backbone's Linear layers
        and the lm_head (unless tied to the embeddings) get int8 weights with per-row float32
        scales; the prefixes, the aggregation MLP and the stream adapters keep their dtype. Inference only, and the
        model can no longer be saved (save before, quantize after loading). `activation_bits=8`
        rounds those layers' inputs to int8 per row too (W8A8, dynamic per token): the int8
        products of many streams run about twice as many multiply-adds per instruction on
        AVX-512 VNNI, at a measured accuracy cost (benchmarks/README.md). `tiled`: the int8 weights'
        layout (`quantize.quantize_int8`; by default tiles where the CPU kernel multiplies them so).
        Returns the model."""
        quantize.check_activation_bits(activation_bits)
        embedding = self.get_input_embeddings().weight
        skip = {name for name, m in self.named_modules() if name.endswith("aggregate_layer")}
        if self.prefix_encoder is not None:
            skip.add("prefix_encoder")
        if isinstance(self.lm_head, nn.Linear) and self.lm_head.weight is embedding:
            skip.add("lm_head")  # tied: the embedding table stays as it is, and so does the head
        lora = stream_lora.installed(self) if self.parscale_config.stream_lora_rank else []
        if lora:  # the stream adapters move to the int8 projections, in float
            stream_lora.install(self, [], 0.0)
        saved = quantize.quantize_int8(self, skip=skip, activation_bits=activation_bits, tiled=tiled)
        decode_layer.forget(self)  # a decode step's cached layout names the float layers
        if lora:
            stream_lora.install(self, lora, self.parscale_config.stream_lora_scale)
        logger.info("int8 weights: %.1f MB saved", saved / 1e6)
        return self

    # ----- the forward pass -------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_decoder(self) -> nn.Module:
        return self.model

    def attention_modules(self) -> list[nn.Module]:
        return introspect.attention_modules(self)

    @property
    def base_model(self) -> "ParScaleBody":
        """The body before the head: replicate -> backbone -> aggregate, B rows in and out.

        Code that runs `model.base_model(...)` and then `lm_head` itself (TRL's fused LM head,
        which `SFTTrainer` installs) would otherwise run the bare decoder on B rows, which the
        stream prefixes refuse (or, with B a multiple of P, mix up). Attribute reads go to
        the decoder, as they would with the stock `base_model`."""
        return ParScaleBody(self)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """B rows in, B rows of logits out; P*B rows inside the backbone and its cache.

        The cache comes as `cache` (transformers' current name) or `past_key_values` (its
        older one); it is handed to the backbone under the name the backbone takes. The loss
        keywords Trainer adds (`num_items_in_batch`, `ignore_index`, `shift_labels`) go to
        the loss alone; `position_ids` that restart inside a row (packed sequences, with no
        padding mask) keep attention within each sequence, as in the stock model."""
        loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden, outputs = self._body(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                     use_cache, past_key_values, keep, **kwargs)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None or loss_kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{OUTPUT_FIELD: output_cache(outputs)},
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    def _body(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, past_key_values,
              keep: slice | torch.Tensor = slice(None), **kwargs):
        """(aggregated hidden states [B, s, h] at positions `keep`, the backbone's outputs)."""
        if cache is not None and past_key_values is not None:
            raise UserError("pass the cache once: as cache= or as past_key_values=, not both")
        cache = cache if cache is not None else past_key_values
        n_streams = self.parscale_config.n_streams
        if self.prefix_encoder is not None:
            streams.install_encoded_prefixes(self.attention_modules(), self.prefix_encoder)
        if self.parscale_config.has_prefixes and not prefix_attention.is_prefix_attention(self.config._attn_implementation):
            raise UserError(
                f"attn_implementation is {self.config._attn_implementation!r}, which would ignore the stream prefixes; "
                f"a P > 1 model needs one of {sorted(prefix_attention.IMPLEMENTATIONS.values())} (set by to_parscale)"
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise UserError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # b s h, computed once
        batch = inputs_embeds.shape[0]
        is_2d = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        if n_streams > 1 and attention_mask is not None and not is_2d:
            raise UserError("ParScale takes a 2D padding mask [batch, seq] (1 = token, 0 = padding)")
        if is_2d and attention_mask.shape[0] == 1 and batch > 1:  # one mask for every row, at every P
            attention_mask = attention_mask.expand(batch, -1)  # b s
        if position_ids is None and is_2d and self.parscale_config.has_prefixes:
            position_ids = _positions_from_mask(attention_mask, inputs_embeds.shape[1], cache)  # b s
        if cache is not None and inputs_embeds.device.type == "cpu":
            kv_cache.grow_in_place(cache)  # appends in place, not by a copy of the cache per step
        outputs = self.model(
            inputs_embeds=_repeat_rows(inputs_embeds, n_streams, batch, "inputs_embeds"),  # (n b) s h
            attention_mask=_repeat_rows(attention_mask, n_streams, batch, "attention_mask"),
            position_ids=_repeat_rows(position_ids, n_streams, batch, "position_ids"),
            use_cache=use_cache,
            **cache_kwargs(self.model, cache),
            **kwargs,
        )
        hidden = outputs.last_hidden_state[:, keep]  # (n b) s h, final norm applied per stream
        if n_streams > 1:
            hidden = self.model.aggregate_layer(hidden)  # b s h
        return hidden, outputs

    # ----- generation hooks -------------------------------------------------------------
    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, *args, **kwargs):
        """Keep the 2D mask (generate would build a B-row 4D one); forward repeats it per stream."""
        return attention_mask

    def _reorder_cache(self, cache, beam_idx: torch.LongTensor):
        """Beam search: apply the same beam reordering to every stream block of the cache."""
        n_streams = self.parscale_config.n_streams
        rows = beam_idx.shape[0]
        full = torch.cat([beam_idx + k * rows for k in range(n_streams)])  # (n b)
        cache.reorder_cache(full.to(beam_idx.device))
        return cache

    # ----- parameters -------------------------------------------------------------------
    def stream_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The prefixes, the aggregation head and the stream adapters: what P > 1 adds to the backbone."""
        for name, param in self.named_parameters():
            if adapters.is_stream_key(name):
                yield name, param

    def freeze_backbone(self) -> None:
        """requires_grad=False on everything except the stream parameters."""
        stream = {id(p) for _, p in self.stream_parameters()}
        for param in self.parameters():
            param.requires_grad_(id(param) in stream)

    def trainable_parameters_summary(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"

    def print_trainable_parameters(self) -> None:
        """PEFT-style one-line summary on stdout."""
        print(self.trainable_parameters_summary())

    # ----- stream sets (adapters, see `adapters`) ----------------------------------------
    def stream_sets(self) -> list[str]:
        """The names of the loaded stream sets ("default": the streams the model was built with)."""
        return sorted(set(self._stream_sets) | ({self._active_streams} - {None}))

    @property
    def active_streams(self) -> str | None:
        """The stream set in use, or None for the plain backbone."""
        return self._active_streams

    def _remember_active(self) -> None:
        if self.prefix_encoder is not None:
            raise UserError("stream sets hold plain prefixes; call merge_prefix_encoder() first")
        if self._active_streams is not None:  # the very tensors now installed (they may have been trained)
            self._stream_sets[self._active_streams] = adapters.capture(self)

    def set_streams(self, name: str | None) -> None:
        """Switch to a loaded stream set, or to the plain backbone with None; no weight is copied.

        >>> model.load_streams("adapters/p4", name="p4"); model.set_streams("p4")
        """
        if name is not None and name not in self.stream_sets():
            raise UserError(f"no stream set named {name!r} is loaded; loaded: {self.stream_sets()} "
                            "(load one with load_streams(DIR, name=...))")
        if name == self._active_streams:
            return
        self._remember_active()
        adapters.install(self, None if name is None else self._stream_sets[name], self._plain_attention)
        self._active_streams = name

    def load_streams(self, directory: str | os.PathLike, name: str | None = None) -> str:
        """Load an adapter written by `save_streams` as a new set (default name "p{P}", "p1-prefix" for
        the one-prefix control); returns its name.

        The adapter's backbone fingerprint must match this model's backbone (else a ValueError
        naming what differs). The set is loaded, not activated: call `set_streams(name)`.
        """
        stream_set = adapters.load_set(self, directory)
        name = name or f"p{stream_set.config.n_streams}" + ("-prefix" if stream_set.config.prefix_at_p1 else "")
        if name in self.stream_sets():
            raise UserError(f"a stream set named {name!r} is already loaded; pass another name=")
        self._stream_sets[name] = stream_set
        logger.info("loaded stream set %r (P=%d) from %s", name, stream_set.config.n_streams, directory)
        return name

    def save_streams(self, directory: str | os.PathLike, name: str | None = None,
                     base_model_name_or_path: str | None = None) -> None:
        """Write one stream set (default: the active one) as adapter_model.safetensors + adapter_config.json."""
        self._remember_active()
        name = name if name is not None else self._active_streams
        if name is None:
            raise UserError("the model runs as the plain backbone (P = 1): there are no streams to save; "
                            "pass name= or call set_streams first")
        if name not in self._stream_sets:
            raise UserError(f"no stream set named {name!r} is loaded; loaded: {self.stream_sets()}")
        base = base_model_name_or_path if base_model_name_or_path is not None else (self.name_or_path or None)
        adapters.save_set(self, self._stream_sets[name], directory, base)

    # ----- files ------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "50GB", **kwargs) -> None:
        """config.json + model.safetensors (or shards above `max_shard_size`, e.g. "2GB") in the
        released `qwen2_parscale` layout (see `format`); replaces the weights of an earlier save."""
        quantize.check_savable(self)  # int8 layers would write a checkpoint nothing loads
        checkpoint_format.save_parscale(self, save_directory, max_shard_size=max_shard_size, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        **kwargs) -> "ParScaleForCausalLM":
        """Load our files, a released `qwen2_parscale` checkpoint, or a plain model (P = 1).

        A local directory only (safetensors, no remote code). Takes the usual keywords (see
        `options`): `dtype`/`torch_dtype` (default: the dtype config.json records, else
        float32), `device_map` ("cpu", "auto", a device), `local_files_only`, ...; any other
        keyword is refused with a `UserError` that lists the accepted ones.
        """
        opts = options.parse_load_kwargs(model_args, kwargs)
        directory = Path(pretrained_model_name_or_path) / opts.subfolder
        backbone, parscale_config, state = checkpoint_format.read_checkpoint(directory)
        chosen = checkpoint_format.resolve_dtype(opts.dtype, backbone)
        prefix_attention.implementation_for(opts.attn_implementation)  # flash-attn missing: one line, before any work
        with no_init_weights():  # every parameter is overwritten below (checked), so skip the random init
            base = AutoModelForCausalLM.from_config(backbone, dtype=chosen, attn_implementation=opts.attn_implementation)
        base.tie_weights()  # skipped with the init above; ties lm_head to the embeddings if the config says so
        model = cls(base, parscale_config)
        state = checkpoint_format.check_weights(model, state)
        model.load_state_dict(state, strict=False)  # strictness is checked above; the tied lm_head is absent
        generation = checkpoint_format.read_generation_config(directory)
        if generation is not None:
            model.generation_config = generation
        model.config._name_or_path = str(directory)  # what adapters record as their base model
        if opts.device is not None:
            model.to(opts.device)
        logger.info("loaded %s: P=%d, %s", directory, parscale_config.n_streams, chosen)
        return model.eval()


class Qwen2ParScaleForCausalLM(ParScaleForCausalLM):
    """The wrapper under the released architecture name, registered with AutoModelForCausalLM (see `auto`)."""

    config_class = Qwen2ParScaleConfig


def init_stream_parameters(model: ParScaleForCausalLM, seed: int = 0) -> None:
    """Prefixes ~ N(0, prefix_init_std) (or the prefix encoder, see `streams.PrefixEncoder`),
    aggregation first layer U(±1/sqrt(fan_in)), last layer zero, and the stream adapters' A
    U(±1/sqrt(in)), B zero (see `stream_lora`), drawn in that order.

    All draws come from one `torch.Generator(seed)`, so the backbone and the stream
    parameters are independent random draws. The zero last layer makes the initial
    aggregation weights uniform.
    """
    if not model.parscale_config.has_prefixes:
        return
    generator = torch.Generator().manual_seed(seed)
    std = model.parscale_config.prefix_init_std
    if model.prefix_encoder is not None:
        model.prefix_encoder.reset_parameters(generator, std)
    else:
        streams.init_prefixes_normal(model.attention_modules(), generator, std)
    if model.parscale_config.n_streams > 1:
        model.model.aggregate_layer.reset_parameters(generator)
    if model.parscale_config.stream_lora_rank:  # drawn last: models without adapters keep their draws
        stream_lora.init_adapters(model, generator)


def to_parscale(model: PreTrainedModel, config: ParScaleConfig | int, seed: int = 0) -> ParScaleForCausalLM:
    """Wrap a transformers decoder-only causal LM into a P-stream ParScale model.

    `config` is a `ParScaleConfig`, or just the number of streams (`to_parscale(model, 4)` is
    `to_parscale(model, ParScaleConfig(n_streams=4))`: the defaults for everything else).

    The base weights are shared, not copied: the returned model adopts the base's decoder and
    lm_head (and, for P > 1, adds prefixes to its attention modules and switches its attention
    implementation), so use the returned model from then on.

    New stream parameters (see `init_stream_parameters`): prefixes ~ N(0, 0.02) drawn from
    `torch.Generator().manual_seed(seed)`, the aggregation's last layer zero (uniform weights
    at start). Converting a trained P=1 model this way keeps held-out loss within about 0.6%
    of it while the streams already differ (zero prefixes would make them identical forever).
    At P = 1 nothing is added and the logits are the base model's (bit for bit with
    `use_fast_kernels(False)`; to float tolerance with the CPU decode kernel, which sums in
    another order), unless `config.prefix_at_p1` asks for the one-prefix control.
    """
    if isinstance(model, ParScaleForCausalLM):
        raise UserError("the model is already a ParScale model; convert the plain backbone instead")
    if isinstance(config, int) and not isinstance(config, bool):
        config = ParScaleConfig(n_streams=config)
    if not isinstance(config, ParScaleConfig):
        raise UserError(f"config must be a ParScaleConfig or a number of streams, got {type(config).__name__}; "
                        "pass e.g. ParScaleConfig(n_streams=4) or 4")
    wrapped = ParScaleForCausalLM(model, config)
    init_stream_parameters(wrapped, seed)
    wrapped.train(model.training)
    return wrapped
