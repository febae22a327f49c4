"""The level database of the searched allocation: every layer cut once at a ladder of sizes.

A layer's *level* is what it keeps: `groups` whole KV groups (q:kv unchanged),
`channels` MLP channels on a ladder of `step` channels, or nothing at all
(the layer removed, so that depth and width compete for one budget). The
ladder is the same in every layer, so one MLP step given up by one layer and
taken by another leaves the total parameter count exactly where it was (and
one KV group likewise); a layer removed or brought back is balanced with MLP
steps, which lands within one MLP step of the budget (`Ladder.tolerance`).

`cut.level_database.LevelDatabase` holds, per layer, the dense model's calibration statistics
of o_proj and down_proj and the greedy OBS removal order of their units
(`obs.obs_unit_scores`, one pass gives every level: the k units kept are the
k the greedy order removed last), and computes each level's refit
(`compensation.refit_least_squares`) once, when it is first asked for.
`install` puts a level's weights into the live model (no copy of the model:
the dense tensors stay referenced by the database and come back when the
level is full again), so a candidate allocation is evaluated by installing
the layers that changed and running the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmprune.engine.pruning.allocate.cost import ParameterCost
from llmprune.engine.pruning.allocate.level import Level

__all__ = ["Ladder", "LayerCost", "ladder_step"]

LayerCost = Callable[[int, int | None, int | None], int]
"""Parameters of layer i keeping g KV groups and c MLP channels; (i, None, None): the layer removed (0)."""


@dataclass
class Ladder:
    """The levels every layer may take, and what they cost.

    groups: 1..kv_heads; channels: full, full - step, ... down to the floor
    (at least `min_channel_share` of the channels stay); removal when allowed.
    """

    kv_heads: list[int]
    channels: list[int]
    step: int
    cost: LayerCost
    min_channel_share: float = 0.2
    attention: bool = True
    depth: bool = True
    protected: frozenset[int] = frozenset()  # layers never removed (the first and the last)

    @property
    def num_layers(self) -> int:
        return len(self.channels)

    def channel_levels(self, layer: int) -> list[int]:
        """Kept-channel counts of one layer, widest first."""
        full = self.channels[layer]
        floor = max(1, int(-(-full * self.min_channel_share // 1)))
        return [full - k * self.step for k in range(full // self.step + 1) if full - k * self.step >= floor]

    def group_levels(self, layer: int) -> list[int]:
        return list(range(self.kv_heads[layer], 0, -1)) if self.attention else [self.kv_heads[layer]]

    @classmethod
    def of_cost(cls, cost: ParameterCost, output_biases: bool, step: int | None = None, **options) -> Ladder:
        """The ladder of a model, priced by its one parameter-cost model (`allocate.cost.ParameterCost`).

        `output_biases`: compensation gives every kept layer o_proj/down_proj biases; they are priced in.
        """
        channels = [s.intermediate_size for s in cost.shapes]

        def price(index: int, groups: int | None, kept: int | None) -> int:
            if groups is None or kept is None:
                return cost.layer(index, removed=True)
            return cost.layer(index, groups, kept, output_biases=output_biases)

        kv_heads = [s.num_key_value_heads for s in cost.shapes]
        return cls(kv_heads, channels, step or ladder_step(min(channels)), price, **options)

    def full(self, layer: int) -> Level:
        return Level(self.kv_heads[layer], self.channels[layer])

    def params(self, allocation: Sequence[Level]) -> int:
        return sum(
            self.cost(i, None, None) if lv.removed else self.cost(i, lv.groups, lv.channels)
            for i, lv in enumerate(allocation)
        )

    @property
    def tolerance(self) -> int:
        """How far under the budget an allocation may land: one MLP step of the costliest layer."""
        return max(
            self.cost(i, self.kv_heads[i], c) - self.cost(i, self.kv_heads[i], c - self.step)
            for i, c in enumerate(self.channels)
        )

    def fits(self, allocation: Sequence[Level], budget: int) -> bool:
        """At most `budget` parameters, and less than one tolerance under it."""
        params = self.params(allocation)
        return budget - self.tolerance < params <= budget

    def uniform(self, budget: int) -> list[Level]:
        """The same MLP level everywhere (attention whole), one step more in the first layers to land on budget."""
        allocation = [self.full(i) for i in range(self.num_layers)]
        # one channel step per layer and pass, first layer first: every layer is within one step of the others
        while self.params(allocation) > budget:
            moved = False
            for i in range(self.num_layers):
                if self.params(allocation) <= budget:
                    break
                levels = self.channel_levels(i)
                k = levels.index(allocation[i].channels)
                if k + 1 < len(levels):
                    allocation[i] = Level(allocation[i].groups, levels[k + 1])
                    moved = True
            if not moved:
                raise ValueError("the budget cannot be reached by MLP channels alone")
        return allocation


def ladder_step(channels: int, steps: int = 32) -> int:
    """MLP channels per level: about 1/steps of the width, a multiple of 8 where the width allows it."""
    step = max(1, channels // steps)
    return step - step % 8 if step >= 16 else step
