"""The description of a quantized checkpoint's storage (config.json's "quantization" entry):
which matrices, how many bits, what groups. Imports nothing heavy (the planner and the CLI's
option parsing read it); model/quantized.py holds the tensor work.
"""

from __future__ import annotations

from dataclasses import dataclass

from sliceserve.errors import SliceserveError
from sliceserve.model.spec import BLOCK_LINEARS

BITS = (8, 4)
SHORTCUTS = ("attn_shortcut", "mlp_shortcut", "shortcut")  # a sliced block's shortcut matrices
QUANTIZABLE = (*BLOCK_LINEARS, *SHORTCUTS)


@dataclass(frozen=True)
class QuantFormat:
    bits: int
    group_size: int
    linears: tuple[str, ...]  # which of a block's matrices (QUANTIZABLE) are stored quantized

    @classmethod
    def from_config(cls, entry: object, source: str = "config.json") -> QuantFormat:
        if not isinstance(entry, dict):
            raise SliceserveError(f'{source}: "quantization" must be an object')
        bits, group, linears = entry.get("bits"), entry.get("group_size"), entry.get("linears")
        if bits not in BITS:
            raise SliceserveError(f'{source}: quantization "bits" must be 8 or 4, not {bits!r}')
        if not isinstance(group, int) or isinstance(group, bool) or group < 2:
            raise SliceserveError(f'{source}: quantization "group_size" must be an integer of at least 2')
        if not isinstance(linears, list) or not linears or any(name not in QUANTIZABLE for name in linears):
            raise SliceserveError(f'{source}: quantization "linears" must list some of {", ".join(QUANTIZABLE)}')
        return cls(bits, group, tuple(linears))

    def groups(self, in_features: int) -> int:
        return -(-in_features // self.group_size)

    def stored_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """Each stored tensor's suffix -> (shape, safetensors dtypes allowed); scales take the
        checkpoint's float dtype (None: any)."""
        groups = (out_features, self.groups(in_features))
        if self.bits == 8:
            return {"qweight": ((out_features, in_features), ("I8",)), "scales": (groups, ())}
        packed = (out_features, -(-in_features // 2))
        return {"qweight": (packed, ("U8",)), "scales": (groups, ()), "zeros": (groups, ("U8",))}


def quant_format(config: dict) -> QuantFormat | None:
    entry = config.get("quantization")
    return None if entry is None else QuantFormat.from_config(entry)
