"""Which weights the fast path multiplies from their codes.

The loader leaves a quantized checkpoint's codes on each block (`block.quantized_weights`,
model/loader.py). The fast path takes them wherever the kernels can (kernels/quantized_linear.py:
8 or 4 bits, groups of a power of two from 16 or 32 inputs): up to 16 rows they are
dequantized inside the products, above that once per product into a float weight for the
library's product (fast/library_matmul.py). Anything else runs from float weights, as the
reference model does.
"""

from __future__ import annotations

import torch

from sliceserve.kernels.quantized_linear import is_quantized, supports_quantized
from sliceserve.model.decoder import Block
from sliceserve.model.quantized import QuantizedWeight

Weight = torch.Tensor | QuantizedWeight


def block_weight(block: Block, name: str, float_weight: torch.Tensor | None) -> Weight | None:
    """What the fast path multiplies for a block's linear `name` ("attn.q", "mlp_shortcut"):
    its codes where the loader kept them and the kernels take them, else the float weight
    (dequantized here if the loader left only the codes)."""
    quantized = getattr(block, "quantized_weights", {}).get(name)
    if quantized is None:
        return float_weight
    if supports_quantized(quantized):
        return quantized
    if float_weight is None or float_weight.is_meta:
        return quantized.dequantize(float_weight.dtype if float_weight is not None else None)
    return float_weight


def as_float(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    return weight.dequantize(dtype) if is_quantized(weight) else weight


def stacked(weights: list[Weight], dtype: torch.dtype) -> Weight:
    """Weights of one input stacked along their outputs (q|k|v): codes where all are codes of
    one format, else float weights."""
    formats = {(w.bits, w.group_size, w.in_features) if is_quantized(w) else None for w in weights}
    if len(formats) == 1 and None not in formats:
        return QuantizedWeight.concatenated(weights)
    return torch.cat([as_float(w, dtype) for w in weights])


def paired(gate: Weight, up: Weight, dtype: torch.dtype) -> tuple[Weight, Weight]:
    """Gate and up as one kernel reads them: both codes of one format, or both float, then
    stored one after the other in one tensor (views of it), which the library multiplies as
    one product (fast/library_matmul.py) and our kernels read as two weights alike."""
    if is_quantized(gate) and is_quantized(up) and (gate.bits, gate.group_size) == (up.bits, up.group_size):
        return gate, up
    gate, up = as_float(gate, dtype), as_float(up, dtype)
    if gate.shape[1:] != up.shape[1:] or gate.dtype != up.dtype:
        return gate, up
    both = torch.cat([gate, up])
    return both[: gate.shape[0]], both[gate.shape[0] :]


def float_dtype(block: Block) -> torch.dtype:
    """The block's float weights' dtype (meta tensors keep theirs)."""
    return block.attn.q.weight.dtype


def weight_bytes(weight: Weight | None) -> int:
    """Bytes a product reads of this weight."""
    if weight is None:
        return 0
    return weight.nbytes() if is_quantized(weight) else weight.numel() * weight.element_size()
