"""How a checkpoint stores quantized linears, and how the runtime turns them back into weights.

A quantized linear `layers.{i}.{name}` holds, in place of its `.weight` (out, in) (a shortcut
matrix `layers.{i}.attn_shortcut`, stored (out, in) as a linear's weight, in place of itself):
  .qweight  int8 (out, in), w = q * scale                      8 bits, symmetric
            uint8 (out, ceil(in / 2)), two 4-bit codes a byte,  4 bits, w = (q - zero) * scale
            the even input column in the low nibble
  .scales   (out, groups) in the checkpoint's float dtype, one per `group_size` inputs
  .zeros    uint8 (out, groups), 4 bits only
config.json's "quantization" entry names the bits, the group size and the quantized linears
(quantization/ writes it). Everything else (embeddings, head, biases, shortcuts not listed) stays float.

The reference model multiplies the dequantized weights; the fast path keeps the codes
(`QuantizedWeight`, which the loader also leaves on each block) and dequantizes inside its
products (kernels/quantized_linear.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sliceserve.model.quant_format import QuantFormat


@dataclass
class QuantizedWeight:
    """A linear's weight (out, in_features) as stored: codes, scales (and zero points)."""

    codes: torch.Tensor  # int8 (out, in) or uint8 (out, ceil(in / 2)), two 4-bit codes a byte
    scales: torch.Tensor  # (out, groups), float
    zeros: torch.Tensor | None  # uint8 (out, groups), 4 bits only
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def format(self) -> QuantFormat:
        return QuantFormat(self.bits, self.group_size, ())

    def nbytes(self) -> int:
        """Bytes a product reads: codes, scales and zeros."""
        parts = (self.codes, self.scales, self.zeros)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(
            self.codes, self.scales, self.zeros, self.format, self.in_features, dtype or self.scales.dtype
        )

    @classmethod
    def concatenated(cls, parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Several weights of one input and format stacked along their outputs (q|k|v)."""
        kinds = {(p.bits, p.group_size, p.in_features) for p in parts}
        first = parts[0]
        if len(kinds) != 1:
            raise ValueError("only weights of one format and input width stack")
        zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
        codes, scales = torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts])
        return cls(codes, scales, zeros, first.bits, first.group_size, first.in_features)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, ceil(in / 2)) uint8, column 2j in the low nibble."""
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    fmt: QuantFormat,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The float weight (out, in) the codes stand for, computed in float32 (at least) then cast."""
    wide = torch.promote_types(scales.dtype, torch.float32)
    codes = qweight if fmt.bits == 8 else unpack_nibbles(qweight, in_features)
    codes = codes.to(wide)
    if zeros is not None:
        codes = codes - zeros.to(wide).repeat_interleave(fmt.group_size, dim=1)[:, :in_features]
    weight = codes * scales.to(wide).repeat_interleave(fmt.group_size, dim=1)[:, :in_features]
    return weight.to(dtype)
