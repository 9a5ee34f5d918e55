"""Checks of a checkpoint's model description, and of its tensors against it, before anything
is allocated.

config.json is a file on disk: edited by hand, written by another version, or tampered with.
Every field of its ``model`` description is checked for type, range and consistency, and every
tensor the description implies for presence, shape and dtype (from the shards' headers alone),
so that a bad checkpoint ends in one line naming the field or the tensor, not in a traceback, an
allocation of petabytes, or a server that loads and then fails every request.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from sliceserve.errors import SliceserveError
from sliceserve.model.quant_format import QuantFormat
from sliceserve.model.spec import ATTENTION_READERS, ATTENTION_WRITER, DecoderSpec, LayerWidths, RopeSpec

ACTIVATIONS = ("none", "silu", "relu", "gelu", "gelu_tanh")  # what the reference and the kernels compute
ROPE_SCALINGS = ("default", "linear", "llama3")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names

# Far above any released model, low enough that a typo cannot ask for petabytes.
MAX_VOCAB = 1 << 22  # the largest vocabularies hold about 262k tokens
MAX_POSITIONS = 1 << 24
MAX_LAYERS = 1 << 12
MAX_WIDTH = 1 << 18  # residual width, MLP width, and heads x head_dim
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12


def shown(value: Any) -> str:
    """A value as config.json spells it, cut short."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Reads the fields of one JSON object, each failure a one-line error naming the field."""

    def __init__(self, data: Any, where: str, source: str):
        self.where, self.source = where, source
        if not isinstance(data, dict):
            raise self.error(None, f"is {shown(data)}; it must be a JSON object")
        self.data = data

    def name(self, field: str | None) -> str:
        return self.where if field is None else f"{self.where}.{field}"

    def error(self, field: str | None, message: str) -> SliceserveError:
        return SliceserveError(f"{self.source}: {self.name(field)} {message}")

    def get(self, field: str, optional: bool) -> Any:
        if field not in self.data:
            if optional:
                return None
            raise self.error(field, "is missing")
        return self.data[field]

    def integer(self, field: str, low: int, high: int, *, optional: bool = False) -> int | None:
        value = self.get(field, optional)
        if value is None and optional:
            return None
        if type(value) is not int or not low <= value <= high:  # bool is an int, and 1e9 a float: neither is
            raise self.error(field, f"is {shown(value)}; it must be an integer from {low} to {high}")
        return value

    def number(self, field: str, *, low: float = 0.0, high: float = math.inf, optional: bool = False) -> float | None:
        """A finite number above `low` and at most `high`."""
        value = self.get(field, optional)
        if value is None and optional:
            return None
        if type(value) not in (int, float) or not math.isfinite(value) or not low < value <= high:
            bound = f" and at most {high:g}" if math.isfinite(high) else ""
            raise self.error(field, f"is {shown(value)}; it must be a finite number above {low:g}{bound}")
        return float(value)

    def boolean(self, field: str, *, optional: bool = False) -> bool | None:
        value = self.get(field, optional)
        if value is None and optional:
            return None
        if type(value) is not bool:
            raise self.error(field, f"is {shown(value)}; it must be true or false")
        return value

    def choice(self, field: str, options: tuple[str, ...], *, optional: bool = False) -> str | None:
        value = self.get(field, optional)
        if value is None and optional:
            return None
        if value not in options or type(value) is not str:
            raise self.error(field, f"is {shown(value)}; it must be one of {', '.join(options)}")
        return value

    def only(self, known: set[str]) -> None:
        """No field outside `known` (for objects the runtime builds a dataclass from)."""
        unknown = sorted(set(self.data) - known, key=str)
        if unknown:
            raise self.error(unknown[0], "is not a field this sliceserve knows")


def check_model_description(model: Any, source: str = "config.json") -> None:
    """Every field of a checkpoint's ``model`` description: types, ranges and consistency.

    Fields beyond the description's are ignored (a newer writer may add some); the objects the
    runtime builds dataclasses from (``rope``, each of ``layers``) may hold no unknown field.
    """
    f = Fields(model, "model", source)
    family = f.get("family", False)
    if type(family) is not str or not family:
        raise f.error("family", f"is {shown(family)}; it must be a non-empty string")
    vocab = f.integer("vocab_size", 1, MAX_VOCAB)
    width = f.integer("original_width", 1, MAX_WIDTH)
    num_layers = f.integer("num_layers", 1, MAX_LAYERS)
    heads = f.integer("num_heads", 1, MAX_HEADS)
    kv_heads = f.integer("num_kv_heads", 1, heads)
    if heads % kv_heads:
        raise f.error("num_kv_heads", f"is {kv_heads}; it must divide num_heads ({heads})")
    head_dim = f.integer("head_dim", 1, MAX_HEAD_DIM)
    if heads * head_dim > MAX_WIDTH:
        raise f.error("head_dim", f"is {head_dim}; num_heads x head_dim ({heads * head_dim}) exceeds {MAX_WIDTH}")
    f.integer("intermediate_size", 1, MAX_WIDTH)
    f.choice("activation", ACTIVATIONS)
    f.boolean("gated_mlp")
    parallel = f.boolean("parallel_block")
    f.number("norm_eps", high=1.0)
    f.integer("max_positions", 1, MAX_POSITIONS)
    rope = f.get("rope", False)
    if rope is not None:
        check_rope(rope, head_dim, source)
    f.integer("sliding_window", 1, MAX_POSITIONS, optional=True)
    shortcuts = f.boolean("has_shortcuts", optional=True) or False
    layers = f.get("layers", False)
    if not isinstance(layers, list) or len(layers) != num_layers:
        found = f"has {len(layers)} entries" if isinstance(layers, list) else f"is {shown(layers)}"
        raise f.error("layers", f"{found}; it must be a list of num_layers ({num_layers}) layer widths")
    widths = [check_layer(entry, i, width, parallel, shortcuts, source) for i, entry in enumerate(layers)]
    for i in range(1, num_layers):
        if widths[i].input_width != widths[i - 1].output_width:
            raise f.error(
                f"layers[{i}].input_width",
                f"is {widths[i].input_width}; it must equal layers[{i - 1}].output_width ({widths[i - 1].output_width})",
            )
    for field, expected, what in (
        ("embedding_width", widths[0].input_width, "layers[0].input_width"),
        ("head_width", widths[-1].output_width, f"layers[{num_layers - 1}].output_width"),
    ):
        value = f.integer(field, 1, width)
        if value != expected:
            raise f.error(field, f"is {value}; it must equal {what} ({expected})")
    for field in ("bos_token_id", "pad_token_id"):  # the tokenizer's business; only their type matters here
        value = f.get(field, True)
        if value is not None and type(value) is not int:
            raise f.error(field, f"is {shown(value)}; it must be an integer or null")
    eos = f.get("eos_token_id", True)  # the sampler indexes the logits with these
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not all(type(t) is int and 0 <= t < vocab for t in ids):
        raise f.error("eos_token_id", f"is {shown(eos)}; it must be null or token ids (lists too) below {vocab}")


def check_rope(rope: Any, head_dim: int, source: str) -> None:
    f = Fields(rope, "model.rope", source)
    f.only({field.name for field in dataclasses.fields(RopeSpec)})
    f.number("theta")
    rotary_dim = f.integer("rotary_dim", 2, head_dim)
    if rotary_dim % 2:
        raise f.error("rotary_dim", f"is {rotary_dim}; it must be even (dimensions rotate in pairs)")
    scaling = f.choice("scaling_type", ROPE_SCALINGS, optional=True)
    f.number("factor", optional=True)
    low = f.number("low_freq_factor", optional=True)
    high = f.number("high_freq_factor", optional=True)
    f.integer("original_max_positions", 1, MAX_POSITIONS, optional=True)
    if scaling == "llama3":
        low, high = low or RopeSpec.low_freq_factor, high or RopeSpec.high_freq_factor
        if high <= low:
            raise f.error("high_freq_factor", f"is {high}; llama3 scaling needs it above low_freq_factor ({low})")


def check_layer(entry: Any, index: int, width: int, parallel: bool, shortcuts: bool, source: str) -> LayerWidths:
    f = Fields(entry, f"model.layers[{index}]", source)
    f.only({field.name for field in dataclasses.fields(LayerWidths)})
    d_in = f.integer("input_width", 1, width)
    d_out = f.integer("output_width", 1, width)
    if parallel:
        if f.get("middle_width", True) is not None:
            raise f.error("middle_width", "must be null: parallel blocks have no middle point")
        d_mid = None
    else:
        d_mid = f.integer("middle_width", 1, width)
    if not shortcuts:  # no shortcut matrices: the skip connection is the identity, so widths cannot change
        for field, value in (("middle_width", d_mid), ("output_width", d_out)):
            if value is not None and value != d_in:
                raise f.error(field, f"is {value}; without shortcut matrices it must equal input_width ({d_in})")
    return LayerWidths(d_in, d_mid, d_out)


def expected_tensors(spec: DecoderSpec) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The tensors a description implies, by name and shape: those it needs, and the biases it may carry."""
    hq, hkv, inter = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    needed = {"embed.weight": (spec.vocab_size, spec.embedding_width)}
    if spec.rope is None:
        needed["positions.weight"] = (spec.max_positions, spec.embedding_width)
    needed["head.weight"] = (spec.vocab_size, spec.head_width)
    biases = {"head.bias": (spec.vocab_size,)}
    for i, w in enumerate(spec.layers):
        d_in, d_out = w.input_width, w.output_width
        d_mlp_in = d_in if spec.parallel_block else w.middle_width
        d_attn_out = d_out if spec.parallel_block else w.middle_width
        linears = {name: (hkv if name != "attn.q" else hq, d_in) for name in ATTENTION_READERS}
        linears[ATTENTION_WRITER] = (d_attn_out, hq)
        if spec.gated_mlp:
            linears["mlp.gate"] = (inter, d_mlp_in)
        linears["mlp.up"] = (inter, d_mlp_in)
        linears["mlp.down"] = (d_out, inter)
        for name, shape in linears.items():
            needed[f"layers.{i}.{name}.weight"] = shape
            biases[f"layers.{i}.{name}.bias"] = shape[:1]
        if spec.has_shortcuts and spec.parallel_block:
            needed[f"layers.{i}.shortcut"] = (d_out, d_in)
        elif spec.has_shortcuts:
            needed[f"layers.{i}.attn_shortcut"] = (w.middle_width, d_in)
            needed[f"layers.{i}.mlp_shortcut"] = (d_out, w.middle_width)
    return needed, biases


def check_tensors(
    spec: DecoderSpec,
    tensors: dict[str, tuple[tuple[int, ...], str]],
    source: str,
    quantized: QuantFormat | None = None,
) -> None:
    """Every tensor the description needs is in the index with its shape, and nothing else is
    (a stray tensor means the description and the weights disagree). `tensors` maps each name of
    the index to the shape and safetensors dtype its shard's header gives. `quantized`: the
    linears it names are stored as codes and scales (model/quantized.py) instead of weights."""
    needed, biases = expected_tensors(spec)
    integer: dict[str, tuple[str, ...]] = {}  # quantized codes: name -> the integer dtypes allowed
    for name in list(needed) if quantized is not None else ():
        stem = name.removesuffix(".weight")  # a shortcut's name is its own stem
        if name.startswith("layers.") and stem.split(".", 2)[-1] in quantized.linears:
            out_features, in_features = needed.pop(name)
            for suffix, (shape, dtypes) in quantized.stored_shapes(out_features, in_features).items():
                needed[f"{stem}.{suffix}"] = shape
                if dtypes:
                    integer[f"{stem}.{suffix}"] = dtypes
    for name in needed:
        if name not in tensors:
            raise SliceserveError(f"{source} lacks the tensor {name} that the model description needs")
    dtypes = set()
    for name, (shape, dtype) in tensors.items():
        expected = needed.get(name, biases.get(name))
        if expected is None:
            raise SliceserveError(f"{source} holds a tensor {name} that the model description does not use")
        if tuple(shape) != expected:
            raise SliceserveError(
                f"{source}: tensor {name} has shape {list(shape)}; the model description needs {list(expected)}"
            )
        if name in integer:
            if dtype not in integer[name]:
                raise SliceserveError(f"{source}: tensor {name} is {dtype}; quantized codes must be {integer[name][0]}")
            continue
        if dtype not in FLOAT_DTYPES:
            raise SliceserveError(f"{source}: tensor {name} is {dtype}; weights must be floating point")
        dtypes.add(dtype)
    if len(dtypes) > 1:
        raise SliceserveError(f"{source}: tensors of several dtypes ({', '.join(sorted(dtypes))}); one is needed")
