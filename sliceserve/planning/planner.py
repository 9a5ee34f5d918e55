"""Cut a model's layers into contiguous pipeline stages, one card each.

The first stage also holds the embedding, the last the head. `fewest_stages` finds the
smallest number of cards of a given size, then balances the layers over that many cards;
`balanced_stages` spreads the layers over a given number of devices. Both work on
`StageCosts`, so the runtime's placement and the `plan` command use the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from sliceserve.errors import SliceserveError
from sliceserve.planning.memory import StageCosts
from sliceserve.planning.sizes import format_size


@dataclass
class Stage:
    layers: range
    weights: int  # its layers, plus the embedding (first) and the head (last)
    kv_cache: int
    activations: int  # transient peak, plus the logits on the last stage
    reserve: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.reserve


class StagePricer:
    """Prices any contiguous range of layers in constant time (prefix sums)."""

    def __init__(self, costs: StageCosts):
        self.costs = costs
        self.num_layers = len(costs.layer_weights)
        self.weights = [0, *accumulate(costs.layer_weights)]
        self.kv_cache = [0, *accumulate(costs.layer_kv_cache)]

    def stage(self, layers: range) -> Stage:
        c = self.costs
        first, last = layers.start == 0, layers.stop == self.num_layers
        weights = self.weights[layers.stop] - self.weights[layers.start]
        weights += c.embedding * first + c.head * last
        return Stage(
            layers,
            weights,
            self.kv_cache[layers.stop] - self.kv_cache[layers.start],
            c.activations + c.logits * last,
            c.reserve,
        )

    def total(self, start: int, stop: int) -> int:
        return self.stage(range(start, stop)).total

    def greedy(self, capacity: int) -> list[range] | None:
        """Each stage takes as many layers as fit: the fewest stages of at most `capacity`
        bytes (a range that fits still fits when shortened, bar the head, which only the
        range reaching the last layer carries), or None when one layer alone does not fit."""
        ranges, start = [], 0
        while start < self.num_layers:
            stop = start
            while stop < self.num_layers and self.total(start, stop + 1) <= capacity:
                stop += 1
            if stop == start:
                return None
            ranges.append(range(start, stop))
            start = stop
        return ranges

    def smallest_capacity(self, count: int) -> int:
        """The smallest per-stage maximum with which `count` stages hold every layer."""
        low, high = 0, self.total(0, self.num_layers)
        while low < high:
            middle = (low + high) // 2
            ranges = self.greedy(middle)
            if ranges is not None and len(ranges) <= count:
                high = middle
            else:
                low = middle + 1
        return high


def fewest_stages(costs: StageCosts, budget: int, label: str = "the model") -> list[Stage]:
    """The fewest cards of `budget` bytes that hold the model, its layers balanced over them."""
    pricer = StagePricer(costs)
    ranges = pricer.greedy(budget)
    if ranges is None:
        raise SliceserveError(cannot_fit(pricer, budget, label))
    return balanced_stages(costs, len(ranges))


def balanced_stages(costs: StageCosts, count: int) -> list[Stage]:
    """`count` contiguous stages whose largest total is as small as it can be."""
    pricer = StagePricer(costs)
    if not 1 <= count <= pricer.num_layers:
        raise SliceserveError(f"cannot cut {pricer.num_layers} layers into {count} stages")
    ranges = pricer.greedy(pricer.smallest_capacity(count))
    while len(ranges) < count:  # fewer stages were enough: split the longest, every device gets layers
        longest = max(range(len(ranges)), key=lambda i: len(ranges[i]))
        r = ranges[longest]
        middle = r.start + len(r) // 2
        ranges[longest : longest + 1] = [range(r.start, middle), range(middle, r.stop)]
    return [pricer.stage(r) for r in ranges]


def cannot_fit(pricer: StagePricer, budget: int, label: str) -> str:
    """Why no split fits: the smallest stage that must exist is too big."""
    candidates = [range(0, 1), range(pricer.num_layers - 1, pricer.num_layers)]
    candidates += [range(i, i + 1) for i in range(pricer.num_layers)]
    worst = max((pricer.stage(r) for r in candidates), key=lambda s: s.total)
    first = worst.layers.start
    return (
        f"{label} cannot fit on cards of {format_size(budget)}: a stage holding only layer {first} "
        f"needs {format_size(worst.total)} ({format_size(worst.weights)} of weights, "
        f"{format_size(worst.kv_cache)} of KV cache, {format_size(worst.activations)} of activations, "
        f"{format_size(worst.reserve)} reserve)"
    )


def describe_layers(layers: range) -> str:
    return f"{layers.start}-{layers.stop - 1}" if len(layers) > 1 else f"{layers.start}"
