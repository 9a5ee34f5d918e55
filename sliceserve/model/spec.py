"""The canonical pre-norm decoder that the slicer writes and the runtime executes.

Every supported family is reduced to this one shape: an embedding (plus learned
positions for OPT), a stack of blocks whose norms are weightless RMSNorms over the
*original* width, and a head. Blocks are sequential (attention, then MLP) or parallel
(Phi-2: both read one norm). Weights use PyTorch's ``F.linear`` layout (out, in).

Per layer the residual stream has a kept width at each point: ``input_width`` (read
by attention), ``middle_width`` (read by the MLP; sequential blocks only) and
``output_width`` (the next layer's input). A dense model has every width equal to
``original_width`` and no shortcut matrices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# A block's linears, by where they meet the residual stream (names as in the checkpoint,
# layers.{i}.<name>.weight/.bias). Fusion folds norms into the readers and centres the
# writers; slicing rotates readers' inputs and writers' outputs; pruning, the fast layer
# and the parameter counts take their lists from here.
ATTENTION_READERS = ("attn.q", "attn.k", "attn.v")  # read the attention norm's output
ATTENTION_WRITER = "attn.o"
MLP_READERS = ("mlp.gate", "mlp.up")  # read the MLP norm's output (no gate in ungated MLPs)
MLP_WRITER = "mlp.down"
BLOCK_LINEARS = (*ATTENTION_READERS, ATTENTION_WRITER, *MLP_READERS, MLP_WRITER)
BIAS_NAMES = (*(name.split(".")[1] for name in BLOCK_LINEARS), "head")  # parameter_count's has_biases keys


@dataclass
class RopeSpec:
    """Rotary position embedding settings (absent for learned positions)."""

    theta: float
    rotary_dim: int  # dimensions of each head that rotate (Phi-2 rotates only part)
    scaling_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_positions: int = 8192  # llama3 only


@dataclass
class LayerWidths:
    input_width: int
    middle_width: int | None  # None for parallel blocks
    output_width: int


@dataclass
class DecoderSpec:
    family: str
    vocab_size: int
    original_width: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    activation: str  # silu | relu | gelu | gelu_tanh
    gated_mlp: bool
    parallel_block: bool
    norm_eps: float
    max_positions: int
    rope: RopeSpec | None  # None: learned absolute positions
    sliding_window: int | None = None
    layers: list[LayerWidths] = field(default_factory=list)
    has_shortcuts: bool = False  # rotated checkpoints carry shortcut matrices, dense ones none
    embedding_width: int = 0  # width the embedding writes (= layer 0's input width)
    head_width: int = 0  # width the head reads (= last layer's output width)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def dense_widths(self) -> None:
        """Set every width to the original one (no slicing)."""
        d = self.original_width
        self.layers = [LayerWidths(d, None if self.parallel_block else d, d) for _ in range(self.num_layers)]
        self.embedding_width = self.head_width = d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DecoderSpec:
        data = dict(data)
        rope = data.pop("rope")
        layers = data.pop("layers")
        known = {f.name for f in dataclasses.fields(cls)}
        spec = cls(
            rope=RopeSpec(**rope) if rope is not None else None,
            layers=[LayerWidths(**w) for w in layers],
            **{k: v for k, v in data.items() if k in known},
        )
        return spec


def embedding_parameter_count(spec: DecoderSpec) -> int:
    """The token embedding, plus the learned position rows where the family has them."""
    rows = spec.vocab_size + (spec.max_positions if spec.rope is None else 0)
    return rows * spec.embedding_width


def layer_parameter_count(spec: DecoderSpec, widths: LayerWidths, has_biases: dict[str, bool] | None = None) -> int:
    """One block: its linears at the block's kept widths, flagged biases, and its shortcuts."""
    b = has_biases or {}
    hq = spec.num_heads * spec.head_dim
    hkv = spec.num_kv_heads * spec.head_dim
    inter = spec.intermediate_size
    d_in, d_out = widths.input_width, widths.output_width
    d_mlp_in = d_in if spec.parallel_block else widths.middle_width
    d_attn_out = d_out if spec.parallel_block else widths.middle_width
    total = (hq + 2 * hkv) * d_in + hq * d_attn_out
    total += (2 if spec.gated_mlp else 1) * inter * d_mlp_in + inter * d_out
    total += b.get("q", False) * hq + b.get("k", False) * hkv + b.get("v", False) * hkv
    total += b.get("o", False) * d_attn_out
    total += b.get("up", False) * inter + b.get("gate", False) * inter * spec.gated_mlp
    total += b.get("down", False) * d_out
    # shortcuts: only where the rotation changes between two points
    if spec.has_shortcuts:
        if spec.parallel_block:
            total += d_in * d_out
        else:
            total += d_in * widths.middle_width + widths.middle_width * d_out
    return total


def head_parameter_count(spec: DecoderSpec, has_biases: dict[str, bool] | None = None) -> int:
    return spec.vocab_size * spec.head_width + (has_biases or {}).get("head", False) * spec.vocab_size


def parameter_count(spec: DecoderSpec, *, has_biases: dict[str, bool] | None = None) -> int:
    """Parameters implied by the widths (weights only; biases counted when flagged).

    ``has_biases`` maps canonical bias names ('q', 'k', 'v', 'o', 'up', 'gate', 'down',
    'head') to whether the checkpoint carries them.
    """
    layers = sum(layer_parameter_count(spec, w, has_biases) for w in spec.layers)
    return embedding_parameter_count(spec) + layers + head_parameter_count(spec, has_biases)
