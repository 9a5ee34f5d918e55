"""What a pipeline stage holds, in bytes: weights, KV cache, activations and a fixed reserve.

Weights follow the parameter arithmetic of `decoder_spec` (per layer, at the layer's kept
widths, with shortcuts and biases). The KV cache is the engine's: `batch` slots plus one
scratch slot, each reserving `context` positions in every layer. Activations are an upper
estimate of the transient peak of one forward step on the reference path (a prefill chunk
of one request, or a decode step of the whole batch). The reserve covers what lives on a
card outside the tensors we count: the CUDA context and kernels, library workspaces and
allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass

from sliceserve.errors import SliceserveError
from sliceserve.model.quant_format import SHORTCUTS
from sliceserve.model.spec import (
    BLOCK_LINEARS,
    DecoderSpec,
    embedding_parameter_count,
    head_parameter_count,
    layer_parameter_count,
)
from sliceserve.model.spec_checks import expected_tensors

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
DEFAULT_RESERVE = 2**30  # 1 GiB a card: see the README's planner section for why
# Tokens one engine step carries by default: engine/engine.py's DEFAULT_TOKEN_BUDGET (restated so
# that planning imports no torch; tests/test_planner.py checks that the two agree).
DEFAULT_STEP_TOKENS = 4096


@dataclass(frozen=True)
class Workload:
    """What the cards must serve, besides holding the weights."""

    dtype: str = "float16"
    batch: int = 1  # requests decoded together (KV-cache slots)
    context: int = 2048  # positions each slot reserves (prompt + completion)
    prefill_chunk: int = 256  # prompt tokens of one request a step takes at most (the engine's default)
    step_tokens: int = DEFAULT_STEP_TOKENS  # tokens one step carries: several requests' chunks in one forward
    reserve: int = DEFAULT_RESERVE  # bytes a card keeps for the CUDA context, workspaces, slack
    bits: int | None = None  # block linears stored in 8 or 4 bits (model/quantized.py); None: dtype
    group_size: int = 128  # inputs per quantization scale
    quantized_shortcuts: bool = False  # a sliced model's shortcut matrices in `bits` too

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def check(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise SliceserveError(f"unknown dtype {self.dtype!r} (known: {', '.join(DTYPE_BYTES)})")
        for name in ("batch", "context", "prefill_chunk", "step_tokens"):
            if getattr(self, name) < 1:
                raise SliceserveError(f"--{name.replace('_', '-')} must be at least 1")
        if self.reserve < 0:
            raise SliceserveError("the reserve cannot be negative")
        if self.bits not in (None, 8, 4):
            raise SliceserveError(f"--bits must be 8 or 4, not {self.bits}")
        if self.group_size < 2:
            raise SliceserveError("--group-size must be at least 2")


@dataclass
class StageCosts:
    """Bytes of every part a stage may hold, for one model and one workload."""

    layer_weights: list[int]
    layer_kv_cache: list[int]
    embedding: int  # first stage only
    head: int  # last stage only
    activations: int  # every stage: the transient peak of one forward step
    logits: int  # last stage only
    reserve: int  # every stage


def stage_costs(spec: DecoderSpec, biases: dict[str, bool], work: Workload) -> StageCosts:
    work.check()
    b = work.dtype_bytes
    kv = kv_cache_bytes_per_layer(spec, work)
    return StageCosts(
        layer_weights=[
            layer_parameter_count(spec, w, biases) * b + quantization_saving(linears, work)
            for w, linears in zip(spec.layers, linear_shapes_by_layer(spec, work.quantized_shortcuts))
        ],
        layer_kv_cache=[kv] * spec.num_layers,
        embedding=embedding_parameter_count(spec) * b,
        head=head_parameter_count(spec, biases) * b,
        activations=activation_bytes(spec, work),
        logits=work.batch * spec.vocab_size * b,
        reserve=work.reserve,
    )


def linear_shapes_by_layer(spec: DecoderSpec, shortcuts: bool = False) -> list[list[tuple[int, int]]]:
    """(out, in) of each block linear (and shortcut matrix), layer by layer."""
    needed, _ = expected_tensors(spec)
    shapes: list[list[tuple[int, int]]] = [[] for _ in spec.layers]
    for name, shape in needed.items():
        parts = name.split(".")
        linear = ".".join(parts[2:-1]) if parts[-1] == "weight" else ".".join(parts[2:])
        if parts[0] == "layers" and (linear in BLOCK_LINEARS or (shortcuts and linear in SHORTCUTS)):
            shapes[int(parts[1])].append(shape)
    return shapes


def quantization_saving(linears: list[tuple[int, int]], work: Workload) -> int:
    """Bytes the layer's linears weigh quantized less what they weigh in the dtype (negative, or 0
    unquantized): the codes, a scale per group in the dtype, and a zero byte per group at 4 bits."""
    if work.bits is None:
        return 0
    total = 0
    for out_features, in_features in linears:
        groups = out_features * -(-in_features // work.group_size)
        codes = out_features * (in_features if work.bits == 8 else -(-in_features // 2))
        scales = groups * (work.dtype_bytes + (1 if work.bits == 4 else 0))
        total += codes + scales - out_features * in_features * work.dtype_bytes
    return total


def kv_cache_bytes_per_layer(spec: DecoderSpec, work: Workload) -> int:
    """Keys and values of one layer: (batch + 1 scratch) slots x context positions."""
    per_position = 2 * spec.num_kv_heads * spec.head_dim * work.dtype_bytes
    return (work.batch + 1) * work.context * per_position


def activation_bytes(spec: DecoderSpec, work: Workload) -> int:
    """Upper estimate of one forward step's transient peak: the larger of a prefill step (as
    many chunks of `prefill_chunk` tokens as `step_tokens` holds, one a request, each attending
    over `context` positions, in one forward) and a decode step (`batch` rows of one token each)."""
    chunk = min(work.prefill_chunk, work.context)
    step = min(max(work.step_tokens, chunk), work.batch * chunk)
    rows = -(-step // chunk)
    prefill = forward_bytes(spec, tokens=chunk, rows=rows, keys=work.context, dtype_bytes=work.dtype_bytes)
    decode = forward_bytes(spec, tokens=1, rows=work.batch, keys=work.context, dtype_bytes=work.dtype_bytes)
    return max(prefill, decode)


def forward_bytes(spec: DecoderSpec, *, tokens: int, rows: int, keys: int, dtype_bytes: int) -> int:
    """Transient bytes of one block over rows x tokens positions, at the original width (an
    upper bound for sliced widths). Attention runs row by row, so its per-row terms count once."""
    n = rows * tokens
    q_width = spec.num_heads * spec.head_dim
    kv_width = spec.num_kv_heads * spec.head_dim
    stream = n * spec.original_width * (2 * dtype_bytes + 4)  # the stream, its update, its norm in float32
    projections = 2 * n * (q_width + 2 * kv_width) * dtype_bytes  # q, k, v and their rotated copies
    repeated = 2 * q_width * keys * dtype_bytes if kv_width < q_width else 0  # grouped k, v spread to every head
    scores = spec.num_heads * tokens * keys * 4  # where the attention kernel materialises them (float32)
    mlp = n * spec.intermediate_size * dtype_bytes * (3 if spec.gated_mlp else 2)
    return stream + max(projections + repeated + scores, mlp)
