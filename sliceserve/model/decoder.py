"""The runtime model: a plain PyTorch decoder over the canonical checkpoint tensors.

Tensor names (``F.linear`` layout, out x in):
  embed.weight (vocab, d_emb)          positions.weight (max_positions, d_emb), learned only
  layers.{i}.attn.{q,k,v,o}.weight/.bias     layers.{i}.mlp.{gate,up,down}.weight/.bias
  layers.{i}.attn_shortcut (d_mid, d_in)     layers.{i}.mlp_shortcut (d_out, d_mid)  sequential
  layers.{i}.shortcut (d_out, d_in)          parallel blocks
  head.weight (vocab, d_head), head.bias
Shortcuts are absent in dense checkpoints: the skip connection is then the identity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sliceserve.kernels.reference import reference_activation, rms_norm_reference
from sliceserve.model.kv_cache import KVCache, PrefillChunk, prefill_each
from sliceserve.model.rope import apply_rope, inverse_frequencies, rope_tables
from sliceserve.model.spec import DecoderSpec

TensorGetter = Callable[[str], "torch.Tensor | None"]


rms_norm = rms_norm_reference  # one RMSNorm: the kernels' reference


def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def optional_linear(get: TensorGetter, prefix: str) -> nn.Linear | None:
    weight = get(f"{prefix}.weight")
    return None if weight is None else frozen_linear(weight, get(f"{prefix}.bias"))


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, get: TensorGetter, prefix: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.sliding_window = spec.sliding_window
        self.q = optional_linear(get, f"{prefix}.q")
        self.k = optional_linear(get, f"{prefix}.k")
        self.v = optional_linear(get, f"{prefix}.v")
        self.o = optional_linear(get, f"{prefix}.o")

    def forward(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: CacheView | None = None
    ) -> torch.Tensor:
        batch, length, _ = h.shape
        q = self.q(h).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            out = cache.attend(q, k, v, self.sliding_window)
        elif self.sliding_window is not None and length > self.sliding_window:
            out = attention(q, k, v, sliding_causal_mask(length, self.sliding_window, h.device))
        else:
            out = attention(q, k, v, None, causal=True)
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class CacheView:
    """One layer's part of the KV cache for one forward step.

    Writes the new keys and values at (slot, position), then attends row by row over that
    row's own cached prefix, read through the block table. Row by row keeps every request's
    numbers independent of the other rows in the batch and of their lengths.
    """

    def __init__(self, cache: KVCache, layer: int, rows: list[tuple[int, int, int]]):
        self.cache, self.keys, self.values = cache, cache.keys[layer], cache.values[layer]
        self.rows = rows  # (slot, first position, last position) per row; positions are consecutive

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
        """q (B, heads, T, hd); k, v (B, kv_heads, T, hd) for consecutive positions per row."""
        outputs = []
        for row, (slot, first, last) in enumerate(self.rows):
            blocks, offsets = self.cache.addresses(slot, first, last)
            self.keys[blocks, :, offsets] = k[row].transpose(0, 1)
            self.values[blocks, :, offsets] = v[row].transpose(0, 1)
            start = 0 if window is None else max(0, first + 1 - window)  # the first query's window
            blocks, offsets = self.cache.addresses(slot, start, last)
            keys = self.keys[blocks, :, offsets].transpose(0, 1)[None]  # (1, kv_heads, length, hd)
            values = self.values[blocks, :, offsets].transpose(0, 1)[None]
            mask = None
            if last > first:  # several queries: each sees up to its own position
                query_pos = torch.arange(first, last + 1, device=q.device)[:, None]
                key_pos = torch.arange(start, last + 1, device=q.device)[None, :]
                distance = query_pos - key_pos
                mask = distance >= 0 if window is None else (distance >= 0) & (distance < window)
            outputs.append(attention(q[row : row + 1], keys, values, mask))
        return torch.cat(outputs)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool = False
) -> torch.Tensor:
    """Scaled dot-product attention, with grouped key/value heads repeated to the query heads."""
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


def sliding_causal_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < window)


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec, get: TensorGetter, prefix: str):
        super().__init__()
        self.activation = spec.activation
        self.gate = optional_linear(get, f"{prefix}.gate")
        self.up = optional_linear(get, f"{prefix}.up")
        self.down = optional_linear(get, f"{prefix}.down")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(reference_activation(self.gate(h), self.activation) * self.up(h))
        return self.down(reference_activation(self.up(h), self.activation))


def skip(x: torch.Tensor, shortcut: torch.Tensor | None) -> torch.Tensor:
    """The residual path: x itself in a dense model, x rotated onto the next basis in a sliced one."""
    return x if shortcut is None else F.linear(x, shortcut)


class Block(nn.Module):
    def __init__(self, spec: DecoderSpec, get: TensorGetter, index: int):
        super().__init__()
        prefix = f"layers.{index}"
        self.original_width, self.eps, self.parallel = spec.original_width, spec.norm_eps, spec.parallel_block
        self.attn = Attention(spec, get, f"{prefix}.attn")
        self.mlp = MLP(spec, get, f"{prefix}.mlp")
        # Buffers (None in dense models) so that .to(device) moves them with the weights.
        names = ["shortcut"] if self.parallel else ["attn_shortcut", "mlp_shortcut"]
        for name in names:
            self.register_buffer(name, get(f"{prefix}.{name}"), persistent=False)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.original_width, self.eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: CacheView | None = None
    ) -> torch.Tensor:
        if self.parallel:
            h = self.norm(x)
            return skip(x, self.shortcut) + self.attn(h, rope, cache) + self.mlp(h)
        x = skip(x, self.attn_shortcut) + self.attn(self.norm(x), rope, cache)
        return skip(x, self.mlp_shortcut) + self.mlp(self.norm(x))


class Transformer(nn.Module):
    def __init__(self, spec: DecoderSpec, get: TensorGetter, layer_range: range | None = None):
        super().__init__()
        self.spec = spec
        embed = get("embed.weight")  # absent on pipeline stages after the first
        self.embed = None if embed is None else nn.Embedding.from_pretrained(embed, freeze=True)
        positions = get("positions.weight")
        self.positions = None if positions is None else nn.Embedding.from_pretrained(positions, freeze=True)
        self.layers = nn.ModuleList(Block(spec, get, i) for i in (layer_range or range(spec.num_layers)))
        head = get("head.weight")  # absent on pipeline stages before the last
        self.head = None if head is None else frozen_linear(head, get("head.bias"))
        if spec.rope is not None:
            self.register_buffer("inv_freq", inverse_frequencies(spec.rope), persistent=False)

    @property
    def input_device(self) -> torch.device:
        """Where token ids and positions go in."""
        return self.embed.weight.device

    def new_cache(self, *, slots: int, max_len: int, blocks: int | None = None) -> KVCache:
        """An empty KV cache for this model's layers, beside its weights."""
        return KVCache(
            self.spec,
            slots=slots,
            max_len=max_len,
            blocks=blocks,
            device=self.head.weight.device,
            dtype=self.head.weight.dtype,
            layers=len(self.layers),
        )

    def close(self) -> None:
        """Nothing to release beyond the tensors."""

    def prepare(self, cache: KVCache) -> None:
        """Nothing to prepare: the reference model runs eagerly."""

    def folds_decode_rows(self, rows: int) -> bool:
        """Never: a decode row's numbers must not depend on what is prefilled beside it."""
        return False

    def padded_decode_rows(self, rows: int, max_batch: int) -> int:
        """Rows a decode step is padded to: always max_batch, so that a request's numbers never
        depend on how many others run beside it (library matmuls pick kernels by row count)."""
        return max_batch

    def rope_for(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.spec.rope is None:
            return None
        return rope_tables(self.inv_freq, positions, dtype)

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.positions is not None:
            x = x + self.positions(positions)
        return x

    def final_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(rms_norm(x, self.spec.original_width, self.spec.norm_eps))

    def forward_cached(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: KVCache,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for tokens (B, T) at positions (B, T), each row in its KV-cache slot.

        Serves both a prefill chunk (one row, many tokens) and a decode step (many rows, one
        token each). With last_only, only the last position's logits are computed.
        """
        x = self.embed_tokens(tokens, positions)
        rope = self.rope_for(positions, x.dtype)
        rows = [(s, p[0], p[-1]) for s, p in zip(slots.tolist(), positions.tolist())]
        for i, block in enumerate(self.layers):
            x = block(x, rope, CacheView(cache, i, rows))
        return self.final_logits(x[:, -1:] if last_only else x)

    def prefill(self, chunks: list[PrefillChunk], cache: KVCache) -> torch.Tensor:
        """Logits of each chunk's last position (of all its positions where it asks); one chunk
        at a time, so that a request's numbers never depend on what is prefilled beside it."""
        return prefill_each(self, chunks, cache)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T) at positions 0..T-1."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed_tokens(tokens, positions)
        rope = self.rope_for(positions, x.dtype)
        for block in self.layers:
            x = block(x, rope)
        return self.final_logits(x)
