"""The fast path: the same decoder as model/decoder.py, computed by our Triton kernels.

Per sequential layer, whatever the batch:
    qkv      = r(x) * (x @ Wqkv) + b            fused_linear, the norm applied in its epilogue
    q        = rope(q); cache <- rope(k), v      rope_store
    attn     = attention(q, cache)               decode_attention (one token per row) or prefill_attention
    x_mid    = x @ S_attn + attn @ Wo + b        fused_linear: shortcut, projection and residual in one pass
    act      = act(r * x_mid @ Wg) * (r * x_mid @ Wu)   gated_linear
    x_out    = x_mid @ S_mlp + act @ Wd + b      fused_linear
Every producer of the residual stream also leaves per-tile sums of squares, from which the
next consumer gets the norm's row scale: normalised activations are never written. A
dense checkpoint has no shortcuts, and the residual is added in the epilogue instead. A
quantized checkpoint's matrices stay codes (fast/quantized_weights.py), dequantized inside
the same kernels' products.

Above 16 rows the products are the library's (fast/matmul_backends.py "auto"), which normalise
their input themselves: no partial sums are made between them. Decode steps are captured in
CUDA graphs per batch-size bucket (fast/graphs.py), prefills of up to 512 tokens per bucket of
tokens (fast/prefill_graphs.py).
On a CPU the same kernels run in Triton's interpreter, which is how CI checks this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sliceserve.errors import SliceserveError
from sliceserve.fast.graphs import DecodeGraphs, graph_bucket
from sliceserve.fast.matmul_backends import AUTO_TRITON_ROWS, PRODUCTS
from sliceserve.fast.prefill_graphs import PrefillGraphs
from sliceserve.fast.quantized_weights import Weight, block_weight, float_dtype, paired, stacked
from sliceserve.fast.semi_structured import SparseLayer, sparse_layer_forward
from sliceserve.kernels.decode_attention import choose_splits, decode_attention
from sliceserve.kernels.prefill_attention import attention_tiles, prefill_attention, tile_rows
from sliceserve.kernels.rms_norm import rms_norm
from sliceserve.kernels.rope_store import rope_half_tables, rope_store
from sliceserve.model.decoder import Block, Transformer
from sliceserve.model.kv_cache import KVCache, PrefillChunk
from sliceserve.uploads import upload


def concatenated_bias(parts: list[torch.nn.Linear], widths: list[int]) -> torch.Tensor | None:
    """The biases of several projections side by side (zeros where one has none)."""
    if all(p.bias is None for p in parts):
        return None
    like = next(p.bias for p in parts if p.bias is not None)
    return torch.cat([p.bias if p.bias is not None else like.new_zeros(w) for p, w in zip(parts, widths)])


@dataclass
class FastLayer:
    """One block's tensors, arranged for the kernels. A weight is a float tensor or, from a
    quantized checkpoint, its codes (fast/quantized_weights.py), which the products take alike."""

    qkv_weight: Weight
    qkv_bias: torch.Tensor | None
    o_weight: Weight
    o_bias: torch.Tensor | None
    up_weight: Weight
    up_bias: torch.Tensor | None
    gate_weight: Weight | None
    gate_bias: torch.Tensor | None
    down_weight: Weight
    down_bias: torch.Tensor | None
    attn_shortcut: Weight | None  # sequential blocks
    mlp_shortcut: Weight | None
    shortcut: Weight | None  # parallel blocks
    parallel_bias: torch.Tensor | None  # parallel blocks: o and down biases added once

    @classmethod
    def from_block(cls, block: Block) -> FastLayer:
        attn, mlp = block.attn, block.mlp
        dtype = float_dtype(block)

        def weight(name: str, linear: torch.nn.Linear | None) -> Weight | None:
            return None if linear is None else block_weight(block, name, linear.weight)

        parts = [attn.q, attn.k, attn.v]
        qkv_weight = stacked([weight(f"attn.{p}", getattr(attn, p)) for p in "qkv"], dtype)
        up_weight, gate_weight = weight("mlp.up", mlp.up), weight("mlp.gate", mlp.gate)
        if gate_weight is not None:
            gate_weight, up_weight = paired(gate_weight, up_weight, dtype)
        qkv_bias = concatenated_bias(parts, [p.weight.shape[0] for p in parts])
        gate_bias = up_bias = None
        if mlp.gate is not None and (mlp.gate.bias is not None or mlp.up.bias is not None):
            gate_bias = concatenated_bias([mlp.gate], [mlp.gate.weight.shape[0]])
            up_bias = concatenated_bias([mlp.up], [mlp.up.weight.shape[0]])
            gate_bias = gate_bias if gate_bias is not None else torch.zeros_like(up_bias)
            up_bias = up_bias if up_bias is not None else torch.zeros_like(gate_bias)
        elif mlp.gate is None:
            up_bias = mlp.up.bias
        parallel_bias = None
        if block.parallel and (attn.o.bias is not None or mlp.down.bias is not None):
            parallel_bias = sum(b for b in (attn.o.bias, mlp.down.bias) if b is not None)
        return cls(
            qkv_weight=qkv_weight,
            qkv_bias=qkv_bias,
            o_weight=weight("attn.o", attn.o),
            o_bias=attn.o.bias,
            up_weight=up_weight,
            up_bias=up_bias,
            gate_weight=gate_weight,
            gate_bias=gate_bias,
            down_weight=weight("mlp.down", mlp.down),
            down_bias=mlp.down.bias,
            attn_shortcut=block_weight(block, "attn_shortcut", getattr(block, "attn_shortcut", None)),
            mlp_shortcut=block_weight(block, "mlp_shortcut", getattr(block, "mlp_shortcut", None)),
            shortcut=block_weight(block, "shortcut", getattr(block, "shortcut", None)),
            parallel_bias=parallel_bias,
        )


class FastTransformer:
    """Drop-in for Transformer in the Engine (same forward_cached/forward/new_cache)."""

    def __init__(
        self, model: Transformer, *, semi_structured: bool = False, products: str = "auto", prefill_graphs: bool = True
    ):
        """semi_structured: the decoder linears are 2:4 sparse; multiply them with sparse tensor
        cores (fast/semi_structured.py) instead of the dense kernels.
        prefill_graphs: prepare() captures CUDA graphs for small prefills (fast/prefill_graphs.py).
        products: "triton" (our fused kernels), "library" (cuBLAS products, separate epilogues)
        or "auto" (ours up to 16 rows, the library above: sliceserve/fast/matmul_backends.py)."""
        if products not in PRODUCTS:
            raise SliceserveError(f"unknown products backend {products!r}: {' or '.join(PRODUCTS)}")
        self.products = products
        self.linear, self.gated = PRODUCTS[products]
        self.spec = model.spec
        # A pipeline stage's Transformer holds a range of layers: the embedding only on the
        # first stage, the head only on the last (None elsewhere).
        self.embed, self.positions, self.head = model.embed, model.positions, model.head
        weight = next(model.parameters())
        self.device, self.weights_dtype = weight.device, weight.dtype
        self.layers = [FastLayer.from_block(block) for block in model.layers]
        self.sparse_layers = None
        if semi_structured and any(getattr(block, "quantized_weights", None) for block in model.layers):
            raise SliceserveError("2:4 sparse tensor cores take float weights, not a quantized checkpoint's codes")
        if semi_structured:
            self.sparse_layers = semi_structured_layers(self.spec, self.layers)
            self.layers = [None] * len(self.layers)  # the compressed copies replace the dense ones
        spec = self.spec
        self.width, self.eps = spec.original_width, spec.norm_eps
        self.activation = spec.activation
        self.cos = self.sin = None
        if spec.rope is not None:
            self.cos, self.sin = rope_half_tables(model.inv_freq, spec.max_positions, self.device)
        self.graphs = None  # DecodeGraphs, made on the first CUDA decode step
        self.prefill_graphs: PrefillGraphs | None = None  # small prefills' graphs, made by prepare()
        self.prefill_graphs_wanted = prefill_graphs

    @property
    def input_device(self) -> torch.device:
        return self.embed.weight.device if self.embed is not None else self.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype if self.head is not None else self.weights_dtype

    def new_cache(self, *, slots: int, max_len: int, blocks: int | None = None) -> KVCache:
        return KVCache(
            self.spec,
            slots=slots,
            max_len=max_len,
            device=self.device,
            dtype=self.dtype,
            layers=len(self.layers),
            blocks=blocks,
        )

    def folds_decode_rows(self, rows: int) -> bool:
        """Above the rows our products take (AUTO_TRITON_ROWS), where the decode step's products
        are the library's and depend on the row count anyway: up to there (and always with our
        products alone), a request's greedy output stays independent of its neighbours."""
        return self.products != "triton" and rows > AUTO_TRITON_ROWS

    def padded_decode_rows(self, rows: int, max_batch: int) -> int:
        """Rows a decode step of `rows` requests is padded to: the graph bucket that holds them."""
        return graph_bucket(rows, max_batch)

    def decode_splits(self, rows: int, device: torch.device) -> int:
        """Split-K parts of decode attention: enough to fill a GPU; one on a CPU, where the
        kernels run interpreted and every extra program costs time."""
        return choose_splits(rows, self.spec.num_kv_heads) if device.type == "cuda" else 1

    # ---- one step over M tokens ----------------------------------------------------------

    def embed_rows(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed.weight[tokens]
        if self.positions is not None:
            x = x + self.positions.weight[positions]
        return x, rms_norm(x, self.width, self.eps, sumsq_only=True)

    def rotate_and_store(
        self, qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache, i: int
    ) -> torch.Tensor:
        """Rotated queries of the fused q|k|v projection; its keys and values into layer i's cache."""
        spec = self.spec
        return rope_store(
            qkv,
            positions,
            slots,
            cache.keys[i],
            cache.values[i],
            self.cos,
            self.sin,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            block_table=cache.block_table if cache.paged else None,
        )

    def attend(
        self,
        q: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: KVCache,
        i: int,
        splits: int | None,
        tiles: torch.Tensor | None,
    ) -> torch.Tensor:
        """Layer i's attention: one token per row (a decode step: `tiles` None) or the prefill
        segments `tiles` describes (kernels/prefill_attention.py), over the cache's blocks."""
        window, keys, values = self.spec.sliding_window, cache.keys[i], cache.values[i]
        if tiles is None:
            table = cache.block_table if cache.paged else None
            return decode_attention(q, keys, values, positions, slots, window=window, splits=splits, block_table=table)
        return prefill_attention(q, keys, values, cache.block_table, tiles, window=window, block_m=PREFILL_ROWS)

    def layer(
        self,
        i: int,
        x: torch.Tensor,
        px: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: KVCache,
        splits: int | None = None,
        tiles: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream after layer i, its partial sums of squares). `tiles`: the prefill
        segments' attention tiles; None for a decode step (one token per row)."""
        if self.sparse_layers is not None:
            return sparse_layer_forward(self, i, x, positions, slots, cache, splits, tiles), None
        spec, layer = self.spec, self.layers[i]
        norm = (px, self.width, self.eps)
        sums = self.keeps_sums(x.shape[0])
        qkv, _ = self.linear(x, layer.qkv_weight, bias=layer.qkv_bias, norm=norm)
        attn = self.attend(
            self.rotate_and_store(qkv, positions, slots, cache, i), positions, slots, cache, i, splits, tiles
        )
        if spec.parallel_block:
            act = self.mlp_up(layer, x, norm)
            if layer.shortcut is None:
                return self.linear(
                    attn, layer.o_weight, a2=act, w2=layer.down_weight, bias=layer.parallel_bias, residual=x, sumsq=sums
                )
            update, _ = self.linear(attn, layer.o_weight, a2=act, w2=layer.down_weight, bias=layer.parallel_bias)
            return self.linear(x, layer.shortcut, residual=update, sumsq=sums)
        x_mid, p_mid = self.residual_update(x, layer.attn_shortcut, attn, layer.o_weight, layer.o_bias, sums)
        act = self.mlp_up(layer, x_mid, (p_mid, self.width, self.eps))
        return self.residual_update(x_mid, layer.mlp_shortcut, act, layer.down_weight, layer.down_bias, sums)

    def keeps_sums(self, rows: int) -> bool:
        """Whether a layer's products of `rows` rows leave partial sums of squares: our kernels
        take the next norm from them; the library's products normalise their input themselves
        (fast/library_matmul.py), so between those no sums are made (None flows instead)."""
        return self.products == "triton" or (self.products == "auto" and rows <= AUTO_TRITON_ROWS)

    def residual_update(
        self,
        x: torch.Tensor,
        shortcut: torch.Tensor | None,
        y: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        sums: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x @ S + y @ W.T + b (sliced) or x + y @ W.T + b (dense), with its partial sums of
        squares where `sums` asks."""
        if shortcut is None:
            return self.linear(y, weight, bias=bias, residual=x, sumsq=sums)
        return self.linear(x, shortcut, a2=y, w2=weight, bias=bias, sumsq=sums)

    def mlp_up(self, layer: FastLayer, x: torch.Tensor, norm) -> torch.Tensor:
        if layer.gate_weight is not None:
            return self.gated(
                x,
                layer.gate_weight,
                layer.up_weight,
                activation=self.activation,
                gate_bias=layer.gate_bias,
                up_bias=layer.up_bias,
                norm=norm,
            )
        out, _ = self.linear(x, layer.up_weight, bias=layer.up_bias, activation=self.activation, norm=norm)
        return out

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: KVCache,
        last_rows: torch.Tensor | None = None,
        splits: int | None = None,
        tiles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (M or len(last_rows), vocab) for M tokens, each at its own position and slot:
        prefill segments with their attention `tiles`, or one token per row (tiles None)."""
        x, px = self.embed_rows(tokens, positions)
        x, px = self.run_layers(x, px, positions, slots, cache, splits, tiles)
        return self.head_logits(x, px, last_rows)

    def run_layers(
        self,
        x: torch.Tensor,
        px: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: KVCache,
        splits: int | None = None,
        tiles: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream, its partial sums of squares) after every layer this model holds: all of them,
        or a pipeline stage's range (`cache` then holds that range's layers only)."""
        for i in range(len(self.layers)):
            x, px = self.layer(i, x, px, positions, slots, cache, splits, tiles)
        if px is None:  # the semi-structured layers and the library's products leave no partial sums
            px = rms_norm(x, self.width, self.eps, sumsq_only=True)
        return x, px

    def head_logits(self, x: torch.Tensor, px: torch.Tensor, last_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the final norm of x (of its `last_rows` only, when given)."""
        if last_rows is not None:
            x, px = x[last_rows], px[last_rows]
        logits, _ = self.linear(x, self.head.weight, bias=self.head.bias, norm=(px, self.width, self.eps))
        return logits

    # ---- the Engine's interface --------------------------------------------------------------

    def close(self) -> None:
        """Nothing to release beyond the tensors."""

    def prepare(self, cache: KVCache) -> None:
        """Capture the decode graphs of every batch bucket for this cache, and compile the
        prefill path's kernels (CUDA only)."""
        if self.input_device.type == "cuda":
            self.decode_graphs(cache).capture_all()
            self.warm_up_prefill(cache)
            if self.sparse_layers is None and self.prefill_graphs_wanted:
                self.prefill_graphs = PrefillGraphs(self, cache, PREFILL_ROWS)

    def warm_up_prefill(self, cache: KVCache) -> None:
        """Run prefills whose sizes cover how Triton specialises a kernel's sizes (1, a multiple
        of 16, any other) for the tokens, the chunks and the head's rows, and prompt scoring,
        into the scratch slot: on a machine without a kernel cache, the first requests would
        otherwise wait seconds, the GPU idle, while they compile (an H200 without a kernel
        cache: c64's TTFT p99 2.4 s, against 0.54 s once the cache held them)."""
        slot, longest = cache.scratch_slot, min(cache.max_len, 48)
        for lengths in ((1,), (2,), (1, 1), (1,) * 16, (17,), (32,), (16, 16, *[1] * 17), (longest,)):
            self.prefill([PrefillChunk([0] * min(n, longest), 0, slot) for n in lengths], cache)
        self.prefill([PrefillChunk([0] * min(20, longest), 0, slot, all_positions=True)], cache)

    def decode_graphs(self, cache: KVCache) -> DecodeGraphs:
        if self.graphs is None or not self.graphs.serves([cache]):
            self.graphs = DecodeGraphs([self], [cache])
        return self.graphs

    @torch.inference_mode()
    def forward_cached(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: KVCache,
        last_only: bool = False,
    ) -> torch.Tensor:
        batch, length = tokens.shape
        if length == 1 and tokens.device.type == "cuda":
            return self.decode_graphs(cache).run(tokens[:, 0], positions[:, 0], slots)[:, None]
        flat_positions = positions.reshape(-1)
        flat_slots = slots.repeat_interleave(length)
        last_rows = torch.arange(length - 1, batch * length, length, device=tokens.device) if last_only else None
        logits = self.step(
            tokens.reshape(-1),
            flat_positions,
            flat_slots,
            cache,
            last_rows=last_rows,
            splits=self.decode_splits(batch, tokens.device),
            tiles=None if length == 1 else batch_tiles(positions, slots),
        )
        return logits.view(batch, 1 if last_only else length, -1)

    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk], cache: KVCache) -> torch.Tensor:
        """Logits of each chunk's last position (of all its positions where it asks), every chunk
        in one forward: the products see all their tokens together, and one attention launch a
        layer serves every chunk over its own slot's prefix. Only the rows returned go through
        the head, but in a small step's CUDA graph (fast/prefill_graphs.py), which runs it
        over all its rows."""
        device = self.input_device
        tokens = [t for c in chunks for t in c.tokens]
        positions = [p for c in chunks for p in range(c.start, c.start + len(c.tokens))]
        slots = [c.slot for c in chunks for _ in c.tokens]
        segments, rows, start = [], [], 0
        for c in chunks:
            end = start + len(c.tokens)
            segments.append((start, end, c.slot, c.start))
            rows += range(start, end) if c.all_positions else [end - 1]
            start = end
        tiles = tile_rows(segments, PREFILL_ROWS)
        graphs = self.prefill_graphs
        if graphs is not None and graphs.serves(cache) and not any(c.all_positions for c in chunks):
            graph = graphs.graph(len(tokens), len(tiles))
            if graph is not None:
                return graph.run(tokens, positions, slots, tiles, rows)
        return self.step(
            upload(tokens, device),
            upload(positions, device),
            upload(slots, device),
            cache,
            last_rows=upload(rows, device),
            tiles=upload(tiles, device, torch.int32).reshape(-1, 4),
        )

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T) at positions 0..T-1 (a scratch cache)."""
        batch, length = tokens.shape
        cache = self.new_cache(slots=batch, max_len=length)
        positions = torch.arange(length, device=tokens.device).expand(batch, length)
        slots = torch.arange(batch, device=tokens.device)
        return self.forward_cached(tokens, positions, slots, cache)

    __call__ = forward


PREFILL_ROWS = 64  # query rows per program of prefill attention


def semi_structured_layers(spec, layers: list[FastLayer]) -> list[SparseLayer]:
    if spec.parallel_block:
        raise SliceserveError("2:4 sparse tensor cores are supported for sequential blocks only")
    return [SparseLayer.from_fast_layer(i, layer) for i, layer in enumerate(layers)]


def batch_tiles(positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Attention tiles of a batch of rows (B, T), row b at consecutive positions of slot
    slots[b] from positions[b, 0] (one read from the device)."""
    batch, length = positions.shape
    read = torch.cat([slots.reshape(-1), positions[:, 0]]).tolist()
    segments = [(b * length, (b + 1) * length, read[b], read[batch + b]) for b in range(batch)]
    return attention_tiles(segments, PREFILL_ROWS, positions.device)
