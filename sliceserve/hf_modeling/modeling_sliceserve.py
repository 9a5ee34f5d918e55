"""The Transformers model of a sliceserve checkpoint (copied into every checkpoint we write).

``AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)`` builds this model
and reads the checkpoint's safetensors as they are: the parameter names are the stored names
(embed.weight, positions.weight, layers.{i}.attn.{q,k,v,o}, layers.{i}.mlp.{gate,up,down},
layers.{i}.attn_shortcut / mlp_shortcut / shortcut, head.weight), so nothing is renamed and
``save_pretrained`` writes the same names back. A quantized checkpoint's matrices
(``sliceserve quantize``) keep their codes, scales and zero points under the same names
(``layers.{i}.attn.q.qweight``, ``.scales``, ``.zeros``): DequantizingLinear makes the float
weight from them at each forward.

It computes what sliceserve's reference decoder computes: blocks whose norms are weightless
RMSNorms over the *original* width D (``x / sqrt(sum(x^2) / D + eps)``, also when x is sliced),
sequential (attention, then MLP) or parallel (both read one norm), with a shortcut matrix on
the skip path where a sliced checkpoint changes basis (``x @ S^T``; the identity in a dense
one). Rotary positions (partial, linear or Llama-3 scaled) or learned ones; grouped key/value
heads; a sliding window. Attention goes through Transformers' attention interface
(``ALL_ATTENTION_FUNCTIONS``: sdpa, flash, flex, or the eager function below), the KV cache
through its Cache classes, the masks through its masking utilities.

This file imports only torch and Transformers: it runs where sliceserve is not installed.
"""

import dataclasses
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_sliceserve import SliceserveConfig

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # older Transformers: blocks without gradient checkpointing
    GradientCheckpointingLayer = nn.Module


# ---- the pieces of the reference decoder --------------------------------------------------


def rms_norm(x: torch.Tensor, original_width: int, eps: float) -> torch.Tensor:
    """Weightless RMSNorm whose mean runs over the original width, even when x is sliced.
    Half precision is computed in float32, float64 stays float64."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    sumsq = xf.pow(2).sum(-1, keepdim=True)
    return (xf * torch.rsqrt(sumsq / original_width + eps)).to(x.dtype)


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "none":
        return x
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


def inverse_frequencies(rope: dict) -> torch.Tensor:
    """Per-pair inverse frequencies (rotary_dim / 2,), float32, with the model's scaling."""
    dim = rope["rotary_dim"]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (rope["theta"] ** exponents)
    scaling, factor = rope.get("scaling_type", "default"), rope.get("factor", 1.0)
    if scaling == "linear":
        return inv_freq / factor
    if scaling == "llama3":
        # Llama 3.1: long wavelengths slow down by `factor`, short ones stay, a smooth ramp between.
        original = rope.get("original_max_positions", 8192)
        low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if scaling != "default":
        raise ValueError(f"unknown rope scaling {scaling!r}")
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim features of each head. x (B, heads, T, head_dim); cos, sin
    (B, T, rotary_dim)."""
    cos, sin = cos[:, None], sin[:, None]
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def repeat_kv(x: torch.Tensor, repeat: int) -> torch.Tensor:
    """(B, kv_heads, T, hd) -> (B, kv_heads * repeat, T, hd), each key/value head repeated."""
    return x if repeat == 1 else x.repeat_interleave(repeat, dim=1)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention as a product, a softmax and a product (float32 softmax, float64 kept exact)."""
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    weights = F.softmax(weights, dim=-1, dtype=softmax_dtype).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


# ---- Transformers' interfaces, whatever their version calls their arguments ---------------


def _output(output_class: type, cache: Cache | None, **fields):
    """An output with its cache, under the name this Transformers gives it (`cache` in 5.24 and
    later, `past_key_values` before)."""
    names = {f.name for f in dataclasses.fields(output_class)}
    return output_class(**fields, **{"cache" if "cache" in names else "past_key_values": cache})


def _causal_mask(
    config: SliceserveConfig,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor,
    past: int,
):
    make = create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask
    parameters = inspect.signature(make).parameters
    arguments = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    arguments["inputs_embeds" if "inputs_embeds" in parameters else "input_embeds"] = embeds
    arguments["cache" if "cache" in parameters else "past_key_values"] = cache
    if "cache_position" in parameters:
        arguments["cache_position"] = torch.arange(past, past + embeds.shape[1], device=embeds.device)
    return make(**arguments)


def _new_cache(config: SliceserveConfig) -> DynamicCache:
    try:
        return DynamicCache(config=config)  # sliding-window layers keep only their window
    except TypeError:
        return DynamicCache()


# ---- the modules ---------------------------------------------------------------------------


class DequantizingLinear(nn.Module):
    """A block matrix the checkpoint stores quantized (config.json's "quantization": `bits`,
    `group_size`, which `linears`): the codes stay as stored, and each forward makes the float
    weight from them, in float32, then the activations' dtype (what sliceserve's loader gives its
    reference model):
        8 bits: qweight int8 (out, in),                               w = q * scales
        4 bits: qweight uint8 (out, ceil(in / 2)), even input low,    w = (q - zeros) * scales
    with scales (and uint8 zero points) per output row and group of `group_size` inputs."""

    def __init__(self, inputs: int, outputs: int, bits: int, group_size: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = inputs, outputs, bits, group_size
        groups = -(-inputs // group_size)
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(outputs, inputs, dtype=torch.int8))
        else:
            self.register_buffer("qweight", torch.zeros(outputs, -(-inputs // 2), dtype=torch.uint8))
            self.register_buffer("zeros", torch.zeros(outputs, groups, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(outputs, groups))
        self.bias = nn.Parameter(torch.zeros(outputs)) if bias else None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        wide = torch.promote_types(self.scales.dtype, torch.float32)
        codes = self.qweight
        if self.bits == 4:
            codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
        codes = codes[:, : self.in_features].to(wide)
        if self.bits == 4:
            codes = codes - self.zeros.to(wide).repeat_interleave(self.group_size, dim=1)[:, : self.in_features]
        scales = self.scales.to(wide).repeat_interleave(self.group_size, dim=1)[:, : self.in_features]
        return (codes * scales).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias)


def _quantized(config: SliceserveConfig, name: str) -> dict | None:
    scheme = getattr(config, "quantization", None)
    return scheme if scheme and name in scheme["linears"] else None


def _linear(config: SliceserveConfig, name: str, inputs: int, outputs: int) -> nn.Module:
    scheme = _quantized(config, name)
    if scheme is not None:
        return DequantizingLinear(inputs, outputs, scheme["bits"], scheme["group_size"], name in config.linear_biases)
    return nn.Linear(inputs, outputs, bias=name in config.linear_biases)


def _shortcut(config: SliceserveConfig, name: str, inputs: int, outputs: int) -> nn.Parameter | nn.Module:
    """A sliced block's shortcut matrix, (out, in) as F.linear takes it: a parameter, or its codes."""
    if _quantized(config, name) is not None:
        return _linear(config, name, inputs, outputs)
    return nn.Parameter(torch.empty(outputs, inputs))


class SliceserveAttention(nn.Module):
    def __init__(self, config: SliceserveConfig, layer_idx: int, input_width: int, output_width: int):
        super().__init__()
        spec = config.model
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.sliding_window = spec.get("sliding_window")
        self.is_causal = True
        hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q = _linear(config, "attn.q", input_width, hq)
        self.k = _linear(config, "attn.k", input_width, hkv)
        self.v = _linear(config, "attn.v", input_width, hkv)
        self.o = _linear(config, "attn.o", hq, output_width)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask,
        cache: Cache | None,
        **kwargs,
    ) -> torch.Tensor:
        batch, length, _ = h.shape
        q = self.q(h).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        implementation = self.config._attn_implementation or "eager"
        attend: Callable = (
            eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        )
        out, _ = attend(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.o(out.reshape(batch, length, -1))


class SliceserveMLP(nn.Module):
    def __init__(self, config: SliceserveConfig, input_width: int, output_width: int):
        super().__init__()
        spec = config.model
        self.activation = spec["activation"]
        inter = spec["intermediate_size"]
        self.gate = _linear(config, "mlp.gate", input_width, inter) if spec["gated_mlp"] else None
        self.up = _linear(config, "mlp.up", input_width, inter)
        self.down = _linear(config, "mlp.down", inter, output_width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(activation(self.gate(h), self.activation) * self.up(h))
        return self.down(activation(self.up(h), self.activation))


def _skip(x: torch.Tensor, shortcut: torch.Tensor | nn.Module | None) -> torch.Tensor:
    """The residual path: x itself in a dense model, x rotated onto the next basis in a sliced one."""
    if shortcut is None:
        return x
    return shortcut(x) if isinstance(shortcut, nn.Module) else F.linear(x, shortcut)


class SliceserveBlock(GradientCheckpointingLayer):
    def __init__(self, config: SliceserveConfig, layer_idx: int):
        super().__init__()
        spec = config.model
        widths = spec["layers"][layer_idx]
        d_in, d_out = widths["input_width"], widths["output_width"]
        self.original_width, self.eps, self.parallel = spec["original_width"], spec["norm_eps"], spec["parallel_block"]
        d_mid = d_out if self.parallel else widths["middle_width"]
        self.attn = SliceserveAttention(config, layer_idx, d_in, d_mid)
        self.mlp = SliceserveMLP(config, d_in if self.parallel else d_mid, d_out)
        sliced = spec.get("has_shortcuts", False)
        # F.linear layout (out, in): the skip path computes x @ shortcut^T.
        if self.parallel:
            self.shortcut = _shortcut(config, "shortcut", d_in, d_out) if sliced else None
        else:
            self.attn_shortcut = _shortcut(config, "attn_shortcut", d_in, d_mid) if sliced else None
            self.mlp_shortcut = _shortcut(config, "mlp_shortcut", d_mid, d_out) if sliced else None

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.original_width, self.eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask=None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.parallel:
            h = self.norm(x)
            return _skip(x, self.shortcut) + self.attn(h, rope, attention_mask, cache, **kwargs) + self.mlp(h)
        x = _skip(x, self.attn_shortcut) + self.attn(self.norm(x), rope, attention_mask, cache, **kwargs)
        return _skip(x, self.mlp_shortcut) + self.mlp(self.norm(x))


class SliceserveRotary(nn.Module):
    def __init__(self, rope: dict):
        super().__init__()
        self.rope = rope
        self.register_buffer("inv_freq", inverse_frequencies(rope), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, T, rotary_dim), computed in float32 as the models were trained."""
        freqs = position_ids[..., None].to(torch.float32) * self.inv_freq.to(position_ids.device, torch.float32)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


class SliceservePreTrainedModel(PreTrainedModel):
    config: SliceserveConfig
    config_class = SliceserveConfig
    base_model_prefix = "model"  # no such attribute: the causal LM holds the decoder's modules itself
    supports_gradient_checkpointing = True
    _no_split_modules = ["SliceserveBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Only for what a checkpoint does not hold (a model built from its config alone)."""
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, SliceserveBlock):
            for name in ("shortcut", "attn_shortcut", "mlp_shortcut"):
                if isinstance(getattr(module, name, None), nn.Parameter):
                    init.eye_(getattr(module, name))
        elif isinstance(module, SliceserveRotary):  # a buffer that no checkpoint stores
            module.inv_freq.copy_(inverse_frequencies(module.rope))


class SliceserveModel(SliceservePreTrainedModel):
    """The decoder without its head: last_hidden_state is the final norm's output (head_width)."""

    def __init__(self, config: SliceserveConfig):
        super().__init__(config)
        self.add_decoder(config)
        self.post_init()

    def add_decoder(self, config: SliceserveConfig) -> None:
        spec = config.model
        width = spec["embedding_width"]
        self.embed = nn.Embedding(spec["vocab_size"], width)
        self.positions = nn.Embedding(spec["max_positions"], width) if spec["rope"] is None else None
        self.layers = nn.ModuleList(SliceserveBlock(config, i) for i in range(spec["num_layers"]))
        self.rotary = SliceserveRotary(spec["rope"]) if spec["rope"] is not None else None
        self.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def decode(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        inputs_embeds: torch.Tensor | None,
        use_cache: bool | None,
        output_hidden_states: bool,
        **kwargs,
    ) -> tuple[torch.Tensor, Cache | None, tuple | None]:
        """The final norm's output, the cache and (when asked) every block's input."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        for unused in ("cache_position", "return_dict", "output_attentions"):
            kwargs.pop(unused, None)
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = _new_cache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        if self.positions is not None:
            x = x + self.positions(position_ids)
        mask = _causal_mask(self.config, x, attention_mask, cache, position_ids, past)
        rope = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        hidden = []
        for block in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x = block(x, rope, mask, cache if use_cache else None, **kwargs)
        x = rms_norm(x, self.config.model["original_width"], self.config.model["norm_eps"])
        if output_hidden_states:
            hidden.append(x)
        return x, cache if use_cache else None, tuple(hidden) if output_hidden_states else None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        x, cache, hidden = self.decode(
            input_ids,
            attention_mask,
            position_ids,
            cache if cache is not None else past_key_values,
            inputs_embeds,
            use_cache,
            bool(output_hidden_states),
            **kwargs,
        )
        return _output(BaseModelOutputWithPast, cache, last_hidden_state=x, hidden_states=hidden)


class SliceserveForCausalLM(SliceserveModel, GenerationMixin):
    """The decoder and its head, as one module whose parameter names are the checkpoint's."""

    def __init__(self, config: SliceserveConfig):
        SliceservePreTrainedModel.__init__(self, config)  # not SliceserveModel's: one post_init, at the end
        self.add_decoder(config)
        self.head = _linear(config, "head", config.model["head_width"], config.model["vocab_size"])
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        x, cache, hidden = self.decode(
            input_ids,
            attention_mask,
            position_ids,
            cache if cache is not None else past_key_values,
            inputs_embeds,
            use_cache,
            bool(output_hidden_states),
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.head(x[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return _output(CausalLMOutputWithPast, cache, loss=loss, logits=logits, hidden_states=hidden)


__all__ = ["SliceserveConfig", "SliceserveModel", "SliceserveForCausalLM", "SliceservePreTrainedModel"]
