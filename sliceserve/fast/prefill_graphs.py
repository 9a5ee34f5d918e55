"""Small prefills replayed from CUDA graphs, one graph per bucket of tokens.

A prefill forward launches about nine operations a layer, and from Python those cost ~20 ms
of host time on a 7B model (H200: 15-40 ms whatever the step's 32-4,096 tokens,
benchmarks/results/decode_step_h200_12-timeline-warm.json), more than the GPU needs for a few
hundred tokens: a lone new request, one short prompt with the decode rows folded beside it, a
chat's next turn were all bound by the host, and the decode rows waited for them. Up to the
largest bucket, a step's chunks are padded to a bucket of tokens (powers of two from 16) and
replayed from its graph instead: one launch. Measured on the H200 (7B shapes, fp16,
decode_step_h200_14-identity-prefill-graphs.json): host 0.6 ms against 17-22 ms eager; wall
5.4 ms against 22.5 for 32 tokens, 8.4 against 21.9 for 256, 13.0 against 16.6 for 4 x 100.

What a graph reads from static buffers, filled before each replay: the tokens, their positions
and slots (padding rows: token 0 at position 0 of the scratch slot, as a decode graph's padding
rows), and the attention tiles (kernels/prefill_attention.py; padding tiles hold no rows and
compute nothing). Every operation of a layer treats rows independently but attention, which
reads the tiles, so the padding rows change no real row. The head runs over every row of the
bucket (at 512 rows of a 32,000-token vocabulary, 0.07 ms of an H200) and the rows wanted are
picked from its output after the replay. Prompt scoring (every position's logits) stays eager.
Numbers are those of the eager forward over the same padded rows: the library's products may
choose another algorithm for another row count, as they do for any change of batch.
"""

from __future__ import annotations

import torch

from sliceserve.fast.graphs import captured
from sliceserve.model.kv_cache import KVCache
from sliceserve.uploads import upload

PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)


def tile_capacity(tokens: int, block_m: int) -> int:
    """Attention tiles a bucket holds: every chunk's rows in tiles of block_m, for up to 128 chunks."""
    return min(tokens, tokens // block_m + 128)


class PrefillGraph:
    """One bucket: `size` rows, up to `capacity` attention tiles."""

    def __init__(self, fast, cache: KVCache, size: int, pool, stream: torch.cuda.Stream, block_m: int):
        device = fast.device
        self.size, self.capacity, self.scratch_slot = size, tile_capacity(size, block_m), cache.scratch_slot
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slots = torch.full((size,), cache.scratch_slot, dtype=torch.long, device=device)
        self.tiles = torch.zeros((self.capacity, 4), dtype=torch.int32, device=device)
        self.tiles[:, 2] = cache.scratch_slot

        def step() -> torch.Tensor:
            x, px = fast.embed_rows(self.tokens, self.positions)
            x, px = fast.run_layers(x, px, self.positions, self.slots, cache, tiles=self.tiles)
            return fast.head_logits(x, px)

        self.graph, self.logits = captured(step, device, pool, stream)

    def run(
        self,
        tokens: list[int],
        positions: list[int],
        slots: list[int],
        tiles: list[tuple[int, int, int, int]],
        rows: list[int],
    ) -> torch.Tensor:
        """Logits of `rows` (indices into the step's real rows)."""
        device, pad = self.tokens.device, self.size - len(tokens)
        inputs = upload([*tokens, *[0] * pad, *positions, *[0] * pad, *slots, *[self.scratch_slot] * pad], device)
        self.tokens.copy_(inputs[: self.size])
        self.positions.copy_(inputs[self.size : 2 * self.size])
        self.slots.copy_(inputs[2 * self.size :])
        padding = [(0, 0, self.scratch_slot, 0)] * (self.capacity - len(tiles))
        self.tiles.copy_(upload([*tiles, *padding], device, torch.int32))
        self.graph.replay()
        return self.logits.index_select(0, upload(rows, device))


class PrefillGraphs:
    """The buckets' graphs of one fast model over one cache, captured at once (largest first,
    so that the smaller ones reuse its memory in their shared pool)."""

    def __init__(self, fast, cache: KVCache, block_m: int):
        self.cache = cache
        pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(fast.device)
        sizes = [size for size in PREFILL_BUCKETS if size <= cache.max_len * cache.slots]
        self.graphs = {size: PrefillGraph(fast, cache, size, pool, stream, block_m) for size in reversed(sizes)}

    def serves(self, cache: KVCache) -> bool:
        return cache is self.cache

    def graph(self, tokens: int, tiles: int) -> PrefillGraph | None:
        """The smallest bucket holding `tokens` rows and `tiles` tiles; None: run eagerly."""
        for size in sorted(self.graphs):
            graph = self.graphs[size]
            if tokens <= size and tiles <= graph.capacity:
                return graph
        return None
